"""Persistent worker processes for `concurrency="process"` environments.

Why not `ProcessPoolExecutor`: TRL calls a reward function every step, so a pool must outlive one
`evaluate` call, yet an episode past its timeout must be killed without losing the other workers, and
the clock must start when the episode starts (not while it waits in the executor's call queue or
while a fresh worker imports things). Why not `multiprocessing` at all: its spawn and forkserver
children re-import the parent's `__main__`, i.e. the training script with torch and TRL, in every
worker. A worker here is `python -c` running `worker_main`, which imports `sdpo_envs` and whatever
unpickling the environment needs, nothing else. The price: the environment's class must be importable
by name (defined in a module, not in `__main__`).

Protocol over two pipes, one `multiprocessing.connection.Connection` each way:
parent → worker `("env", blob)` (only when the pickled environment changed) and
`("run", index, task, text)`; worker → parent `("started", index)`, then `("done", index, feedback,
failed)`, `("invalid", index, message)` or `("load_error", traceback)`. The parent only writes to an
idle worker, and an idle worker only reads, so neither side can block the other on a full pipe.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from sdpo_envs.types import EnvironmentSetupError, Feedback, InvalidResultError, Task

if TYPE_CHECKING:
    from sdpo_envs.env import Environment

# Booting Python, importing sdpo_envs and unpickling the environment (which imports its plugin).
STARTUP_TIMEOUT = 120.0
_BOOT = "import sys; from sdpo_envs._workers import worker_main; worker_main(int(sys.argv[1]), int(sys.argv[2]))"


def _child_pythonpath() -> str:
    """The parent's `sys.path`, so the worker imports the same modules from the same places."""
    return os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)


class _Worker:
    """One worker process and its two pipe ends."""

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(to_child_r), str(to_parent_w)],
                pass_fds=(to_child_r, to_parent_w),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": _child_pythonpath()},
            )
        except BaseException:
            for fd in (to_child_w, to_parent_r):
                os.close(fd)
            raise
        finally:
            os.close(to_child_r)
            os.close(to_parent_w)
        self.outbox = Connection(to_child_w, readable=False)
        self.inbox = Connection(to_parent_r, writable=False)
        self.generation = -1

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()
        self._close_pipes()

    def stop(self, grace: float = 2.0) -> None:
        """Close its input (the worker exits on EOF); kill it if it is still busy after `grace` seconds."""
        self._close_pipes()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def _close_pipes(self) -> None:
        for conn in (self.outbox, self.inbox):
            with contextlib.suppress(OSError):
                conn.close()


class WorkerPool:
    """Worker processes kept across `evaluate` calls; a killed or dead worker is replaced on demand."""

    def __init__(self) -> None:
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._blob = b""
        self._generation = 0

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()

    def _discard(self, worker: _Worker, *, kill: bool) -> None:
        if kill:
            worker.kill()
        else:
            worker.stop(grace=0.5)
        self._workers.remove(worker)

    def run(
        self, env: Environment, tasks: Sequence[Task], texts: Sequence[str], workers: int, timeout: float | None
    ) -> list[Feedback]:
        """Score every episode on at most `workers` processes; see the module docstring for the protocol."""
        label = env.label
        if type(env).__module__ == "__main__":
            raise EnvironmentSetupError(f"{label}: a process environment must be defined in an importable module, "
                                        "not in __main__ (its worker processes import it by name)")
        try:
            blob = pickle.dumps(env, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise EnvironmentSetupError(
                f"{label}: a process environment must be picklable: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            if blob != self._blob:
                self._blob, self._generation = blob, self._generation + 1
            results: list[Feedback | None] = [None] * len(tasks)
            jobs = deque(range(len(tasks)))
            active: dict[_Worker, list[Any]] = {}  # worker -> [index, started_at or None, assigned_at]
            try:
                while jobs or active:
                    self._assign(jobs, active, workers, tasks, texts)
                    self._receive(env, active, results, timeout)
                    self._enforce_timeouts(env, active, results, timeout)
            except BaseException:
                for worker in list(active):  # their late answers must not reach the next call
                    self._discard(worker, kill=True)
                raise
        return [r if r is not None else env.failed_feedback("episode was not run") for r in results]

    def _assign(
        self, jobs: deque[int], active: dict[_Worker, list[Any]], workers: int, tasks: Sequence[Task],
        texts: Sequence[str],
    ) -> None:
        idle = [w for w in self._workers if w not in active]
        while jobs and len(active) < workers:
            index = jobs[0]
            worker = idle.pop() if idle else None
            fresh = worker is None
            if worker is None:
                worker = _Worker()
                self._workers.append(worker)
            try:
                if worker.generation != self._generation:
                    worker.outbox.send(("env", self._blob))
                    worker.generation = self._generation
                worker.outbox.send(("run", index, dict(tasks[index]), texts[index]))
            except OSError as exc:  # it died while idle (e.g. the OOM killer): replace it once
                code = worker.process.poll()
                self._discard(worker, kill=True)
                if fresh:
                    raise EnvironmentSetupError(f"a new worker process exited at startup (exit code {code})") from exc
                continue
            jobs.popleft()
            active[worker] = [index, None, time.monotonic()]

    def _receive(
        self, env: Environment, active: dict[_Worker, list[Any]], results: list[Feedback | None],
        timeout: float | None,
    ) -> None:
        if not active:
            return
        now = time.monotonic()
        deadlines = [
            (assigned + STARTUP_TIMEOUT) if started is None else (started + timeout if timeout is not None else None)
            for _, started, assigned in active.values()
        ]
        finite = [d for d in deadlines if d is not None]
        wait_for = max(0.0, min(finite) - now) + 0.001 if finite else None
        by_inbox = {w.inbox: w for w in active}
        for inbox in wait(list(by_inbox), timeout=wait_for):
            worker = by_inbox[inbox]  # type: ignore[index]
            try:
                while worker in active and worker.inbox.poll():
                    self._handle(env, worker, worker.inbox.recv(), active, results)
            except (EOFError, OSError):
                index = active.pop(worker)[0]
                code = worker.process.wait()
                results[index] = env.failed_feedback(f"the worker process died (exit code {code})", crashed=True)
                self._discard(worker, kill=True)

    def _handle(
        self, env: Environment, worker: _Worker, message: tuple[Any, ...], active: dict[_Worker, list[Any]],
        results: list[Feedback | None],
    ) -> None:
        kind = message[0]
        if kind == "started":
            active[worker][1] = time.monotonic()
        elif kind == "done":
            _, index, feedback, failed = message
            results[index] = feedback
            del active[worker]
            if failed:
                env._note_failure()
        elif kind == "invalid":
            del active[worker]
            raise InvalidResultError(message[2])
        elif kind == "load_error":
            del active[worker]
            self._discard(worker, kill=True)
            raise EnvironmentSetupError(f"{env.label}: a worker process could not load the environment:\n{message[1]}")

    def _enforce_timeouts(
        self, env: Environment, active: dict[_Worker, list[Any]], results: list[Feedback | None],
        timeout: float | None,
    ) -> None:
        now = time.monotonic()
        for worker, (index, started, assigned) in list(active.items()):
            if started is None and now - assigned > STARTUP_TIMEOUT:
                raise EnvironmentSetupError(
                    f"{env.label}: a worker process did not start within {STARTUP_TIMEOUT:g} s")
            if started is not None and timeout is not None and now - started > timeout:
                del active[worker]
                self._discard(worker, kill=True)
                results[index] = env.failed_feedback(f"episode timed out after {timeout:g} s", timed_out=True)


def worker_main(inbox_fd: int, outbox_fd: int) -> None:
    """The worker loop: load the environment when sent, score episodes one at a time until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us if needed
    inbox = Connection(inbox_fd, writable=False)
    outbox = Connection(outbox_fd, readable=False)
    env: Environment | None = None
    load_error = "no environment was sent"
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message[0] == "env":
            try:
                env = pickle.loads(message[1])
            except BaseException:
                env, load_error = None, traceback.format_exc()
            continue
        _, index, task, text = message
        if env is None:
            outbox.send(("load_error", load_error))
            continue
        outbox.send(("started", index))
        try:
            feedback, failed = env._score_one(task, text)
        except InvalidResultError as exc:
            outbox.send(("invalid", index, str(exc)))
            continue
        try:
            outbox.send(("done", index, feedback, failed))
        except Exception as exc:  # unpicklable details: report the episode as failed, keep the worker
            reason = f"the result could not be sent back: {type(exc).__name__}: {exc}"
            outbox.send(("done", index, env.failed_feedback(reason), True))

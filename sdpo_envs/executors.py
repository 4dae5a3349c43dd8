"""The concurrency engine: how an environment's episodes run at once (threads, one event loop, or
persistent worker processes), and how a single call is bounded in time.

`sdpo_envs.env.Environment` decides *what* an episode is and what a failure is worth; this module only
runs episodes, through the small `Scorer` protocol, and never imports `env`.

Threads (`run_in_threads`): daemon threads pull episodes from a queue. A thread cannot be killed, so one
stuck past the timeout is abandoned and replaced, and the remaining episodes still run.

Processes (`WorkerPool`). Why not `ProcessPoolExecutor`: TRL calls a reward function every step, so a
pool must outlive one `evaluate` call, yet an episode past its timeout must be killed without losing the
other workers, and the clock must start when the episode starts (not while it waits in the executor's
call queue or while a fresh worker imports things). Why not `multiprocessing` at all: its spawn and
forkserver children re-import the parent's `__main__`, i.e. the training script with torch and TRL, in
every worker. A worker here is `python -c` running `worker_main`, which imports `sdpo_envs` and whatever
unpickling the environment needs, nothing else. The price: the environment's class must be importable
by name (defined in a module, not in `__main__`).

Protocol over two pipes, one `multiprocessing.connection.Connection` each way:
parent → worker `("env", blob)` (only when the pickled environment changed) and
`("run", index, task, text)`; worker → parent `("started", index)`, then `("done", index, feedback,
failed)`, `("invalid", index, message)` or `("load_error", traceback)`. The parent only writes to an
idle worker, and an idle worker only reads, so neither side can block the other on a full pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol, TypeVar

from sdpo_envs.types import EnvironmentSetupError, Feedback, InvalidResultError, Task

T = TypeVar("T")

POLL_SECONDS = 0.05  # how late a thread episode's timeout may be noticed
# Booting Python, importing sdpo_envs and unpickling the environment (which imports its plugin).
STARTUP_TIMEOUT = 120.0
_BOOT = "import sys; from sdpo_envs.executors import worker_main; worker_main(int(sys.argv[1]), int(sys.argv[2]))"


class Scorer(Protocol):
    """What the engine needs from an environment (`sdpo_envs.Environment` is one)."""

    @property
    def label(self) -> str: ...

    def score(self, task: Task, completion: str) -> Feedback | Awaitable[Feedback]: ...

    def _score_one(self, task: Task, completion: str) -> tuple[Feedback, bool]:
        """One episode's feedback and whether it failed; the environment's failure policy applied."""
        ...

    def failed_feedback(self, reason: str, **details: Any) -> Feedback: ...

    def _note_failure(self, count: int = 1) -> None: ...


class Executor(Protocol):
    """Runs an environment's episodes somewhere else than this process's threads and worker processes (e.g.
    `sdpo_envs.ray_executor.RayExecutor`); set as `Environment.executor`."""

    def run(self, env: Scorer, tasks: Sequence[Task], texts: Sequence[str], workers: int | None,
            timeout: float | None) -> list[Feedback]:
        """Every episode's feedback, in order; `workers` is the environment's `max_workers` (`None`: unset)."""
        ...

    def close(self) -> None: ...


def timed_out(scorer: Scorer, timeout: float) -> Feedback:
    """The failed feedback of an episode that ran past `timeout` seconds."""
    return scorer.failed_feedback(f"episode timed out after {timeout:g} s", timed_out=True)


# ------------------------------------------------------------------------------------------ threads
def run_in_threads(
    scorer: Scorer, tasks: Sequence[Task], texts: Sequence[str], workers: int, timeout: float | None
) -> list[Feedback]:
    """Score every episode on at most `workers` daemon threads (plus replacements of stuck ones).

    A thread stuck past the timeout is abandoned and replaced, so the remaining episodes still run, and
    it cannot block interpreter exit (executor threads would). `InvalidResultError` from any episode is
    re-raised here, in the caller's thread.
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(tasks)):
        todo.put(i)
    finished: queue.SimpleQueue[tuple[int, Feedback | None, BaseException | None]] = queue.SimpleQueue()
    started: dict[int, float] = {}  # the timeout counts from here, not from submission
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            started[i] = time.monotonic()
            try:
                finished.put((i, scorer._score_one(tasks[i], texts[i])[0], None))
            except BaseException as exc:  # InvalidResultError: re-raised in the caller's thread
                finished.put((i, None, exc))

    def spawn() -> None:
        threading.Thread(target=work, name=f"sdpo-env-{scorer.label}", daemon=True).start()

    for _ in range(workers):
        spawn()
    results: list[Feedback | None] = [None] * len(tasks)
    remaining = len(tasks)
    try:
        while remaining:
            try:
                i, feedback, error = finished.get(timeout=None if timeout is None else POLL_SECONDS)
            except queue.Empty:
                pass
            else:
                if results[i] is None:  # else it already timed out
                    if error is not None:
                        raise error
                    results[i], remaining = feedback, remaining - 1
            if timeout is None:
                continue
            now = time.monotonic()
            for i, began in list(started.items()):
                if results[i] is None and now - began > timeout:
                    results[i] = timed_out(scorer, timeout)
                    remaining -= 1
                    spawn()
    finally:
        stop.set()
    return [r if r is not None else scorer.failed_feedback("episode was not run") for r in results]


def call_with_timeout(fn: Callable[[], T], timeout: float | None, name: str) -> T:
    """`fn()`, or `TimeoutError` once it has run `timeout` seconds (it is then abandoned on a daemon thread).

    For calls into code that may hang and cannot be killed (a plugin's method): the caller goes on.
    """
    if timeout is None:
        return fn()
    outcome: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def run() -> None:
        try:
            outcome.put((True, fn()))
        except BaseException as exc:
            outcome.put((False, exc))

    threading.Thread(target=run, name=f"sdpo-{name}", daemon=True).start()
    try:
        ok, value = outcome.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"{name} did not return within {timeout:g} s") from None
    if not ok:
        raise value
    result: T = value
    return result


# ---------------------------------------------------------------------------------------- event loop
async def run_async(
    scorer: Scorer, tasks: Sequence[Task], texts: Sequence[str], workers: int | None, timeout: float | None
) -> list[Feedback]:
    """Score every episode of an `async def score` environment on one event loop, `workers` at a time."""
    limit = asyncio.Semaphore(workers or len(tasks))

    async def one(i: int) -> Feedback:
        async with limit:
            try:
                return await asyncio.wait_for(_score_one_async(scorer, tasks[i], texts[i]), timeout)
            except TimeoutError:
                assert timeout is not None
                return timed_out(scorer, timeout)

    return list(await asyncio.gather(*(one(i) for i in range(len(tasks)))))


async def _score_one_async(scorer: Scorer, task: Task, completion: str) -> Feedback:
    try:
        result = scorer.score(task, completion)
        if inspect.isawaitable(result):
            result = await result
    except InvalidResultError:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return scorer.failed_feedback(reason, traceback=traceback.format_exc(limit=5))
    if not isinstance(result, Feedback):
        raise InvalidResultError(f"{scorer.label}.score() returned {type(result).__name__}, expected Feedback")
    return result


# ----------------------------------------------------------------------------------------- processes
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
        self, env: Scorer, tasks: Sequence[Task], texts: Sequence[str], workers: int, timeout: float | None
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
        self, env: Scorer, active: dict[_Worker, list[Any]], results: list[Feedback | None],
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
        self, env: Scorer, worker: _Worker, message: tuple[Any, ...], active: dict[_Worker, list[Any]],
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
        self, env: Scorer, active: dict[_Worker, list[Any]], results: list[Feedback | None],
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
                results[index] = timed_out(env, timeout)


def worker_main(inbox_fd: int, outbox_fd: int) -> None:
    """The worker loop: load the environment when sent, score episodes one at a time until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us if needed
    inbox = Connection(inbox_fd, writable=False)
    outbox = Connection(outbox_fd, readable=False)
    env: Scorer | None = None
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

"""Long-lived sandboxes that run one solution after another (the harness's ``--serve`` mode).

Why: building a sandbox and starting an interpreter costs ~45 ms a solution, more than judging a short
solution. A served sandbox pays it once; each solution then runs in a worker forked from a PID 1 that never
runs model code. Everything but /tmp, /dev/shm and /dev/mqueue is read-only (see `bwrap`), and after each
solution PID 1 kills every other process of the namespace, empties those three directories, restores their
modes, deletes System V IPC objects and empties the keyrings that outlive a process before it reports
``exit``: the next solution finds the sandbox as a fresh one would be.

A sandbox is discarded, never reused, once anything went wrong with it (a deadline kill, a flood, a harness
error, a missing ``exit``). Each sandbox holds one leased host uid (as root) for its whole life.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import queue
import secrets
import subprocess
import threading
import weakref
from collections.abc import Callable
from typing import Any

from sdpo_code.sandbox import _system
from sdpo_code.sandbox._driver import drive
from sdpo_code.sandbox._harness import TOKEN_LINE_BYTES
from sdpo_code.sandbox.base import ExecutionRequest, ExecutionResult


class _Spawner:
    """Starts sandboxes from one thread that lives as long as the process.

    bwrap's ``--die-with-parent`` is ``PR_SET_PDEATHSIG``, which fires when the *thread* that started it
    exits, and the environment scores every batch on new threads: a sandbox started from one of them would
    die with it.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # also after a fork of this process
                self._thread = threading.Thread(target=self._loop, name="sdpo-code-spawner", daemon=True)
                self._thread.start()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


_spawner = _Spawner()


class ServedSandbox:
    """One running sandbox in serve mode and the uid it holds."""

    def __init__(self, argv: list[str], switch_uid: bool) -> None:
        self._owner = os.getpid()
        self._leases = contextlib.ExitStack()
        self.uid: int | None = self._leases.enter_context(_system.sandbox_uid(switch_uid))
        try:
            self.proc: subprocess.Popen[bytes] = _spawner.call(lambda: _system.start_session(argv, self.uid))
        except BaseException:
            self._leases.close()
            raise
        self.healthy = True
        self._pipe_bytes = _widen_pipe(self.proc.stdin.fileno()) if self.proc.stdin is not None else 0

    def run(self, request: ExecutionRequest, payload: bytes) -> ExecutionResult:
        """Run one solution; on anything unusual the sandbox marks itself unhealthy (the pool drops it)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        token = secrets.token_hex((TOKEN_LINE_BYTES - 1) // 2)  # PID 1 reads exactly one such line
        stdin = self.proc.stdin

        def write(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        data = payload + token.encode() + b"\n"
        # Between runs the pipe is empty and PID 1 reads a whole request before anything writes back, so a
        # request that fits in the pipe is written at once.
        result = drive(request, data, write, self.proc.stdout.fileno(), self._kill,
                       lambda: self.proc.poll() is not None, token=token, write_blocks=len(data) > self._pipe_bytes)
        if result.killed or result.harness_error or result.exit is None:
            self._kill()
        return result

    def _kill(self) -> None:
        self.healthy = False
        self.close()

    def close(self) -> None:
        """Stop the sandbox and give its uid back (idempotent). An idle one is asked to stop (end of input:
        its PID 1 exits and the kernel ends the namespace); one that is mid-run or stuck is killed."""
        idle, self.healthy = self.healthy, False
        if os.getpid() != self._owner:  # a forked copy (e.g. collected in a child): the sandbox is the parent's
            return
        if idle and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
        _system.kill_session(self.proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        self._leases.close()


class SandboxPool:
    """Idle served sandboxes, one per concurrent caller at most; thread-safe.

    `make` builds a new `ServedSandbox`. A caller takes an idle sandbox (or makes one), runs, and puts it back
    if it is still healthy. A sandbox found dead before its run is replaced once, without blaming the
    solution.
    """

    def __init__(self, make: Callable[[], ServedSandbox]) -> None:
        self._make = make
        self._idle: list[ServedSandbox] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.started = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_all, self._idle)

    def _take(self, idle_ok: bool = True) -> tuple[ServedSandbox, bool]:
        """An idle sandbox (when `idle_ok`) or a new one, and whether it was reused."""
        with self._lock:
            if self._pid != os.getpid():  # a forked copy of the pool: those sandboxes belong to the parent
                self._idle.clear()
                self._pid = os.getpid()
            while idle_ok and self._idle:
                box = self._idle.pop()
                if box.proc.poll() is None:
                    return box, True
                box.close()
            self.started += 1
        return self._make(), False

    def run(self, request: ExecutionRequest, payload: bytes) -> ExecutionResult:
        box, reused = self._take()
        result = box.run(request, payload)
        if reused and not result.ready and result.harness_error:  # it died while idle: not the solution's doing
            box, _ = self._take(idle_ok=False)
            result = box.run(request, payload)
        with self._lock:
            keep = box.healthy and not self._closed
            if keep:
                self._idle.append(box)
        if not keep:
            box.close()
        return result

    def close(self) -> None:
        """Stop every idle sandbox (busy ones stop when their run ends and they find the pool closed)."""
        with self._lock:
            self._closed = True
            _close_all(self._idle)


def _close_all(boxes: list[ServedSandbox]) -> None:
    while boxes:
        boxes.pop().close()


def _widen_pipe(fd: int, size: int = 1 << 20) -> int:
    """Ask for a `size`-byte pipe (the unprivileged maximum by default); the capacity it has."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    except OSError:
        return 0

"""Reads the harness's protocol from a running sandbox and enforces the wall-clock backstops.

Why here and not in the harness: the harness shares a process with the submitted program, which can disable
timers or hang in C code. The trainer side only trusts what it measures itself: a start-up deadline until
``ready``, a per-test deadline from each ``start`` event, a whole-run deadline, and a cap on bytes read.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from sdpo_code.sandbox.base import ExecutionRequest, ExecutionResult

logger = logging.getLogger(__name__)

_GRACE = 2.0  # seconds past the harness's own wall timer before the trainer kills the sandbox
_BETWEEN_TESTS = 10.0  # harness bookkeeping between two tests


class _Events:
    """Accumulates protocol events."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.ready: dict[str, Any] | None = None
        self.results: dict[int, dict[str, Any]] = {}
        self.started: list[int] = []
        self.compile_error: dict[str, Any] | None = None
        self.exit: dict[str, Any] | None = None
        self.harness_error: str | None = None
        self.done = False
        self.garbage = 0

    def feed(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            msg = json.loads(line)
            ev = msg["ev"]
        except (ValueError, KeyError, TypeError):
            self.garbage += 1  # the program wrote on our channel; it cannot forge a pass, so ignore it
            return
        if ev == "exit" and self.token is not None and msg.get("token") != self.token:
            self.garbage += 1  # a forged end of run: only the served sandbox's PID 1 knows the token
            return
        if ev == "ready" and self.ready is None:
            self.ready = msg
        elif self.ready is None and ev in ("harness_error", "setup_failed"):
            self.harness_error = str(msg.get("reason", ev))
        elif self.ready is None:
            if ev == "exit":
                self.exit = msg
        elif ev == "start" and isinstance(msg.get("i"), int):
            self.started.append(msg["i"])
        elif ev == "result" and isinstance(msg.get("i"), int):
            self.results[msg["i"]] = msg
        elif ev == "compile_error":
            self.compile_error = msg
        elif ev == "exit":
            self.exit = msg
        elif ev == "done":
            self.done = True


def drive(
    request: ExecutionRequest,
    payload: bytes,
    write_stdin: Callable[[bytes], None],
    read_fd: int,
    kill: Callable[[], None],
    finished: Callable[[], bool],
    token: str | None = None,
    write_blocks: bool = True,
) -> ExecutionResult:
    """Feed `payload`, read events from `read_fd` until EOF, kill on any deadline; never raises for the program.

    `finished` says whether the sandbox process is gone (used after EOF). With `token` (a served sandbox,
    see `_reuse`), only an ``exit`` event carrying it ends the run, and a run that ended that way leaves the
    sandbox running. `write_blocks=False` says the payload fits in the pipe, so it is written before reading
    (no writer thread: starting one cost ~5 ms a solution).
    """
    t0 = time.monotonic()
    events = _Events(token)
    writer_error: list[BaseException] = []

    def _write() -> None:
        try:
            write_stdin(payload)
        except (BrokenPipeError, ConnectionError, OSError) as exc:
            writer_error.append(exc)

    writer: threading.Thread | None = None
    if write_blocks:  # the sandbox may write (and block on a full pipe) before it has read everything
        writer = threading.Thread(target=_write, name="sdpo-code-stdin", daemon=True)
        writer.start()
    else:
        _write()
    read_cap = len(request.inputs) * (request.output_bytes * 2 + (1 << 20)) + (32 << 20)
    n_read = 0
    buf = bytearray()
    killed: str | None = None
    startup_seconds = 0.0
    deadline = t0 + request.startup_timeout
    run_deadline: float | None = None
    sel = selectors.DefaultSelector()
    os.set_blocking(read_fd, False)
    sel.register(read_fd, selectors.EVENT_READ)
    try:
        while True:
            now = time.monotonic()
            limit = deadline if run_deadline is None else min(deadline, run_deadline)
            if now >= limit:
                if events.ready is None:
                    killed = "startup"
                elif run_deadline is not None and now >= run_deadline:
                    killed = "task_wall"
                else:
                    killed = "wall"
                kill()
                break
            if not sel.select(timeout=min(0.5, limit - now)):
                continue
            try:
                chunk = os.read(read_fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                break
            n_read += len(chunk)
            if n_read > read_cap:
                killed = "flood"
                kill()
                break
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                was_ready = events.ready is not None
                n_before = len(events.started)
                results_before = len(events.results)
                events.feed(line)
                now = time.monotonic()
                if events.ready is not None and not was_ready:
                    startup_seconds = now - t0
                    run_deadline = now + request.total_wall_limit
                    deadline = now + _BETWEEN_TESTS
                if len(events.started) > n_before:
                    index = events.started[-1]
                    wall = request.wall_limits[max(0, min(index, len(request.wall_limits) - 1))]
                    deadline = now + wall + _GRACE
                elif len(events.results) > results_before:
                    deadline = now + _BETWEEN_TESTS
            if events.exit is not None:
                break
    finally:
        sel.close()
    if buf.strip():
        events.feed(bytes(buf))
    served_on = token is not None and killed is None and events.exit is not None
    if not served_on and killed is None and not finished():
        # EOF without the process going away (closed fds): give it a moment, then kill.
        end = time.monotonic() + 2.0
        while not finished() and time.monotonic() < end:
            time.sleep(0.01)
    if not served_on:
        kill()
    if writer is not None:
        writer.join(timeout=1.0)
    harness_error = events.harness_error
    if events.ready is None and harness_error is None:
        if killed == "startup":
            harness_error = f"sandbox did not start within {request.startup_timeout:g} s"
        elif writer_error:
            harness_error = f"could not send the payload: {writer_error[0]}"
        else:
            harness_error = f"sandbox exited before the harness was ready ({events.exit or 'no status'})"
    return ExecutionResult(
        ready=events.ready is not None,
        results=events.results,
        compile_error=events.compile_error,
        started=tuple(events.started),
        exit=events.exit,
        killed=killed,
        harness_error=harness_error,
        done=events.done,
        seconds=time.monotonic() - t0,
        startup_seconds=startup_seconds,
        info={"garbage_lines": events.garbage, **(events.ready or {})},
    )

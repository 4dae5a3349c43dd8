"""Reads the harness's protocol from a running sandbox and enforces the whole-run wall-clock budget.

Only the harness's supervisor and judge hold the channel read here (the worker that runs the program has no
descriptor of it), so every event is the harness's own. The trainer side still bounds what it spends: a
start-up deadline until ``ready``, then one wall budget for the whole submission fixed at ``ready`` (no event
extends it; the judge enforces each test's limits inside), a cap on bytes read, and a test's stdout arrives
as raw bytes of a length the line states, decoded once here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from sdpo_code.sandbox._system import kill_session
from sdpo_code.sandbox.base import ExecutionRequest, ExecutionResult

logger = logging.getLogger(__name__)


class _Events:
    """Accumulates protocol events. `feed` returns how many raw stdout bytes follow the line (a ``result``
    carries them), which the caller hands back through `attach_stdout`."""

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
        self._awaiting: dict[str, Any] | None = None

    def feed(self, line: bytes) -> int:
        if not line.strip():
            return 0
        try:
            msg = json.loads(line)
            ev = msg["ev"]
        except (ValueError, KeyError, TypeError):
            self.garbage += 1
            return 0
        if ev == "exit" and self.token is not None and msg.get("token") != self.token:
            self.garbage += 1  # an exit of another run (only the served sandbox's PID 1 knows the token)
            return 0
        if ev == "judge_error":
            self.harness_error = str(msg.get("reason", ev))
        elif ev == "ready" and self.ready is None:
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
            raw = msg.get("stdout_raw", 0)
            if isinstance(raw, int) and raw > 0:
                self._awaiting = msg
                return raw
        elif ev == "compile_error":
            self.compile_error = msg
        elif ev == "exit":
            self.exit = msg
        elif ev == "done":
            self.done = True
            garbage = msg.get("garbage", 0)
            self.garbage += garbage if isinstance(garbage, int) else 0
        return 0

    def attach_stdout(self, raw: bytes) -> None:
        """The raw stdout that followed the last ``result`` line, decoded once (bounded by the output cap)."""
        if self._awaiting is not None:
            self._awaiting["stdout"] = raw.decode("utf-8", errors="replace")
            self._awaiting = None


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
    # every result may carry a whole stdout (raw) and a few KiB of JSON; anything beyond is not the harness
    read_cap = (len(request.inputs) + 1) * (request.limits.output_bytes + (1 << 20)) + (32 << 20)
    n_read = 0
    buf = bytearray()
    scanned = 0  # bytes of `buf` known to hold no newline: each byte is searched once
    raw_left = 0  # raw stdout bytes still to come for the last result
    killed: str | None = None
    startup_seconds = 0.0
    deadline = t0 + request.startup_timeout
    sel = selectors.DefaultSelector()
    os.set_blocking(read_fd, False)
    sel.register(read_fd, selectors.EVENT_READ)
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                killed = "startup" if events.ready is None else "task_wall"
                kill()
                break
            if not sel.select(timeout=min(0.5, deadline - now)):
                continue
            try:
                chunk = os.read(read_fd, 1 << 20)
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
                if raw_left:
                    if len(buf) < raw_left:
                        break
                    events.attach_stdout(bytes(buf[:raw_left]))
                    del buf[:raw_left]
                    raw_left = scanned = 0
                nl = buf.find(b"\n", scanned)
                if nl < 0:
                    scanned = len(buf)
                    break
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                scanned = 0
                was_ready = events.ready is not None
                raw_left = min(events.feed(line), request.limits.output_bytes + 1)
                if events.ready is not None and not was_ready:  # the budget is fixed once, here
                    startup_seconds = time.monotonic() - t0
                    deadline = t0 + startup_seconds + request.total_wall_limit
            if events.exit is not None:
                break
    finally:
        sel.close()
    if buf.strip() and not raw_left:
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


def drive_popen(proc: subprocess.Popen[bytes], request: ExecutionRequest, payload: bytes) -> ExecutionResult:
    """Run the protocol over a Popen's pipes (the local backends' sandboxes); kill its whole session at the end."""
    assert proc.stdin is not None
    assert proc.stdout is not None

    def write(data: bytes) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    kill = functools.partial(kill_session, proc)
    try:
        result = drive(request, payload, write, proc.stdout.fileno(), kill, lambda: proc.poll() is not None)
    finally:
        kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        proc.stdout.close()
    return result

"""Answer equivalence: a fast path in pure Python, then math-verify in a pool of worker processes.

Why a pool of processes and not threads: math-verify's timeouts need the main thread (see
`sdpo_math._worker`), and TRL calls async reward functions from a daemon thread. A worker process
checks in its own main thread under a budget; the caller waits with an outer wall-clock timeout and
kills and replaces a worker that does not answer. So `MathChecker.check` is safe from any thread,
an asyncio loop, or an `Environment.evaluate` thread pool, and always returns within about
`timeout` seconds once a worker is up.

Why a fast path: most RL answers are plain numbers. Equal strings, and plain numbers compared
exactly (`Fraction`), need no sympy; distinct integers are distinct for math-verify too. Decimals
that differ go to math-verify, whose rounding tolerance (`float_rounding`) decides.

Why a magnitude rule (`sdpo_math.magnitude`): a numeric answer like `10^{10^{10}}` or `(10^9)!` would
make sympy build a number with billions of digits, uninterruptibly. Its size is bounded cheaply
instead; when the sizes of answer and gold are far apart the answer is wrong at once; two exact
powers (`10^{10^{10}}`, `100^{5 \\cdot 10^9}`) are compared as powers; and when neither decides but a
side is too large for sympy, the check abstains at once instead of timing out.

Time bounds: one check takes at most about `timeout` seconds once a worker is up; a check given a
`deadline` (a batch's budget, see `MathEnvironment`) neither waits for a worker nor runs past it.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from sdpo_math.magnitude import SYMPY_LOG10_LIMIT, Num, largest_part, magnitude_verdict, parse_numeric

logger = logging.getLogger(__name__)

Outcome = Literal["equal", "different", "unparsable", "timeout", "error"]

_WORKER_FILE = Path(__file__).with_name("_worker.py")
# Run the worker file by path: the package's own imports (sdpo_envs, datasets) are not needed there, and
# dropping "" keeps the caller's working directory from shadowing modules.
_WORKER_BOOT = (
    "import runpy, sys; sys.path[:] = [p for p in sys.path if p]; "
    "runpy.run_path(sys.argv[1], run_name='__main__')"
)
MAX_ANSWER_CHARS = 4000
"""Longer answers are not sent to sympy (they are reported as unparsable, unless the fast path decides)."""


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one gold/answer comparison.

    Args:
        outcome (`str`): `"equal"`, `"different"`, `"unparsable"` (the answer is not a math expression
            and differs from the gold as a string), `"timeout"` or `"error"` (the checker failed: abstain).
        by (`str`): what decided: `"fast"` (string or exact number), `"magnitude"` (sizes alone),
            `"math_verify"`, `"cache"`, or `"budget"` (the batch's time budget was used up first).
        seconds (`float`): time spent, including waiting for a worker.
        details (`dict`): parsed forms and free symbols of both sides (`gold_parsed`, `answer_parsed`,
            `gold_symbols`, `answer_symbols`, `gold_ok`), or `error`.
    """

    outcome: Outcome
    by: str
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return self.outcome == "equal"


# ---------------------------------------------------------------------------------------- fast path
_SPACING_RE = re.compile(r"\\[,;:! ]|~")
_GROUP_RE = re.compile(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3})")
_INT_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")
_DEC_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?\.\d+|[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)\.?")


def normalize(text: str) -> str:
    """A light, meaning-preserving normal form for string comparison (never sent to math-verify)."""
    s = text.strip().replace("−", "-")
    s = _GROUP_RE.sub(",", s)  # 1{,}000 and 1\,000 -> 1,000
    s = _SPACING_RE.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    if s.startswith("\\$"):
        s = s[2:]
    while True:
        stripped = s.strip("$ ").rstrip(".").strip()
        if stripped == s:
            break
        s = stripped
    # Spaces carry no meaning in math, except between digits ("2 3" is not 23).
    return re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", s)


_UNIT_WORDS_RE = re.compile(r"(?P<number>\S+)(?:\s+[A-Za-z]{3,}\.?){1,3}")
_NOT_UNITS = frozenset({"and", "or", "percent", "sqrt", "log", "sin", "cos", "tan", "exp", "mod", "times", "plus",
                        "minus", "over", "degrees", "degree", "pi", "infinity", "undefined"})


def _drop_unit_words(s: str) -> str:
    """`7 dollars` -> `7`: math-verify strips the units it knows and reads other words as products of
    symbols (`7*a*do*l*l*r*s`), which would fail a right answer to a word problem."""
    m = _UNIT_WORDS_RE.fullmatch(s)
    if m is None or _plain_number(normalize(m.group("number"))) is None:
        return s
    if any(word.lower().rstrip(".") in _NOT_UNITS for word in s.split()[1:]):
        return s
    return m.group("number")


def _plain_number(s: str) -> tuple[str, bool] | None:
    """`(digits, is_integer)` for a plain decimal number (commas removed), else `None`."""
    if _INT_RE.fullmatch(s):
        return s.replace(",", ""), True
    if _DEC_RE.fullmatch(s):
        return s.replace(",", "").rstrip("."), False
    return None


def _canonical_int(s: str) -> str:
    """Integer string without sign noise or leading zeros; never `int()` (4300-digit limit)."""
    negative = s.startswith("-")
    digits = s.lstrip("+-").lstrip("0") or "0"
    return ("-" if negative and digits != "0" else "") + digits


def fast_compare(gold: str, answer: str) -> Outcome | None:
    """Decide without sympy when that is safe, else `None` (ask math-verify)."""
    g, a = normalize(gold), normalize(answer)
    if not g or not a:
        return None
    if g == a:
        return "equal"
    gn = _plain_number(normalize(_drop_unit_words(gold.strip())))
    an = _plain_number(normalize(_drop_unit_words(answer.strip())))
    if gn is None or an is None:
        return None
    (g_digits, g_int), (a_digits, a_int) = gn, an
    if g_int and a_int:
        return "equal" if _canonical_int(g_digits) == _canonical_int(a_digits) else "different"
    try:
        if Fraction(g_digits) == Fraction(a_digits):
            return "equal"
    except (ValueError, ZeroDivisionError):  # huge decimals: let math-verify decide
        return None
    return None  # unequal decimals: math-verify's rounding tolerance decides


@functools.lru_cache(maxsize=4096)
def numeric_value(text: str) -> Num | None:
    """The value or size bounds of a numeric answer (`1,000` and `7 dollars` as the fast path reads them)."""
    plain = _plain_number(normalize(_drop_unit_words(text.strip())))
    if plain is not None:
        return parse_numeric(plain[0])
    return parse_numeric(normalize(text))


def _log10_range(value: Num | None) -> list[float | str] | str | None:
    """Bounds on log10|value| for the details (JSON-safe: `"inf"`), `"zero"`, `"unknown"`, or `None` (not numeric)."""
    if value is None:
        return None
    if not value.known:
        return "unknown"
    if value.is_zero:
        return "zero"
    return [bound if math.isfinite(bound) else str(bound) for bound in (value.lo, value.hi)]


def magnitude_compare(gold: str, answer: str) -> CheckResult | None:
    """A verdict from sizes alone when a side is too large to compute (see `sdpo_math.magnitude`), else `None`."""
    started = time.perf_counter()
    gold_value, answer_value = numeric_value(gold), numeric_value(answer)
    if answer_value is None:  # not a number: abstain only if sympy would have to build a huge one inside it
        peak = largest_part(normalize(answer))
        if peak <= SYMPY_LOG10_LIMIT:
            return None
        return CheckResult("timeout", "magnitude", time.perf_counter() - started,
                           {"error": f"the answer holds a number too large to evaluate (about 10^{peak:.3g} or more)"})
    verdict = magnitude_verdict(gold_value, answer_value)
    if verdict is None:
        return None
    details: dict[str, Any] = {"gold_log10": _log10_range(gold_value), "answer_log10": _log10_range(answer_value)}
    seconds = time.perf_counter() - started
    if verdict in ("equal", "different"):
        return CheckResult(verdict, "magnitude", seconds, details)
    return CheckResult("timeout", "magnitude", seconds,
                       {**details, "error": "a side is too large to evaluate and sizes alone do not decide"})


# ------------------------------------------------------------------------------------ worker pool
class _Worker:
    """One worker process and its JSON-lines pipes."""

    def __init__(self, startup_timeout: float) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(_WORKER_FILE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # terminal signals are for the trainer; we close the worker ourselves
        )
        self._buffer = b""
        self._next_id = 0
        self.startup_timeout = startup_timeout
        self.ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_line(self, deadline: float) -> dict[str, Any] | None:
        """The next message, or `None` if the deadline passes first. Raises `EOFError` if the worker died."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError(f"checker worker {self.pid} exited with code {self.proc.poll()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self) -> None:
        if self.ready:
            return
        message = self._read_line(time.monotonic() + self.startup_timeout)
        if message is None or not message.get("ready"):
            raise RuntimeError(f"checker worker {self.pid} did not start within {self.startup_timeout:g} s")
        self.ready = True

    def request(self, payload: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Send one check; its reply, or `None` when `timeout` passes."""
        assert self.proc.stdin is not None
        self._next_id += 1
        payload = {**payload, "id": self._next_id}
        self.proc.stdin.write((json.dumps(payload) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._read_line(time.monotonic() + timeout)
        if reply is not None and reply.get("id") != self._next_id:
            raise RuntimeError(f"checker worker {self.pid} answered request {reply.get('id')}, not {self._next_id}")
        return reply

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception as exc:  # already gone
            logger.debug("killing checker worker %s: %s", self.pid, exc)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Ask politely (close stdin), then kill."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except Exception:
            self.kill()
        else:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


class CheckerPool:
    """A small, lazily started pool of math-verify worker processes, safe to use from any thread.

    Args:
        max_workers (`int`, *optional*): processes at most; started on demand. Defaults to
            `min(2, cpu_count)`: checks are cheap next to generation.
        startup_timeout (`float`, *optional*, defaults to `120`): seconds a new worker may take to
            import sympy and math-verify (not counted against a check's timeout).
    """

    def __init__(self, max_workers: int | None = None, startup_timeout: float = 120.0) -> None:
        self.max_workers = max(1, max_workers or min(2, os.cpu_count() or 1))
        self.startup_timeout = startup_timeout
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()  # LIFO: the warmest worker first
        self._started = 0
        self._all: set[_Worker] = set()
        self._pid = os.getpid()
        self.replaced = 0
        """How many workers were killed on a timeout or crash (for tests and logs)."""

    def _forked(self) -> None:
        # A forked child inherits our pipes; talking through them would interleave with the parent.
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._idle = queue.LifoQueue()
                self._started = 0
                self._all = set()

    def _take_idle(self, wait: float | None) -> _Worker | None:
        """A live idle worker, waiting up to `wait` seconds (`None`: do not wait)."""
        try:
            worker = self._idle.get_nowait() if wait is None else self._idle.get(timeout=wait)
        except queue.Empty:
            return None
        if worker.proc.poll() is None:
            return worker
        self._discard(worker)  # died while idle (OOM killer, a stray signal)
        return None

    def _acquire(self, deadline: float | None = None) -> _Worker | None:
        """An idle worker, a new one while under `max_workers`, else wait for one to come back
        (`None` if `deadline`, a `time.monotonic()` value, passes first)."""
        self._forked()
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            worker = self._take_idle(None)
            if worker is not None:
                return worker
            with self._lock:
                start = self._started < self.max_workers
                if start:
                    self._started += 1
            if start:
                try:
                    worker = _Worker(self.startup_timeout)
                except Exception:
                    with self._lock:
                        self._started -= 1
                    raise
                with self._lock:
                    self._all.add(worker)
                return worker
            # Poll rather than block: a busy worker may be discarded instead of released, freeing a slot.
            worker = self._take_idle(0.05)
            if worker is not None:
                return worker

    def _release(self, worker: _Worker) -> None:
        self._idle.put(worker)

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            self._started -= 1
            self.replaced += 1

    def check(
        self,
        gold: str,
        answer: str,
        *,
        timeout: float,
        budget: float | None = None,
        options: dict[str, Any] | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """One math-verify comparison in a worker; `{"timeout": True}` or `{"error": ...}` on failure.

        `budget` is the worker's own limit (default 80% of `timeout`), so a slow check usually ends
        inside the worker, which survives; past `timeout` the worker is killed and replaced.
        `deadline` (`time.monotonic()`) bounds the wait for a free worker: `{"timeout": True,
        "waited": True}` if none is free by then.
        """
        worker = self._acquire(deadline)
        if worker is None:
            return {"timeout": True, "waited": True}
        try:
            worker.wait_ready()
            reply = worker.request(
                {"gold": gold, "answer": answer, "budget": budget if budget is not None else 0.8 * timeout,
                 "options": options or {}},
                timeout,
            )
        except Exception as exc:
            logger.warning("math checker worker %s failed (%s); replacing it", worker.pid, exc)
            self._discard(worker)
            return {"error": f"checker worker failed: {exc}"}
        if reply is None:
            logger.warning("math checker worker %s did not answer within %.3g s; replacing it", worker.pid, timeout)
            self._discard(worker)
            return {"timeout": True, "killed": True}
        self._release(worker)
        return reply

    def warm_up(self, workers: int = 1) -> None:
        """Start `workers` workers (at most `max_workers`) and wait until they are ready, so checks do not
        pay for start-up. They import in parallel."""
        started: list[_Worker] = []
        try:
            for _ in range(min(workers, self.max_workers)):
                with self._lock:
                    if self._started >= self.max_workers:
                        break
                worker = self._acquire()
                assert worker is not None  # no deadline: _acquire waits
                started.append(worker)
            for worker in started:
                worker.wait_ready()
        except Exception:
            for worker in started:
                self._discard(worker)
            raise
        for worker in started:
            self._release(worker)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.pid for w in self._all)

    def close(self) -> None:
        """Stop every worker. The pool restarts workers if used again."""
        with self._lock:
            workers, self._all = list(self._all), set()
            self._started = 0
            self._idle = queue.LifoQueue()
        for worker in workers:
            worker.close()


_default_pool: CheckerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> CheckerPool:
    """The process-wide pool every `MathChecker` shares unless given its own."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = CheckerPool()
            atexit.register(_default_pool.close)
        return _default_pool


# ------------------------------------------------------------------------------------ the checker
class _LRU:
    """A tiny thread-safe LRU of final verdicts (timeouts and errors are never stored)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Any, CheckResult] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> CheckResult | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: CheckResult) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)


@dataclass
class _Flight:
    """One check under way, that other threads asking the same thing wait for."""

    done: threading.Event = field(default_factory=threading.Event)
    result: CheckResult | None = None


class MathChecker:
    """Is `answer` the same mathematical object as `gold`? Thread-safe and bounded in time.

    Args:
        timeout (`float`, *optional*, defaults to `5.0`): wall-clock seconds one math-verify check may take.
        mode (`str`, *optional*, defaults to `"process"`): `"process"` runs math-verify in a worker
            pool (bounded from any thread); `"inline"` runs it in the calling thread, bounded only in
            the main thread (for scripts, benchmarks and `concurrency="process"` pools).
        pool (`CheckerPool`, *optional*): the worker pool; defaults to the shared `default_pool()`.
        float_rounding, numeric_precision, strict: passed to `math_verify.verify`.
        cache_size (`int`, *optional*, defaults to `4096`): verdicts kept (a group's completions often agree).
        fast_path (`bool`, *optional*, defaults to `True`): decide plain numbers and equal strings without sympy.
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        mode: Literal["process", "inline"] = "process",
        pool: CheckerPool | None = None,
        float_rounding: int = 6,
        numeric_precision: int = 15,
        strict: bool = True,
        cache_size: int = 4096,
        fast_path: bool = True,
    ) -> None:
        if mode not in ("process", "inline"):
            raise ValueError(f"mode must be 'process' or 'inline', got {mode!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.mode = mode
        self._pool = pool
        self.options = {"float_rounding": float_rounding, "numeric_precision": numeric_precision, "strict": strict}
        self.fast_path = fast_path
        self._cache = _LRU(cache_size)
        self._init_runtime()

    def _init_runtime(self) -> None:
        # Checks of one (gold, answer) already under way: a GRPO group often repeats an answer, and its
        # completions are scored at once; the others wait for the first instead of asking a worker again.
        self._inflight: dict[tuple[str, str], _Flight] = {}
        self._inflight_lock = threading.Lock()

    @property
    def pool(self) -> CheckerPool:
        return self._pool if self._pool is not None else default_pool()

    def close(self) -> None:
        """Stop the workers of a pool given to this checker (the shared default pool stops at exit)."""
        if self._pool is not None:
            self._pool.close()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into `concurrency="process"` workers: they get a fresh cache and the default pool.
        state = self.__dict__.copy()
        state["_pool"] = None
        state["_cache"] = self._cache.maxsize
        del state["_inflight"], state["_inflight_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = _LRU(state["_cache"])
        self._init_runtime()

    def check(self, gold: str, answer: str, *, deadline: float | None = None) -> CheckResult:
        """Compare two extracted answers (not whole completions).

        `deadline` (a `time.monotonic()` value, e.g. the end of a batch's budget): a check that
        math-verify would have to decide does not start, or wait for a worker, past it; it abstains
        (`"timeout"`, by `"budget"`). It runs for at most `min(timeout, deadline - now)` seconds.
        """
        started = time.perf_counter()
        if self.fast_path:
            outcome = fast_compare(gold, answer)
            if outcome is not None:
                return CheckResult(outcome, "fast", time.perf_counter() - started)
        if len(answer) > MAX_ANSWER_CHARS:
            return CheckResult("unparsable", "fast", time.perf_counter() - started,
                               {"note": f"answer too long to parse ({len(answer)} characters)"})
        by_size = magnitude_compare(gold, answer)
        if by_size is not None:
            return by_size
        key = (gold, answer)
        cached = self._cache.get(key)
        if cached is not None:
            return CheckResult(cached.outcome, "cache", time.perf_counter() - started, dict(cached.details))
        with self._inflight_lock:
            flight = self._inflight.get(key)
            owner = flight is None
            if flight is None:
                flight = self._inflight[key] = _Flight()
        if not owner:
            # The owner always finishes (its check is bounded by the timeout); we wait at most to our deadline.
            if not flight.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return self._over_budget(started)
            if flight.result is not None:  # the same verdict, timeouts included: retrying would time out too
                shared = flight.result
                return CheckResult(shared.outcome, "cache", time.perf_counter() - started, dict(shared.details))
            return self._check_slow(gold, answer, key, started, deadline)  # the owner raised; try ourselves
        try:
            flight.result = self._check_slow(gold, answer, key, started, deadline)
            return flight.result
        finally:
            with self._inflight_lock:
                del self._inflight[key]
            flight.done.set()

    def _over_budget(self, started: float) -> CheckResult:
        return CheckResult("timeout", "budget", time.perf_counter() - started,
                           {"error": "the batch's checking budget was used up before this check could run"})

    def _check_slow(
        self, gold: str, answer: str, key: tuple[str, str], started: float, deadline: float | None
    ) -> CheckResult:
        timeout = self.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                return self._over_budget(started)
        if self.mode == "inline":
            from sdpo_math._worker import run_with_budget

            reply = run_with_budget(gold, answer, timeout, self.options)
        else:
            reply = self.pool.check(gold, answer, timeout=timeout, options=self.options, deadline=deadline)
        seconds = time.perf_counter() - started
        if reply.get("waited"):
            return self._over_budget(started)
        if reply.get("timeout"):
            cut = timeout < self.timeout
            return CheckResult(
                "timeout", "budget" if cut else "math_verify", seconds,
                {"error": f"checker timed out after {timeout:.3g} s"
                          + (" (the rest of the batch's checking budget)" if cut else "")},
            )
        if "error" in reply:
            return CheckResult("error", "math_verify", seconds, {"error": reply["error"]})
        details = {k: reply[k] for k in ("gold_ok", "gold_parsed", "answer_parsed", "gold_symbols", "answer_symbols")}
        if reply["equal"]:
            outcome: Outcome = "equal"
        elif not reply["answer_ok"]:
            outcome = "unparsable"
        else:
            outcome = "different"
        result = CheckResult(outcome, "math_verify", seconds, details)
        self._cache.put(key, result)
        return result

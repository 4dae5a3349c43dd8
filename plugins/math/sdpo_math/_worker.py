"""The math-verify call, and the loop of a checker worker process.

Why a separate process: math-verify bounds its work with `signal.alarm`, which only works in the
main thread, and TRL scores async reward functions on a daemon thread. A worker process runs each
check in *its* main thread under a wall-clock budget (`setitimer`, float seconds, one budget for
parse + verify + printing the result). math-verify's own timeouts are turned off here: they would
re-arm and then cancel the same process-wide timer, silently dropping ours, and they report a
timeout as "not equal", which would punish the model for the checker's slowness.

Anything math-verify swallows (its `except Exception`) cannot swallow the budget exception, which is
a `BaseException`. Work that never returns to the interpreter (a huge integer power in C) outlives
the budget; the parent's outer timeout kills the worker then.

This file imports only the standard library and math-verify, and is run by path (`runpy`), not as
part of the `sdpo_math` package, so a worker starts without the trainer's imports.

Protocol: one JSON object per line. The worker writes `{"ready": true}` once imported, then
answers each request `{"id", "gold", "answer", "budget", "options"}` with `{"id", ...check_pair()}`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from math_verify import parse, verify

_SHOWN_CHARS = 200
logger = logging.getLogger(__name__)
_warned_no_budget = False


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeout is off; here that is the design, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


class BudgetExceeded(BaseException):
    """Raised by the timer; a `BaseException` so library `except Exception` blocks cannot swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise BudgetExceeded


def _short(obj: Any) -> str:
    text = str(obj)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _parse(text: str) -> list[Any]:
    # The text is wrapped in \boxed{} so math-verify's LaTeX extraction takes all of it, exactly as it
    # would take the box of a full completion. Timeouts off: the caller's budget bounds us.
    return parse(f"\\boxed{{{text}}}", parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str) -> tuple[Any, ...]:
    """Gold answers repeat across a group's completions and across epochs: parse each once."""
    return tuple(_parse(text))


def _symbols(parsed: list[Any] | tuple[Any, ...]) -> list[str]:
    for item in parsed:
        free = getattr(item, "free_symbols", None)
        if free is not None:
            return sorted(_short(s) for s in free)[:10]
    return []


def check_pair(gold: str, answer: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare two answers with math-verify. No timeout here: call it under `run_with_budget`.

    Returns `equal`, whether each side parsed to a sympy object (`gold_ok`, `answer_ok`; an
    unparsed side is compared as a string only), the parsed forms and their free symbols, as text.
    """
    options = options or {}
    gold_parsed = _parse_gold(gold)
    answer_parsed = _parse(answer)
    equal = bool(
        gold_parsed
        and answer_parsed
        and verify(
            list(gold_parsed),
            answer_parsed,
            float_rounding=int(options.get("float_rounding", 6)),
            numeric_precision=int(options.get("numeric_precision", 15)),
            strict=bool(options.get("strict", True)),
            timeout_seconds=None,
        )
    )
    gold_ok = bool(gold_parsed) and not isinstance(gold_parsed[0], str)
    answer_ok = bool(answer_parsed) and not isinstance(answer_parsed[0], str)
    return {
        "equal": equal,
        "gold_ok": gold_ok,
        "answer_ok": answer_ok,
        "gold_parsed": _short(gold_parsed[0]) if gold_ok else None,
        "answer_parsed": _short(answer_parsed[0]) if answer_ok else None,
        "gold_symbols": _symbols(gold_parsed) if gold_ok else [],
        "answer_symbols": _symbols(answer_parsed) if answer_ok else [],
    }


def run_with_budget(
    gold: str, answer: str, budget: float | None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`check_pair` under a wall-clock budget; `{"timeout": True}` when it runs out.

    The budget needs the main thread (signals). Elsewhere the check runs unbounded and a warning is
    logged once: use the worker pool for bounded checks off the main thread.
    """
    global _warned_no_budget
    started = time.perf_counter()
    armed = budget is not None and budget > 0 and threading.current_thread() is threading.main_thread()
    if budget and not armed and not _warned_no_budget:
        _warned_no_budget = True
        logger.warning("math check outside the main thread: the %.3g s budget cannot be enforced here", budget)
    try:
        if armed:
            previous = signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, float(budget))  # type: ignore[arg-type]
        try:
            result = check_pair(gold, answer, options)
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
    except BudgetExceeded:
        result = {"timeout": True}
    except Exception as exc:  # a math-verify bug must not kill the worker
        result = {"error": f"{type(exc).__name__}: {_short(exc)}"}
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    """Serve requests on stdin until it closes (the parent exited or closed the pool)."""
    # Keep the protocol channel private: anything a library prints goes to stderr instead.
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer; the parent closes us
    # Build math-verify's LaTeX parser now, so the first real check does not pay for it within its timeout.
    run_with_budget("1", "\\frac{1}{2}", None)
    channel.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            result = run_with_budget(request["gold"], request["answer"], request.get("budget"), request.get("options"))
            result["id"] = request.get("id")
        except Exception as exc:
            result = {"id": None, "error": f"bad request: {type(exc).__name__}: {_short(exc)}"}
        channel.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

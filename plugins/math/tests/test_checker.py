"""Equivalence checking: the fast path, math-verify's verdicts, thread safety and the timeout paths."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sdpo_math.checker import CheckerPool, MathChecker, fast_compare, normalize

SLOW_ANSWER = "(x+1)^{3000}"  # sympy expands this for as long as it is allowed to (huge numbers are judged by size)


@pytest.fixture(scope="module")
def checker(pool: CheckerPool) -> MathChecker:
    return MathChecker(pool=pool, timeout=10.0)


def in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Run `fn` on a daemon thread, as TRL runs async reward functions, and return (or raise) its result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the check hung"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------------------- fast path
@pytest.mark.parametrize(
    ("gold", "answer", "outcome"),
    [
        ("42", "42", "equal"),
        ("42", "042", "equal"),
        ("42", "+42", "equal"),
        ("1000", "1,000", "equal"),
        ("1000", "1{,}000", "equal"),
        ("1000", "1\\,000", "equal"),
        ("5", "\\$5", "equal"),
        ("-3", "−3", "equal"),
        ("0.5", "0.50", "equal"),
        ("7", "7.", "equal"),
        ("7", "7 dollars", "equal"),  # math-verify would read "dollars" as d*o*l*l*a*r*s
        ("7", "8 dollars", "different"),
        ("42", "43", "different"),
        ("\\frac{1}{2}", "\\dfrac{1}{2}", "equal"),
        ("[1,2)", "[1, 2)", "equal"),
        ("0", "-0", "equal"),
        ("0.5", "0.6", None),  # decimals: math-verify's rounding tolerance decides
        ("0.5", "\\frac{1}{2}", None),
        ("50\\%", "50", None),  # percentages: math-verify's rules
        ("7", "7 percent", None),
        ("7", "7 x", None),
        ("", "7", None),
    ],
)
def test_fast_compare(gold: str, answer: str, outcome: str | None) -> None:
    assert fast_compare(gold, answer) == outcome


def test_fast_compare_huge_integers_without_int_conversion() -> None:
    big = str(10**400)
    assert fast_compare(big, big) == "equal"
    assert fast_compare(big, str(10**400 + 1)) == "different"
    huge = "9" * 5000  # past Python's 4300-digit int() limit
    assert fast_compare(huge, "0" + huge) == "equal"
    assert fast_compare(huge, huge[:-1] + "8") == "different"


def test_normalize_is_light() -> None:
    assert normalize("  $\\dfrac{1}{2}$. ") == "\\frac{1}{2}"
    assert normalize("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize("2 3") == "2 3"


# ------------------------------------------------------------------------------------- math-verify
EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{3}{4}", "0.75"),
    ("\\frac{1}{3}", "0.333333"),
    ("50\\%", "0.5"),
    ("\\sqrt{2}", "2^{1/2}"),
    ("\\sqrt{2}", "sqrt(2)"),
    ("x^2+2x+1", "(x+1)^2"),
    ("[1,2)", "[1, 2)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("5", "5\\text{ cm}"),
    ("3", "x = 3"),
    ("10^{400}", str(10**400)),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
]
DIFFERENT = [("(1,2]", "[1,2)"), ("\\frac{1}{3}", "0.33"), ("\\sqrt{2}", "\\sqrt{3}"), ("x+1", "x-1")]


@pytest.mark.parametrize(("gold", "answer"), EQUIVALENT)
def test_equivalent_forms(checker: MathChecker, gold: str, answer: str) -> None:
    result = checker.check(gold, answer)
    assert result.outcome == "equal", result


@pytest.mark.parametrize(("gold", "answer"), DIFFERENT)
def test_different_forms(checker: MathChecker, gold: str, answer: str) -> None:
    result = checker.check(gold, answer)
    assert result.outcome == "different", result
    assert result.details["answer_parsed"]


@pytest.mark.parametrize("answer", ["\\frac{1}{}", "2^{}", "\\sqrt", "1+"])
def test_malformed_latex_is_unparsable(checker: MathChecker, answer: str) -> None:
    assert checker.check("5", answer).outcome == "unparsable"


def test_words_are_reported_as_symbols(checker: MathChecker) -> None:
    result = checker.check("5", "5 dollars y")
    assert result.outcome == "different"
    assert "do" in result.details["answer_symbols"]


def test_overlong_answer_is_not_sent_to_sympy(checker: MathChecker) -> None:
    result = checker.check("5", "x+" * 3000)
    assert (result.outcome, result.by) == ("unparsable", "fast")


def test_verdicts_are_cached(pool: CheckerPool) -> None:
    checker = MathChecker(pool=pool)
    assert checker.check("\\frac{2}{4}", "0.5").by == "math_verify"
    again = checker.check("\\frac{2}{4}", "0.5")
    assert (again.outcome, again.by) == ("equal", "cache")


def test_inline_mode_in_main_thread() -> None:
    checker = MathChecker(mode="inline")
    assert checker.check("\\frac{1}{2}", "0.5").equal
    assert checker.check("\\frac{1}{2}", "0.4").outcome == "different"


def test_inline_mode_times_out_in_main_thread() -> None:
    result = MathChecker(mode="inline", timeout=0.3).check("5", SLOW_ANSWER)
    assert result.outcome == "timeout"
    assert result.seconds < 5


def test_checker_validates_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        MathChecker(mode="thread")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        MathChecker(timeout=0)


def test_checker_pickles_without_its_pool(pool: CheckerPool) -> None:
    checker = MathChecker(pool=pool, timeout=3.0)
    checker.check("\\frac{1}{4}", "0.25")
    clone = pickle.loads(pickle.dumps(checker))
    assert clone.timeout == 3.0
    assert clone._pool is None  # the clone uses its process's shared pool


# ---------------------------------------------------------------------------------------- threads
def test_math_verify_alone_fails_off_the_main_thread() -> None:
    """The pitfall this design exists for: math-verify's signal timeout refuses to run in a thread."""
    from math_verify import parse

    with pytest.raises(ValueError, match="thread"):
        in_daemon_thread(lambda: parse("\\boxed{\\frac{1}{2}}"))


def test_check_from_a_daemon_thread(checker: MathChecker) -> None:
    result = in_daemon_thread(lambda: checker.check("\\frac{14}{2}", "\\sqrt{49}"))
    assert (result.outcome, result.by) == ("equal", "math_verify")


def test_check_from_an_asyncio_loop_on_a_daemon_thread(checker: MathChecker) -> None:
    """TRL's async reward functions run on an event loop in a daemon thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def reward() -> Any:
        return checker.check("\\frac{9}{3}", "\\sqrt{9}")

    try:
        result = asyncio.run_coroutine_threadsafe(reward(), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
    assert result.outcome == "equal"


def test_timeout_off_the_main_thread(pool: CheckerPool) -> None:
    checker = MathChecker(pool=pool, timeout=0.5)
    result = in_daemon_thread(lambda: checker.check("5", SLOW_ANSWER))
    assert result.outcome == "timeout"
    assert "timed out" in result.details["error"]


def test_many_threads_share_the_pool(pool: CheckerPool) -> None:
    checker = MathChecker(pool=pool, cache_size=0)
    pairs = [(f"\\frac{{{n}}}{{2}}", str(n / 2)) for n in range(1, 17)]
    with ThreadPoolExecutor(max_workers=8) as executor:
        results = list(executor.map(lambda pair: checker.check(*pair), pairs))
    assert all(r.equal for r in results), results
    assert len(pool.pids) <= pool.max_workers


def test_identical_concurrent_checks_ask_a_worker_once(pool: CheckerPool) -> None:
    """A GRPO group often repeats one answer; its completions are scored at the same time."""
    checker = MathChecker(pool=pool, timeout=0.5)
    barrier = threading.Barrier(8)

    def check(_: int) -> Any:
        barrier.wait()
        return checker.check("5", SLOW_ANSWER)

    with ThreadPoolExecutor(max_workers=8) as executor:
        results = list(executor.map(check, range(8)))
    assert {r.outcome for r in results} == {"timeout"}
    assert sorted(r.by for r in results).count("math_verify") <= 2  # the rest waited and shared the verdict


# --------------------------------------------------------------------------------------- timeouts
def test_budget_timeout_keeps_the_worker(pool: CheckerPool) -> None:
    checker = MathChecker(pool=pool, timeout=0.5)
    before, replaced = pool.pids, pool.replaced
    started = time.monotonic()
    result = checker.check("5", SLOW_ANSWER)
    assert result.outcome == "timeout"
    assert time.monotonic() - started < 5
    assert pool.replaced == replaced  # the worker stopped itself and lives on
    assert pool.pids == before
    assert checker.check("5", "\\frac{10}{2}").equal


def test_hung_worker_is_killed_and_replaced() -> None:
    pool = CheckerPool(max_workers=1)
    try:
        pool.warm_up()
        [first] = pool.pids
        # A worker budget longer than the caller's timeout: the caller gives up and kills the worker.
        reply = pool.check("5", SLOW_ANSWER, timeout=0.5, budget=60)
        assert reply == {"timeout": True, "killed": True}
        assert pool.replaced == 1
        assert pool.pids == []
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
        assert MathChecker(pool=pool).check("2", "\\sqrt{4}").equal  # a new worker took its place
        assert pool.pids not in ([], [first])
    finally:
        pool.close()


@pytest.mark.slow
def test_worker_that_died_while_idle_is_replaced() -> None:
    pool = CheckerPool(max_workers=1)
    try:
        pool.warm_up()
        [pid] = pool.pids
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            time.sleep(0.05)
        assert MathChecker(pool=pool).check("3", "\\sqrt{9}").equal
        assert pool.replaced == 1
    finally:
        pool.close()

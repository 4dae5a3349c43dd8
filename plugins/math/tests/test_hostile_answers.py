"""Answers built to stall the checker: each gets a definite verdict fast, and honest answers still pass.

A policy that finds an answer the grader cannot finish learns to write it. Huge numbers cost sympy
seconds of uninterruptible work; here they are judged by size (`sdpo_math.magnitude`), and the time
all the checks of a batch may take is bounded (`batch_timeout`).
"""

from __future__ import annotations

import time

import pytest
from sdpo_math import MathChecker, MathEnvironment
from sdpo_math.checker import CheckerPool

QUICK = 1.0  # seconds: far below the 5 s checker timeout these answers used to run into

HUGE_WRONG = [
    "10^{10^{10}}",
    "1000000!",
    "(10^{9})!",
    "2^{2^{2^{2^{2}}}}",
    "9^{9^{9}}",
    "10^{10^{10^{10}}}",
    "(10^{10})^{10^{10}}",
    "-10^{10^{10}}",
    "10^{10^{10}} + 7",
    "7 \\cdot 10^{10^{10}}",
    "\\frac{1}{10^{-10^{10}}}",
    "\\sqrt{10^{10^{10}}}",
    "\\pi^{10^{10}}",
    "(10^{100})!",
    "\\left(10^{10}\\right)!",
    "10^{5000}",
]


@pytest.fixture
def env(pool: CheckerPool) -> MathEnvironment:
    return MathEnvironment(checker=MathChecker(pool=pool))  # the default 5 s timeout


@pytest.mark.parametrize("answer", HUGE_WRONG)
def test_huge_answers_are_wrong_at_once(env: MathEnvironment, answer: str) -> None:
    started = time.monotonic()
    feedback = env.score({"answer": "7"}, f"The answer is \\boxed{{{answer}}}.")
    assert time.monotonic() - started < QUICK
    assert feedback.reward == 0.0
    assert feedback.details["verdict"] == "wrong_answer"
    assert feedback.details["checked_by"] == "magnitude"
    assert "not correct" in feedback.text
    honest = env.score({"answer": "7"}, "\\boxed{\\frac{14}{2}}")  # math-verify's worker is still fine
    assert (honest.reward, honest.details["verdict"]) == (1.0, "correct")


def test_a_batch_of_huge_answers_costs_no_timeouts(env: MathEnvironment) -> None:
    tasks = [{"answer": "7"}] * (len(HUGE_WRONG) + 1)
    completions = [f"\\boxed{{{a}}}" for a in HUGE_WRONG] + ["\\boxed{7}"]
    started = time.monotonic()
    results = env.evaluate(tasks, completions)
    assert time.monotonic() - started < QUICK
    assert [r.reward for r in results] == [0.0] * len(HUGE_WRONG) + [1.0]


@pytest.mark.parametrize(("gold", "answer"), [
    ("1000000", "10^6"),
    ("1000000", "10^{6}"),
    ("3628800", "10!"),
    ("2^{1000}", "4^{500}"),
    ("2^{1000}", "2^{500} \\cdot 2^{500}"),
    ("1267650600228229401496703205376", "2^{100}"),
    ("10^{100}", "(10^{10})^{10}"),
    ("2^{20000}", "4^{10000}"),
    ("10^{10^{10}}", "10^{10^{10}}"),
    ("10^{10^{10}}", "10^{10000000000}"),  # huge exact powers written two ways: compared as powers, at once
    ("10^{10^{10}}", "100^{5 \\cdot 10^{9}}"),
    ("2^{10^{6}}", "4^{500000}"),
    ("\\sqrt{2} - 1", "\\frac{1}{\\sqrt{2} + 1}"),  # small irrational terms that nearly cancel: math-verify
    ("0", "2\\sqrt{2} - \\sqrt{8}"),
])
def test_honest_answers_still_pass(env: MathEnvironment, gold: str, answer: str) -> None:
    feedback = env.score({"answer": gold}, f"\\boxed{{{answer}}}")
    assert (feedback.reward, feedback.details["verdict"]) == (1.0, "correct")


@pytest.mark.parametrize("answer", [
    "10^{10^{10}} - 10^{10^{10}} + 7",  # equal to 7, but only a full evaluation could tell
    "\\frac{10^{10^{10}}}{10^{10^{10}-1}}",
    "x + 10^{10^{10}}",  # not a number: sympy would still build the power while parsing
    "\\sin(10^{10^{10}})",
    "x^{(10^{9})!}",
])
def test_undecidable_huge_answers_abstain_at_once_with_the_reason(env: MathEnvironment, answer: str) -> None:
    started = time.monotonic()
    feedback = env.score({"answer": "7"}, f"\\boxed{{{answer}}}")
    assert time.monotonic() - started < QUICK
    assert feedback.reward is None
    assert feedback.details["verdict"] == "checker_timeout"
    assert "too large to evaluate" in feedback.details["error"]


def test_a_batch_of_slow_answers_is_bounded_by_the_batch_budget(pool: CheckerPool) -> None:
    """Twelve different answers that sympy cannot finish, two workers, 1 s each: 6 s without a budget."""
    env = MathEnvironment(checker=MathChecker(pool=pool, timeout=1.0), batch_timeout=1.5)
    slow = [f"\\boxed{{(x+{k})^{{3000}}}}" for k in range(1, 13)]
    tasks = [{"answer": "5"}] * 13
    started = time.monotonic()
    results = env.evaluate(tasks, [*slow, "\\boxed{5}"])
    elapsed = time.monotonic() - started
    assert elapsed < 4.0
    assert results[-1].reward == 1.0  # the fast path needs no budget
    assert all(r.reward is None and r.details["verdict"] == "checker_timeout" for r in results[:-1])
    reasons = [r.details["error"] for r in results[:-1]]
    assert any("budget" in reason for reason in reasons)  # rows that never got a worker say why
    assert env.score({"answer": "5"}, "\\boxed{\\frac{10}{2}}").reward == 1.0  # the next answer is graded right


def test_batch_timeout_is_validated() -> None:
    with pytest.raises(ValueError, match="batch_timeout"):
        MathEnvironment(batch_timeout=0)

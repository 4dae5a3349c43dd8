"""Regression for the reference's false timeouts under contention (docs/sandbox.md §8.2): a correct solution at
~0.2 s CPU per test, 1 s limit, evaluated as several concurrent submissions on 2 cores, is Accepted
(the reference's harness scored this 0 with 8 or 20 tests)."""

from __future__ import annotations

import time

import pytest
from sdpo_code import CodeEnvironment


def _iterations_for(seconds: float) -> int:
    """Loop iterations that take about `seconds` of CPU here (the sandbox runs the same kind of Python)."""
    n = 200_000
    start = time.process_time()
    total = 0
    for i in range(n):
        total += i * i
    per = (time.process_time() - start) / n
    return max(10_000, int(seconds / per))


def _busy_task(n_tests: int) -> dict:
    tests = [{"input": f"{k}\n", "output": f"{k + 1}\n", "testtype": "stdin"} for k in range(n_tests)]
    return {"prompt": "busy", "tests": tests}


def _busy_solution(iterations: int) -> str:
    return ("```python\nk = int(input())\ntotal = 0\n"
            f"for i in range({iterations}):\n    total += i * i\nprint(k + 1)\n```")


def _run(sandbox, n_tests: int, n_submissions: int) -> None:
    env = CodeEnvironment(backend=sandbox, time_limit=1.0)
    code = _busy_solution(_iterations_for(0.2))
    results = env.evaluate([_busy_task(n_tests)] * n_submissions, [code] * n_submissions, max_workers=n_submissions)
    verdicts = [r.details["verdict"] for r in results]
    assert verdicts == ["Accepted"] * n_submissions, [r.text for r in results]
    cpu = [t["cpu_seconds"] for r in results for t in r.details["tests"]]
    assert max(cpu) < 1.0


def test_contention_does_not_cause_timeouts(sandbox):
    _run(sandbox, n_tests=5, n_submissions=4)


@pytest.mark.slow
def test_contention_twenty_tests_six_submissions(sandbox):
    _run(sandbox, n_tests=20, n_submissions=6)

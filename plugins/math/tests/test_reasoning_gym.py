"""`reasoning_gym`: reasoning-gym generators as environments (skipped without the optional extra)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from typing import Any

import pytest
import sdpo_math
from sdpo_math.rg import INSTALL_HINT, ReasoningGymEnvironment, extract_tagged

import sdpo_envs
from sdpo_envs.testing import check_environment, registered_plugin

needs_rg = pytest.mark.skipif(
    importlib.util.find_spec("reasoning_gym") is None,
    reason="reasoning-gym is not installed (pip install 'sdpo-math[reasoning-gym]')",
)


def rows_of(env: ReasoningGymEnvironment) -> list[dict[str, Any]]:
    rows = env.dataset(as_dataset=False)
    assert isinstance(rows, list)
    return rows


def test_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(ImportError, match=r"sdpo-math\[reasoning-gym\]"):
        ReasoningGymEnvironment()
    assert "pip install" in INSTALL_HINT


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<answer>42</answer>", ("42", False)),
        ("<answer>1</answer> then <ANSWER> 2 </ANSWER>", ("2", False)),
        ("<answer>1</answer> then <answer>2", ("1", True)),
        ("nothing", (None, False)),
    ],
)
def test_extract_tagged(completion: str, expected: tuple[str | None, bool]) -> None:
    assert extract_tagged(completion) == expected


@needs_rg
def test_make_basic_arithmetic_and_score() -> None:
    with registered_plugin(sdpo_math, name="sdpo-math-under-test"):
        env = sdpo_envs.make("reasoning_gym", task="basic_arithmetic", size=6, seed=3)
    assert isinstance(env, ReasoningGymEnvironment)
    rows = rows_of(env)
    assert len(rows) == 6
    assert {"prompt", "question", "answer", "metadata", "rg_task", "rg_index"} <= set(rows[0])
    row = rows[0]
    right = env.score(row, f"Let me compute. <answer>{row['answer']}</answer>")
    assert (right.reward, right.success, right.details["verdict"], right.text) == (1.0, True, "correct", "")
    wrong = env.score(row, "<answer>not a number</answer>")
    assert (wrong.reward, wrong.details["verdict"]) == (0.0, "wrong_answer")
    assert "is not correct" in wrong.text
    assert row["answer"] not in wrong.text


@needs_rg
def test_feedback_kinds() -> None:
    env = ReasoningGymEnvironment(task="basic_arithmetic", size=3, seed=1)
    row = rows_of(env)[0]
    answer = row["answer"]
    assert env.score(row, "").details["verdict"] == "no_answer"
    assert env.score(row, "I give up").details["verdict"] == "no_answer"
    truncated = env.score(row, f"<answer>{answer}")
    assert (truncated.details["verdict"], truncated.reward) == ("truncated", 0.0)
    boxed = env.score(row, f"\\boxed{{{answer}}}")
    assert (boxed.details["verdict"], boxed.reward) == ("format", 0.5)
    partial = env.score(row, f"<answer>{answer} is it</answer>")  # default score_answer: partial credit
    assert partial.details["verdict"] == "partial"
    assert 0 < (partial.reward or 0) < 1


@needs_rg
def test_reveal_answer_and_boxed_format() -> None:
    env = ReasoningGymEnvironment(task="chain_sum", size=2, seed=0, answer_format="boxed", reveal_answer=True)
    row = rows_of(env)[0]
    assert "\\boxed{}" in row["prompt"][0]["content"]
    assert env.score(row, f"\\boxed{{{row['answer']}}}").success
    wrong = env.score(row, "\\boxed{nope}")
    assert wrong.text.endswith(f"The correct answer is {row['answer']}.")


@needs_rg
def test_rows_from_elsewhere_use_their_json_metadata() -> None:
    env = ReasoningGymEnvironment(task="basic_arithmetic", size=2, seed=0)
    entry = env.rg_dataset[1]
    foreign = {"question": entry["question"], "answer": entry["answer"], "metadata": json.dumps(entry["metadata"])}
    assert env.score(foreign, f"<answer>{entry['answer']}</answer>").success


@needs_rg
def test_conformance_and_pickle() -> None:
    env = ReasoningGymEnvironment(task="basic_arithmetic", size=4, seed=2, config={"max_terms": 3})
    rows = rows_of(env)
    check_environment(env, rows, [f"<answer>{r['answer']}</answer>" for r in rows])
    clone = pickle.loads(pickle.dumps(env))
    assert clone.score(rows[0], f"<answer>{rows[0]['answer']}</answer>").success


@needs_rg
def test_unknown_task_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot create task 'no_such_task'"):
        ReasoningGymEnvironment(task="no_such_task")

"""`sdpo_core.discover` and `sdpo discover`: attempt accounting, curves, the loop on a tiny model, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdpo_core.app import cli
from sdpo_core.app.discover import (
    DiscoverSettings,
    ProblemResult,
    RoundRecord,
    abstain_reason,
    append_result,
    discover,
    discovery_curve,
    first_success,
    load_results,
    median_attempts,
    plan_rounds,
    problem_id,
    summarize,
)
from sdpo_core.app.discover_cli import summary_rows
from sdpo_core.app.evaluation import is_solved
from sdpo_core.testing import save_tiny_model, tiny_model, tiny_tokenizer
from sdpo_envs import Feedback
from sdpo_envs.testing import FakeEnvironment


def result(solved: bool, attempts: int, *, rounds=(), updates: int = 0, error=None) -> ProblemResult:
    return ProblemResult("p", "sdpo", solved, attempts, 32, rounds=list(rounds), updates=updates, error=error)


# ------------------------------------------------------------------------------------- pure pieces
def test_plan_rounds_is_budget_over_k_and_rejects_what_does_not_fit():
    assert plan_rounds(256, 8) == 32
    assert plan_rounds(8, 8) == 1
    with pytest.raises(ValueError, match="budget 4 is smaller than k=8"):
        plan_rounds(4, 8)
    with pytest.raises(ValueError, match=r"not a multiple of k=8.*--budget 16 or 24"):
        plan_rounds(20, 8)
    with pytest.raises(ValueError, match="k must be a positive int"):
        plan_rounds(8, 0)


def test_first_success_counts_the_attempts_before_the_round():
    assert first_success([False, False, False], 16) is None
    assert first_success([False, True, True], 16) == 18
    assert first_success([True], 0) == 1


def test_discovery_curve_and_median_by_hand():
    results = [result(True, 3), result(True, 10), result(False, 32), result(True, 8)]
    # within 2: none; within 3: one; within 8: two; within 10 and 32: three of four
    assert discovery_curve(results, [2, 3, 8, 10, 32]) == [0.0, 0.25, 0.5, 0.75, 0.75]
    # 3, 8, 10, inf -> median (8 + 10) / 2
    assert median_attempts(results) == 9.0
    assert median_attempts([result(True, 5), result(False, 32), result(False, 32)]) == math.inf
    with pytest.raises(ValueError, match="no results"):
        median_attempts([])


def test_rounds_by_signal_counts_only_rounds_followed_by_an_update():
    rounds = [RoundRecord(8, 0, 0, feedback_rows=8), RoundRecord(8, 0, 0, demo_rows=1, feedback_rows=7),
              RoundRecord(8, 0, 0), RoundRecord(8, 1, 0, feedback_rows=7)]
    solved = result(True, 25, rounds=rounds, updates=3)
    assert [r.signal for r in rounds] == ["feedback", "demo", "none", "feedback"]
    assert solved.rounds_by_signal() == {"demo": 1, "feedback": 1, "none": 1}
    summary = summarize([solved, result(False, 32, error="broken")])
    assert summary["update_rounds_by_signal"] == {"demo": 1, "feedback": 1, "none": 1}
    assert (summary["solved"], summary["errors"], summary["updates"], summary["median_attempts_solved"]) == \
        (1, 1, 3, 25.0)


def test_abstain_reason_only_when_nothing_was_scored():
    assert abstain_reason([Feedback(None), Feedback(0.0)], 0) is None
    failed = Feedback(0.0, details={"error": "sandbox died"})
    reason = abstain_reason([Feedback(None), failed], 2)
    assert "none of the 2 attempts of round 3" in reason
    assert "sandbox died" in reason


def test_success_is_a_reward_threshold_or_the_environment_flag():
    unformatted_right = Feedback(1.0, success=False)  # math: the right number outside \\boxed{}
    assert is_solved(unformatted_right, 1.0)
    assert not is_solved(unformatted_right, None)
    assert is_solved(Feedback(0.5, success=True), None)
    assert not is_solved(Feedback(None), 0.0)


def test_problem_id_prefers_the_id_column():
    assert problem_id({"id": 7, "problem_id": "x"}, 3) == "7"
    assert problem_id({"problem_id": "x"}, 3) == "x"
    assert problem_id({"question": "?"}, 3) == "3"


def test_results_round_trip_and_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "r.jsonl"
    first = result(True, 3, rounds=[RoundRecord(8, 1, 0)])
    append_result(path, first)
    append_result(path, result(False, 32, error="x"))
    assert load_results(path)[0] == first
    with path.open("a") as f:
        f.write('{"problem_id": "q", "meth')
    assert [r.error for r in load_results(path)] == [None, "x"]
    path.write_text('not json\n' + json.dumps(first.to_dict()) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a discover result"):
        load_results(path)


def test_summary_rows_by_hand():
    rows = summary_rows({"sdpo": [result(True, 3), result(False, 32)]}, budget=32, k=8)
    assert rows[0] == ["method", "solved", "median attempts", "disc@8", "disc@16", "disc@32",
                       "updates (demo/feedback/none)", "errors"]
    assert rows[1] == ["sdpo", "1/2", "-", "0.50", "0.50", "0.50", "0 (0/0/0)", "0"]


# -------------------------------------------------------------------------------- the loop, tiny model
class Recording(FakeEnvironment):
    """The fake environment (success: the completion contains the task's answer), keeping what it scored."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scored: list[list[str]] = []

    def evaluate(self, tasks, completions, **kwargs):
        self.scored.append([str(c) for c in completions])
        return super().evaluate(tasks, completions, **kwargs)


class Retrying(Recording):
    """`Recording`, multi-turn: the observation repeats the feedback."""

    def respond(self, task, history):
        return f"{history[-1].feedback.text} Try again."


class AbstainsOn(FakeEnvironment):
    """Abstains (reward `None`) on every attempt at a task marked `abstain`."""

    def score(self, task, completion):
        return Feedback(None) if task.get("abstain") else super().score(task, completion)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer), tokenizer


SHORT = DiscoverSettings(max_completion_length=6)
HARD = {"prompt": chat("say qqqzzz"), "answer": "qqqzzz"}  # six rare letters in a row: never within 8 tries


def test_sdpo_updates_after_each_failed_round_and_each_problem_starts_from_the_base_weights(tiny):
    model, tokenizer = tiny
    before = {name: value.clone() for name, value in model.state_dict().items()}
    env = Recording()
    results = discover(model, tokenizer, env, [{**HARD, "id": "one"}, {**HARD, "id": "two"}], budget=12, k=4,
                       settings=SHORT)
    assert [(r.problem_id, r.solved, r.attempts, r.updates) for r in results] == [("one", False, 12, 3),
                                                                                  ("two", False, 12, 3)]
    # the fake environment's feedback names the missing answer: every update had a feedback-only teacher
    assert all(r.rounds_by_signal() == {"demo": 0, "feedback": 3, "none": 0} for r in results)
    # the caller's model is untouched ...
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    # ... and problem two starts where problem one started: the same first round from the same seed,
    # while its later rounds come from updated weights
    assert len(env.scored) == 6
    assert env.scored[3] == env.scored[0]


def test_baselines_count_attempts_like_sdpo_and_keep_the_solving_answer(tiny):
    model, tokenizer = tiny
    easy = {"prompt": chat("say e"), "answer": "e", "id": "easy"}
    for method in ("best_of_k", "multi_turn"):
        env = Retrying()
        (res,) = discover(model, tokenizer, env, [easy], budget=16, k=4, method=method,
                          settings=DiscoverSettings(max_completion_length=6, max_turns=2))
        assert res.solved
        assert "e" in res.answer
        flat = [text for batch in env.scored for text in batch]
        # attempts to the first success = the position of the first completion holding the answer
        assert res.attempts == next(i for i, text in enumerate(flat, 1) if "e" in text)
        assert res.answer == flat[res.attempts - 1]


def test_multi_turn_feeds_the_observation_back(tiny):
    model, tokenizer = tiny
    env = Retrying()
    (res,) = discover(model, tokenizer, env, [{**HARD, "id": "h"}], budget=8, k=4, method="multi_turn",
                      settings=DiscoverSettings(max_completion_length=6, max_turns=2))
    assert (res.solved, res.attempts, len(res.rounds)) == (False, 8, 1)  # 4 episodes x 2 turns
    assert env.max_turns == 1  # restored
    with pytest.raises(ValueError, match="needs an environment that implements respond"):
        discover(model, tokenizer, Recording(), [HARD], budget=8, k=4, method="multi_turn")


def test_bad_problems_get_a_message_and_the_others_go_on(tiny):
    model, tokenizer = tiny
    env = AbstainsOn()
    tasks = [{"question": "no prompt", "answer": "x", "id": "unreadable"},
             {"prompt": chat("say e"), "answer": "e", "abstain": True, "id": "abstains"},
             {"prompt": chat("say e"), "answer": "e", "id": "fine"}]
    for method in ("sdpo", "best_of_k"):
        results = discover(model, tokenizer, env, tasks, budget=8, k=4, method=method, settings=SHORT)
        unreadable, abstains, fine = results
        assert "cannot build a prompt" in unreadable.error
        assert "'prompt'" in unreadable.error
        assert "scored none of the 4 attempts of round 1" in abstains.error
        assert abstains.attempts == 4
        assert abstains.updates == 0
        assert fine.error is None
        assert fine.solved
    with pytest.raises(ValueError, match="smaller than k"):
        discover(model, tokenizer, env, tasks, budget=2, k=4)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_rejects_a_budget_below_k(capsys, tmp_path):
    code = cli.main(["discover", "--env", "math", "--budget", "4", "--k", "8", "--output_dir", str(tmp_path)])
    assert code == 2
    assert "budget 4 is smaller than k=8" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end_with_resume(tmp_path):
    """`sdpo discover` in a subprocess on the tiny model and the math environment, interrupted and resumed."""
    model_dir = save_tiny_model(tmp_path / "model")
    tasks = tmp_path / "problems.jsonl"
    tasks.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "a", "question": "What is 2 + 3?", "answer": "5"},
        {"id": "b", "question": "What is 4 + 4?", "answer": "8"},
        {"id": "c", "answer": "1"},  # no question: the math environment cannot build a prompt
    ]))
    out = tmp_path / "out"
    env = {**os.environ, "SDPO_LOAD_PLUGINS": "sdpo-math", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdpo_core.app.cli", "discover", "--env", "math", "--task", str(tasks),
               "--model", str(model_dir), "--budget", "8", "--k", "4", "--max_completion_length", "6",
               "--baseline", "best_of_k", "--output_dir", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr
    assert "sdpo problem c: the environment cannot build a prompt" in first.stderr
    assert "best_of_k" in first.stdout
    assert "median attempts" in first.stdout
    assert (out / "discovery.png").stat().st_size > 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6
    done = [json.loads(line) for line in lines]
    assert {(d["method"], d["problem_id"]) for d in done} == {(m, p) for m in ("sdpo", "best_of_k")
                                                              for p in "abc"}
    assert all(d["updates"] == 2 for d in done if d["method"] == "sdpo" and d["problem_id"] != "c"
               and not d["solved"])

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 2
    assert "pass --resume" in again.stderr

    # a crash after three problems, in the middle of writing the fourth
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr
    after = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert after[:3] == done[:3]
    assert sorted((d["method"], d["problem_id"]) for d in after) == sorted((d["method"], d["problem_id"])
                                                                           for d in done)
    changed = subprocess.run([*command[:-2], "--output_dir", str(out), "--k", "2", "--resume"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert changed.returncode == 2
    assert "k was 4, now 2" in changed.stderr


@pytest.mark.slow
def test_benchmark_selects_runs_and_writes_its_results(tmp_path):
    """`benchmarks/discover_bench.py` at a microscopic size on the tiny model."""
    model_dir = save_tiny_model(tmp_path / "model")
    env = {**os.environ, "SDPO_LOAD_PLUGINS": "sdpo-math", "OMP_NUM_THREADS": "1"}
    results, run, plot = tmp_path / "d.json", tmp_path / "run.json", tmp_path / "d.png"
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "discover_bench.py"),
               "--model", str(model_dir), "--candidates", "2", "--selection_samples", "2", "--keep_unsolved",
               "--problems", "2", "--budget", "4", "--k", "2", "--seeds", "0,1", "--max_completion_length", "4",
               "--work_dir", str(tmp_path / "work"), "--results", str(results), "--run_results", str(run),
               "--plot", str(plot)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(results.read_text())
    assert set(table) == {"sdpo", "best_of_k"}
    assert all(len(table[m][s]) == 2 and set(table[m][s][0]) == {"problem_id", "solved", "attempts"}
               for m in table for s in ("0", "1"))
    summary = json.loads(run.read_text())["summary"]
    assert summary["sdpo"]["problems"] == 4
    assert len(json.loads(run.read_text())["selection"]["accuracy"]) == 2
    assert plot.stat().st_size > 0

"""`sdpo train --max_turns` and `sdpo eval --max_turns`: whole episodes from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdpo_core.app import cli
from sdpo_core.app.runs import parse_train_args
from sdpo_core.testing import save_tiny_model
from sdpo_envs import hookimpl
from sdpo_envs.testing import FakeEnvironment, registered_plugin


class Retry(FakeEnvironment):
    def respond(self, task, history):
        return f"{history[-1].feedback.text} Try again."


class _Plugin:
    @hookimpl
    def register_environments(self, register):
        register("toy-single", FakeEnvironment)
        register("toy-retry", Retry)


@pytest.fixture
def envs():
    with registered_plugin(_Plugin(), name="test-episode-cli"):
        yield


@pytest.fixture
def model_dir(tmp_path):
    return Path(save_tiny_model(tmp_path / "model"))


def rows_file(path):
    with path.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": "ae"[i % 2]})
                    + "\n")
    return path


def test_the_episode_flags_reach_the_environment(envs):
    script, _, _ = parse_train_args(["--env", "toy-retry", "--max_turns", "3", "--turn_discount", "0.5"])
    assert script.environment_options == {"max_turns": 3, "turn_discount": 0.5}
    assert parse_train_args(["--env", "toy-retry"])[0].environment_options == {}


@pytest.mark.parametrize(("command", "message"), [
    (["train", "--env", "toy-single", "--max_turns", "2"],
     "environment 'toy-single' cannot run multi-turn episodes (max_turns=2)"),
    (["eval", "--env", "toy-single", "--max_turns", "2"],
     "environment 'toy-single' cannot run multi-turn episodes (max_turns=2)"),
    (["eval", "--env", "toy-retry", "--max_turns", "0"],
     "environment 'toy-retry': max_turns must be at least 1, got 0"),
    (["train", "--env", "toy-retry", "--max_turns", "2", "--turn_discount", "1.5"],
     "environment 'toy-retry': turn_discount must be in (0, 1], got 1.5"),
])
def test_bad_episode_settings_are_one_clear_error(envs, capsys, command, message):
    assert cli.main(command) == 2
    assert message in capsys.readouterr().err


def test_train_and_eval_on_whole_episodes(envs, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    rows = rows_file(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(model_dir), "--env", "toy-retry", "--max_turns", "2", "--dataset",
                     str(rows), "--output_dir", str(out), "--max_steps", "1", "--num_generations", "2",
                     "--per_device_train_batch_size", "4", "--max_completion_length", "8", "--eval_size", "2",
                     "--eval_batch_size", "2", "--disable_tqdm", "true", "--save_strategy", "no"]) == 0
    after = json.loads((out / "eval_after.json").read_text())
    assert set(after["pass_within_turns"]) == {"1", "2"}
    assert after["num_tasks"] * after["num_samples"] <= after["turns_played"] <= 2 * after["num_tasks"]
    assert "within 2 turns" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(model_dir), "--env", "toy-retry", "--max_turns", "3", "--dataset",
                     str(rows), "--num_tasks", "3", "--max_new_tokens", "4", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert set(result["pass_within_turns"]) == {"1", "2", "3"}
    assert result["pass_within_turns"]["1"] <= result["pass_within_turns"]["2"] <= result["pass_within_turns"]["3"]
    assert result["pass_at_k"]["1"] == result["pass_within_turns"]["3"]
    assert "within 3 turns" in capsys.readouterr().out

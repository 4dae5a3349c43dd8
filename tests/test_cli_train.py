"""`sdpo train` / `sdpo eval` end to end on a tiny model, config parsing, interrupt → checkpoint → resume."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from sdpo_core.app import cli
from sdpo_core.app.callbacks import (
    HELDOUT_ACCURACY,
    HELDOUT_ERROR,
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    evaluation_records,
    read_metrics,
    training_records,
)
from sdpo_core.app.runs import DEFAULTS, CLIError, grpo_twin, parse_env_args, parse_train_args, split_rows, train
from sdpo_core.config import PRESETS, SDPOConfig
from sdpo_core.testing import save_tiny_model
from sdpo_envs import hookimpl
from sdpo_envs.testing import FakeEnvironment, registered_plugin

REPO = Path(__file__).resolve().parent.parent


class _BreakableEnvironment(FakeEnvironment):
    """`FakeEnvironment` whose `prompt()` raises while the file `broken` exists: an environment that breaks
    for a while (a vanished sandbox folder, a dropped connection), seen by the held-out evaluation, which
    renders its prompts through the environment (training reads the rows' `prompt` column)."""

    def __init__(self, broken: str = "", **kwargs):
        super().__init__(**kwargs)
        self.broken = broken

    def prompt(self, task):
        if self.broken and Path(self.broken).exists():
            raise RuntimeError("the environment is broken")
        return super().prompt(task)


class _ToyPlugin:
    """Registers `toy`: reward 1 when the completion contains the row's answer (a common letter here), and
    `toy-breakable` (`_BreakableEnvironment`)."""

    @hookimpl
    def register_environments(self, register):
        register("toy", FakeEnvironment)
        register("toy-breakable", _BreakableEnvironment)


@pytest.fixture
def toy_env():
    with registered_plugin(_ToyPlugin(), name="test-toy-env"):
        yield "toy"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(folder)
    return folder


def write_rows(path: Path, n: int = 16) -> Path:
    questions = [f"What is {a} + {b}?" for a in range(4) for b in range(4)][:n]
    with path.open("w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": "ae"[i % 2]}) + "\n")
    return path


@pytest.fixture
def tiny_argv(model_dir, tmp_path):
    """`sdpo train` flags for a 2-step run of the tiny model (about a second a step)."""

    def make(output: str = "run", steps: int = 2, *extra: str) -> list[str]:
        return ["--model", str(model_dir), "--env", "toy", "--dataset", str(write_rows(tmp_path / "rows.jsonl")),
                "--output_dir", str(tmp_path / output), "--max_steps", str(steps), "--num_generations", "4",
                "--per_device_train_batch_size", "4", "--max_completion_length", "6", "--eval_size", "4",
                "--eval_batch_size", "4", "--learning_rate", "1e-2", "--disable_tqdm", "true", *extra]

    return make


# ------------------------------------------------------------------------------------------ parsing
def test_no_arguments_is_the_embedded_demo():
    script, training, sdpo = parse_train_args([])
    assert script.model is None  # resolve_model(None): the shipped demo model
    assert script.environment == "math"
    assert script.environment_kwargs == DEFAULTS["environment_kwargs"]
    assert (training.num_generations, training.max_completion_length, training.max_steps) == (8, 48, 30)
    assert sdpo.alpha == 0.5
    assert sdpo.distillation_topk == 100


def test_the_demo_trains_sdpo_with_the_guarded_sharp_preset():
    script, _, sdpo = parse_train_args([])
    assert script.preset == "guarded_sharp"
    assert sdpo == SDPOConfig.from_preset("guarded_sharp")
    assert (sdpo.distillation_weight, sdpo.teacher_update_rate, sdpo.teacher_temperature) == (0.5, 0.01, 0.9)


@pytest.mark.parametrize("argv", [["--no_enabled"], ["--enabled", "false"], ["--enabled=false"]])
def test_the_demo_as_grpo_is_plain_grpo(argv):
    script, _, sdpo = parse_train_args(argv)
    assert script.preset is None
    assert sdpo == SDPOConfig(enabled=False)


def test_the_demo_with_the_paper_preset_is_sdpo_config_defaults():
    script, _, sdpo = parse_train_args(["--preset", "paper"])
    assert script.preset == "paper"
    assert sdpo == SDPOConfig()


def test_the_demo_preset_is_the_math_environment_s_only(toy_env):
    script, _, sdpo = parse_train_args(["--env", "toy"])
    assert script.preset is None
    assert sdpo == SDPOConfig()


def test_example_math_config_is_the_embedded_default():
    assert parse_train_args(["--config", str(REPO / "examples/math_cpu.yaml")]) == parse_train_args([])


@pytest.mark.parametrize("name", ["math_cpu.yaml", "code_lcb_cpu.yaml", "lcb_reference_gpu.yaml"])
def test_example_configs_parse(name):
    parse_train_args(["--config", str(REPO / "examples" / name)])


def test_yaml_sets_every_dataclass_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "environment": "code", "environment_kwargs": {"time_limit": 2.0},  # TrainArguments
        "learning_rate": "3e-6", "num_generations": 4, "bf16": False,  # GRPOConfig (a string, as YAML reads 3e-6)
        "alpha": 1.0, "distillation_topk": 20, "apply_chat_template_kwargs": {"enable_thinking": False},  # SDPO
        "env": {"SDPO_TEST_VARIABLE": "set-by-yaml"},  # TRL's convention: environment variables
    }))
    argv = ["--config", str(config), "--alpha", "0.25", "--env-arg", "memory_mb=512"]
    script, training, sdpo = parse_train_args(argv)
    assert script.environment == "code"
    assert script.environment_kwargs == {"time_limit": 2.0, "memory_mb": 512}
    assert training.learning_rate == 3e-6
    assert training.num_generations == 4
    assert training.bf16 is False
    assert sdpo.alpha == 0.25
    assert sdpo.distillation_topk == 20
    assert sdpo.apply_chat_template_kwargs == {"enable_thinking": False}
    assert os.environ.pop("SDPO_TEST_VARIABLE") == "set-by-yaml"


def test_unknown_yaml_key_is_rejected_by_name(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("alpha: 1.0\nema_update_rate: 0.01\n")  # lasgroup/SDPO's stale key
    with pytest.raises(CLIError, match=r"unknown key\(s\) 'ema_update_rate' \(did you mean 'teacher_update_rate'\?\)"):
        parse_train_args(["--config", str(config)])


def test_unknown_flag_and_bad_value_are_errors(capsys):
    assert cli.main(["train", "--no_such_flag", "1"]) == 2
    assert "no_such_flag" in capsys.readouterr().err
    assert cli.main(["train", "--alpha", "1.5"]) == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err


def test_env_key_must_be_a_mapping(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("env: math\n")
    with pytest.raises(CLIError, match="environment:"):
        parse_train_args(["--config", str(config)])


def test_preset_sits_under_yaml_and_flags(tmp_path):
    _, _, sdpo = parse_train_args(["--preset", "reference_lcb"])
    assert (sdpo.alpha, sdpo.distillation_topk, sdpo.teacher_update_rate) == (1.0, 20, 0.01)
    config = tmp_path / "run.yaml"
    config.write_text("preset: reference_lcb\ndistillation_topk: 50\n")
    _, _, sdpo = parse_train_args(["--config", str(config), "--teacher_update_rate", "0.02"])
    assert (sdpo.alpha, sdpo.distillation_topk, sdpo.teacher_update_rate) == (1.0, 50, 0.02)


def test_compare_grpo_on_a_run_that_is_grpo_already_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(CLIError, match=r"--compare_grpo .* enabled=False on the command line \(--no_enabled"):
        parse_train_args(["--compare_grpo", "--no_enabled"])
    with pytest.raises(CLIError, match=r"--compare_grpo .* enabled=False on the command line"):
        parse_train_args(["--compare_grpo", "--enabled", "false"])
    config = tmp_path / "grpo.yaml"
    config.write_text("enabled: false\ncompare_grpo: true\n")
    with pytest.raises(CLIError, match=f"enabled=False in --config {config}"):
        parse_train_args(["--config", str(config)])
    monkeypatch.setitem(PRESETS, "plain_grpo", {"enabled": False})
    with pytest.raises(CLIError, match="enabled=False by --preset plain_grpo"):
        parse_train_args(["--preset", "plain_grpo", "--compare_grpo"])
    assert cli.main(["train", "--compare_grpo", "--no_enabled"]) == 2


def test_grpo_twin_keeps_only_what_grpo_reads():
    _, _, sdpo = parse_train_args(["--preset", "reference_lcb"])
    twin = grpo_twin(sdpo)
    assert twin == SDPOConfig(enabled=False, success_reward_threshold=0.5)


def test_eval_every_must_not_be_negative():
    assert parse_train_args([])[0].eval_every == 10
    with pytest.raises(CLIError, match="eval_every must be >= 0"):
        parse_train_args(["--eval_every", "-1"])


def test_peft_flags(tmp_path):
    from sdpo_core.app.runs import lora_config

    script, _, _ = parse_train_args(["--use-peft", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj"])
    config = lora_config(script)
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (8, 32, {"q_proj", "v_proj"})
    assert lora_config(parse_train_args([])[0]) is None


def test_env_args_parse_json_values():
    assert parse_env_args(["n=3", "flag=true", "name=abc", "xs=[1, 2]"]) == {"n": 3, "flag": True, "name": "abc",
                                                                             "xs": [1, 2]}
    with pytest.raises(CLIError, match="KEY=VALUE"):
        parse_env_args(["novalue"])


def test_heldout_split_drops_training_rows_with_an_evaluated_prompt():
    from datasets import Dataset

    rows = Dataset.from_list([{"question": f"q{i % 5}", "answer": "a"} for i in range(40)])
    env = FakeEnvironment()
    env.prompt = lambda task: [{"role": "user", "content": task["question"]}]
    train_rows, eval_rows = split_rows(rows, env, eval_size=2, eval_on="heldout", seed=0)
    held = {json.dumps(r["prompt"]) for r in eval_rows}
    assert len(eval_rows) == 2
    assert train_rows
    assert all(json.dumps(p) not in held for p in train_rows["prompt"])
    same_rows, first = split_rows(rows, env, eval_size=3, eval_on="train", seed=0)
    assert len(same_rows) == 40
    assert [r["question"] for r in first] == ["q0", "q1", "q2"]


def test_heldout_split_of_the_demo_holds_distinct_untrained_prompts():
    from sdpo_math import MathEnvironment

    env = MathEnvironment(difficulty=0)
    rows = env.dataset()  # 1000 rows of one-digit sums: 100 distinct questions, each about ten times
    train_rows, eval_rows = split_rows(rows, env, eval_size=48, eval_on="heldout", seed=0)
    held = [json.dumps(r["prompt"]) for r in eval_rows]
    trained = {json.dumps(p) for p in train_rows["prompt"]}
    assert len(held) == len(set(held)) == 48
    assert trained.isdisjoint(held)
    assert len(trained) == 100 - 48
    assert len(train_rows) + sum(p in set(held) for p in map(json.dumps, rows["prompt"])) == len(rows)
    _, again = split_rows(rows, env, eval_size=48, eval_on="heldout", seed=0)
    assert again == eval_rows  # the same seed, the same held-out set (SDPO and its GRPO twin share it)
    _, other = split_rows(rows, env, eval_size=48, eval_on="heldout", seed=1)
    assert other != eval_rows


def test_heldout_split_without_enough_distinct_prompts_is_an_error():
    from sdpo_math import MathEnvironment

    env = MathEnvironment(difficulty=0)
    with pytest.raises(CLIError, match=r"eval_size 100: the 1000 rows hold 100 distinct prompts.*below 100"):
        split_rows(env.dataset(), env, eval_size=100, eval_on="heldout", seed=0)
    train_rows, eval_rows = split_rows(env.dataset(), env, eval_size=99, eval_on="heldout", seed=0)
    assert len(eval_rows) == 99
    assert len({json.dumps(p) for p in train_rows["prompt"]}) == 1


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_dataset_files(tmp_path, suffix):
    from datasets import Dataset

    from sdpo_core.app.runs import load_dataset_spec

    rows = Dataset.from_list([{"prompt": f"p{i}", "answer": str(i)} for i in range(3)])
    path = tmp_path / f"rows{suffix}"
    {".json": lambda p: p.write_text(json.dumps(rows.to_list())), ".jsonl": lambda p: rows.to_json(p),
     ".parquet": lambda p: rows.to_parquet(p), ".csv": lambda p: rows.to_csv(p, index=False)}[suffix](path)
    assert load_dataset_spec(str(path))["prompt"] == ["p0", "p1", "p2"]
    with pytest.raises(CLIError, match="no such file"):
        load_dataset_spec(str(tmp_path / "missing.jsonl"))


def test_plot_and_summary_from_records(tmp_path):
    from sdpo_core.app.callbacks import plot_runs, summarize

    sdpo = [{"step": i, "reward": i / 10, "sdpo/success_sample_fraction": 0.5, "sdpo/distillation_loss": 1 / i}
            for i in range(1, 7)] + [{"step": 6, "train_runtime": 12.0}]
    grpo = [{"step": i, "reward": i / 20, "loss": 0.1} for i in range(1, 7)]
    assert plot_runs({"SDPO": sdpo, "GRPO": grpo}, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    text = summarize(sdpo, title="t", notes={"evaluation before": "x"}, window=2)
    assert "reward (reward): 0.15 (mean of the first 2 logs) -> 0.55 (last 2)" in text
    assert "train runtime: 12 s" in text
    assert text.endswith("evaluation before: x\n")
    assert plot_runs({"SDPO": []}, tmp_path / "empty.png") is None


def _compared_runs():
    """Two hand-made runs of 6 steps with evaluations at steps 0, 3 and 6 (GRPO's at step 3 failed)."""
    sdpo = [{"step": 0, HELDOUT_ACCURACY: 0.5, "heldout/seconds": 2.0}]
    sdpo += [{"step": i, "reward": i / 10, "entropy": 2.0 + i / 10, "completions/mean_length": 30 + i,
              "sdpo/distillation_loss": 1 / i, "sdpo/teacher_entropy": 1.5, "frac_reward_zero_std": 0.5}
             for i in range(1, 7)]
    sdpo.insert(4, {"step": 3, HELDOUT_ACCURACY: 0.625})
    sdpo += [{"step": 6, HELDOUT_ACCURACY: 0.75}, {"step": 6, "train_runtime": 12.0}]
    grpo = [{"step": 0, HELDOUT_ACCURACY: 0.5}]
    grpo += [{"step": i, "reward": 0.5, "entropy": 1.0, "completions/mean_length": 20, "loss": 0.1,
              "frac_reward_zero_std": 1.0} for i in range(1, 7)]
    grpo += [{"step": 3, HELDOUT_ERROR: "RuntimeError: broken"}, {"step": 6, HELDOUT_ACCURACY: 0.25}]
    return {"SDPO": sdpo, "GRPO": grpo}


def test_records_split_into_training_logs_and_evaluations():
    runs = _compared_runs()
    assert [r["step"] for r in training_records(runs["SDPO"])] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r.get(HELDOUT_ACCURACY)) for r in evaluation_records(runs["GRPO"])] == [
        (0, 0.5), (3, None), (6, 0.25)]


def test_evaluation_record_holds_a_result_or_an_error():
    from sdpo_core.app.callbacks import evaluation_record
    from sdpo_core.app.evaluation import EvalResult

    result = EvalResult(num_tasks=4, num_samples=1, pass_at_k={1: 0.75}, mean_reward=0.8, success_rate=0.75)
    assert evaluation_record(10, result, seconds=1.234) == {"step": 10, HELDOUT_ACCURACY: 0.75,
                                                           "heldout/mean_reward": 0.8, "heldout/seconds": 1.23}
    assert evaluation_record(20, error=RuntimeError("no sandbox")) == {"step": 20,
                                                                       HELDOUT_ERROR: "RuntimeError: no sandbox"}
    with pytest.raises(ValueError, match="exactly one"):
        evaluation_record(0)
    with pytest.raises(ValueError, match="exactly one"):
        evaluation_record(0, result, error=RuntimeError("x"))


def test_plot_panels_are_what_some_run_logged(tmp_path):
    from sdpo_core.app.callbacks import plot_panels, plot_runs

    runs = _compared_runs()
    titles = [title for title, _, _ in plot_panels(runs)]
    assert titles == ["held-out accuracy (greedy)", "reward", "entropy", "completion length", "loss",
                      "sdpo/teacher_entropy", "frac_reward_zero_std"]
    assert [title for title, _, _ in plot_panels({"GRPO": runs["GRPO"][1:7]})] == [
        "reward", "entropy", "completion length", "loss", "frac_reward_zero_std"]
    assert plot_runs(runs, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").stat().st_size > 30_000


def test_summary_and_comparison_lines():
    from sdpo_core.app.callbacks import compare_runs, summarize

    runs = _compared_runs()
    text = summarize(runs["SDPO"], title="t", window=2)
    assert "steps logged: 6 (last step 6)" in text
    assert "held-out accuracy: 0.500 (step 0) -> 0.625 (step 3) -> 0.750 (step 6)" in text
    assert "entropy (entropy): 2.15 (mean of the first 2 logs) -> 2.55 (last 2)" in text
    lines = compare_runs(runs, window=2).splitlines()
    assert lines[0] == ("held-out: greedy accuracy at each evaluation; reward, entropy: mean of the first 2 -> "
                        "last 2 steps")
    assert lines[1] == ("SDPO  held-out 0.500 (step 0) -> 0.625 (step 3) -> 0.750 (step 6) | reward 0.150 -> 0.550 | "
                        "entropy 2.150 -> 2.550 | mean length 33.5")
    assert lines[2] == ("GRPO  held-out 0.500 (step 0) -> failed (step 3: RuntimeError: broken) -> 0.250 (step 6) | "
                        "reward 0.500 -> 0.500 | entropy 1.000 -> 1.000 | mean length 20.0")


# ------------------------------------------------------------------------------------------ running
def test_train_end_to_end_writes_its_files_and_compares_with_grpo(toy_env, tiny_argv, tmp_path, capsys):
    assert cli.main(["train", *tiny_argv("run", 2, "--compare_grpo", "--eval_every", "1")]) == 0
    out = capsys.readouterr().out
    assert "evaluation before training: pass@1" in out
    assert "evaluation at step 1: pass@1" in out
    assert "held-out accuracy" in out
    run, grpo = tmp_path / "run", tmp_path / "run-grpo"
    records = training_records(read_metrics(run / METRICS_FILE))
    assert [r["step"] for r in records] == [1, 2]
    for folder in (run, grpo):  # before, during (every step here) and after training, each with its accuracy
        evaluations = evaluation_records(read_metrics(folder / METRICS_FILE))
        assert [r["step"] for r in evaluations] == [0, 1, 2]
        assert all(0.0 <= r[HELDOUT_ACCURACY] <= 1.0 for r in evaluations)
    # GRPO starts from the same model on the same held-out set: SDPO's evaluation before training is reused
    assert evaluation_records(read_metrics(grpo / METRICS_FILE))[0][HELDOUT_ACCURACY] == \
        evaluation_records(read_metrics(run / METRICS_FILE))[0][HELDOUT_ACCURACY]
    comparison = [line for line in out.splitlines() if line.startswith(("SDPO  held-out", "GRPO  held-out"))]
    assert len(comparison) == 2
    assert all("(step 0) ->" in line and "| reward " in line and "| entropy " in line and "| mean length " in line
               for line in comparison)
    assert comparison[0] in (run / SUMMARY_FILE).read_text()
    assert {"reward", "sdpo/distillation_loss", "sdpo/reprompt_sample_fraction"} <= set(records[0])
    assert (run / PLOT_FILE).stat().st_size > 10_000
    summary = (run / SUMMARY_FILE).read_text()
    assert "evaluation before" in summary
    assert "accuracy change" in summary
    teacher = json.loads((run / "checkpoint-2" / "sdpo_teacher.json").read_text())
    assert teacher["updates"] == 2
    assert (run / "model.safetensors").is_file()
    assert (run / "eval_tasks.jsonl").is_file()
    # the GRPO baseline: same budget, plain GRPO loss, no teacher in its checkpoints
    grpo_records = training_records(read_metrics(grpo / METRICS_FILE))
    assert [r["step"] for r in grpo_records] == [1, 2]
    assert "sdpo/distillation_loss" not in grpo_records[0]
    assert not (grpo / "checkpoint-2" / "sdpo_teacher.json").exists()
    assert (grpo / PLOT_FILE).is_file()


class _RaiseAt(TrainerCallback):
    """Simulates a second Ctrl-C (KeyboardInterrupt) at the end of `step`, after its teacher update."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt
        return control


class _SignalDuring(TrainerCallback):
    """Sends a real SIGINT while `step` runs: the run's handler asks for a checkpoint at the step's end."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)
        return control


def test_interrupt_saves_a_checkpoint_and_resume_continues(toy_env, tiny_argv, tmp_path):
    argv = tiny_argv("run", 3)
    (run,) = train(argv, callbacks=[_RaiseAt(2)])
    assert run.interrupted
    assert run.global_step == 2
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "sdpo_teacher.json").read_text())["updates"] == 2
    assert (checkpoint / "sdpo_teacher.pt").is_file()
    assert (checkpoint / "optimizer.pt").is_file()
    assert "interrupted" in (tmp_path / "run" / SUMMARY_FILE).read_text()

    (resumed,) = train([*argv, "--resume"])
    assert not resumed.interrupted
    assert resumed.global_step == 3
    assert resumed.before is not None  # read back from eval_before.json, not re-measured on trained weights
    records = read_metrics(tmp_path / "run" / METRICS_FILE)
    assert [r["step"] for r in training_records(records)] == [1, 2, 3]
    assert [r["step"] for r in evaluation_records(records)] == [0, 3]  # the first run's before, kept by checkpoint-2
    assert (tmp_path / "run" / "checkpoint-3" / "sdpo_teacher.json").is_file()


class _BreakDuring(TrainerCallback):
    """Makes `_BreakableEnvironment` fail from the end of `step` (its evaluation included) to the next step."""

    def __init__(self, flag: Path, step: int) -> None:
        self.flag = flag
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.flag.touch()
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.flag.unlink(missing_ok=True)
        return control


def test_an_evaluation_that_fails_is_recorded_and_training_goes_on(toy_env, tiny_argv, tmp_path, capsys):
    flag = tmp_path / "broken"
    argv = [*tiny_argv("run", 3, "--eval_every", "1"), "--env", "toy-breakable", "--env-arg", f"broken={flag}"]
    (run,) = train(argv, callbacks=[_BreakDuring(flag, 2)])
    assert not run.interrupted
    assert run.global_step == 3
    assert "evaluation at step 2 failed (RuntimeError: the environment is broken)" in capsys.readouterr().out
    records = read_metrics(tmp_path / "run" / METRICS_FILE)
    assert [r["step"] for r in training_records(records)] == [1, 2, 3]
    evaluations = evaluation_records(records)
    assert [(r["step"], HELDOUT_ACCURACY in r) for r in evaluations] == [(0, True), (1, True), (2, False), (3, True)]
    assert evaluations[2][HELDOUT_ERROR] == "RuntimeError: the environment is broken"
    assert evaluations[2]["heldout/seconds"] >= 0
    assert "failed (step 2: RuntimeError: the environment is broken)" in (tmp_path / "run" / SUMMARY_FILE).read_text()
    assert run.after is not None


def test_resume_keeps_updating_the_teacher(toy_env, tiny_argv, tmp_path):
    argv = tiny_argv("run", 3)
    train(argv, callbacks=[_RaiseAt(2)])
    train([*argv, "--resume"])
    assert json.loads((tmp_path / "run" / "checkpoint-3" / "sdpo_teacher.json").read_text())["updates"] == 3


def test_sigint_finishes_the_step_and_saves(toy_env, tiny_argv, tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    (run,) = train(tiny_argv("run", 3), callbacks=[_SignalDuring(1)])
    assert run.interrupted
    assert run.global_step == 1
    assert (tmp_path / "run" / "checkpoint-1" / "sdpo_teacher.json").is_file()
    assert signal.getsignal(signal.SIGINT) is previous


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are fitted from /proc")
def test_training_refits_cpu_threads_every_step_unless_the_user_chose(toy_env, tiny_argv, monkeypatch):
    import torch

    from sdpo_core.app import cpu_threads

    fitted: list[int] = []
    original = cpu_threads.CpuThreadFitter.fit

    def spy(self):
        fitted.append(original(self))
        return fitted[-1]

    monkeypatch.setattr(cpu_threads.CpuThreadFitter, "fit", spy)
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        train(tiny_argv("fitted", 2))
        assert len(fitted) == 2
        assert all(n is not None and 1 <= n <= (os.cpu_count() or 1) for n in fitted)
        fitted.clear()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        train(tiny_argv("chosen", 2))
        assert fitted == []
    finally:
        torch.set_num_threads(threads)


def test_eval_command(toy_env, model_dir, tmp_path, capsys):
    rows = write_rows(tmp_path / "rows.jsonl", n=6)
    code = cli.main(["eval", "--model", str(model_dir), "--env", "toy", "--dataset", str(rows), "--k", "1", "2",
                     "--max-new-tokens", "4", "--json", str(tmp_path / "eval.json"), "--show", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "pass@1" in out
    assert "pass@2" in out
    assert "6 tasks, 2 samples/task" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_tasks"] == 6
    assert len(result["samples"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sdpo_reward") is None, reason="needs the sdpo-reward plugin installed")
def test_two_process_cpu_run_through_accelerate_launch(model_dir, tmp_path):
    (tmp_path / "toy_reward.py").write_text(
        "def reward(prompts, completions, answer, **kwargs):\n"
        "    texts = [c if isinstance(c, str) else c[-1]['content'] for c in completions]\n"
        "    return [(1.0, '') if a in t else (0.0, 'the answer is missing') for a, t in zip(answer, texts)]\n"
    )
    rows = write_rows(tmp_path / "rows.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDPO_LOAD_PLUGINS": "sdpo-reward",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "examples/accelerate/ddp_cpu2.yaml"), "-m", "sdpo_core.app.cli", "train",
               "--model", str(model_dir), "--env", "reward", "--env-arg", "fn=toy_reward:reward",
               "--dataset", str(rows),
               "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--num_generations", "4",
               "--per_device_train_batch_size", "2", "--max_completion_length", "6", "--eval_size", "2",
               "--disable_tqdm", "true"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "checkpoint-2" / "sdpo_teacher.json").read_text())["updates"] == 2
    assert [r["step"] for r in training_records(read_metrics(tmp_path / "run" / METRICS_FILE))] == [1, 2]


def test_stop_on_collapse_checkpoints_stops_and_notes_it(toy_env, tiny_argv, tmp_path, monkeypatch, capsys):
    import functools

    from sdpo_core.app import collapse

    # The tiny model fills its 6-token cap: with a 1-step window, pinned lengths hold from step 1.
    monkeypatch.setattr(collapse, "CollapseThresholds",
                        functools.partial(collapse.CollapseThresholds, clipped_level=0.5, clipped_steps=1))
    (run,) = train(tiny_argv("run", 3, "--stop_on_collapse"))
    assert run.global_step == 1
    assert (tmp_path / "run" / "checkpoint-1" / "sdpo_teacher.json").is_file()
    assert "collapse warnings: step 1, lengths pinned at the cap" in (tmp_path / "run" / SUMMARY_FILE).read_text()
    assert "stopped at step 1 on a collapse signature" in capsys.readouterr().out

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

from sdpo_core import cli
from sdpo_core.callbacks import METRICS_FILE, PLOT_FILE, SUMMARY_FILE, read_metrics
from sdpo_core.testing import tiny_model, tiny_tokenizer
from sdpo_core.train_cli import DEFAULTS, CLIError, parse_env_args, parse_train_args, split_rows, train
from sdpo_envs import hookimpl
from sdpo_envs.testing import FakeEnvironment, registered_plugin

REPO = Path(__file__).resolve().parent.parent


class _ToyPlugin:
    """Registers `toy`: reward 1 when the completion contains the row's answer (a common letter here)."""

    @hookimpl
    def register_environments(self, register):
        register("toy", FakeEnvironment)


@pytest.fixture
def toy_env():
    with registered_plugin(_ToyPlugin(), name="test-toy-env"):
        yield "toy"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
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


def test_peft_flags(tmp_path):
    from sdpo_core.train_cli import lora_config

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


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_dataset_files(tmp_path, suffix):
    from datasets import Dataset

    from sdpo_core.train_cli import load_dataset_spec

    rows = Dataset.from_list([{"prompt": f"p{i}", "answer": str(i)} for i in range(3)])
    path = tmp_path / f"rows{suffix}"
    {".json": lambda p: p.write_text(json.dumps(rows.to_list())), ".jsonl": lambda p: rows.to_json(p),
     ".parquet": lambda p: rows.to_parquet(p), ".csv": lambda p: rows.to_csv(p, index=False)}[suffix](path)
    assert load_dataset_spec(str(path))["prompt"] == ["p0", "p1", "p2"]
    with pytest.raises(CLIError, match="no such file"):
        load_dataset_spec(str(tmp_path / "missing.jsonl"))


def test_plot_and_summary_from_records(tmp_path):
    from sdpo_core.callbacks import plot_runs, summarize

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


# ------------------------------------------------------------------------------------------ running
def test_train_end_to_end_writes_its_files_and_compares_with_grpo(toy_env, tiny_argv, tmp_path, capsys):
    assert cli.main(["train", *tiny_argv("run", 2, "--compare_grpo")]) == 0
    out = capsys.readouterr().out
    assert "evaluation before training: pass@1" in out
    assert "held-out accuracy" in out
    run, grpo = tmp_path / "run", tmp_path / "run-grpo"
    records = [r for r in read_metrics(run / METRICS_FILE) if "train_runtime" not in r]
    assert [r["step"] for r in records] == [1, 2]
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
    grpo_records = [r for r in read_metrics(grpo / METRICS_FILE) if "train_runtime" not in r]
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
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / METRICS_FILE) if "train_runtime" not in r]
    assert steps == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoint-3" / "sdpo_teacher.json").is_file()


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

    from sdpo_core import cpu_threads

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
               str(REPO / "examples/accelerate/ddp_cpu2.yaml"), "-m", "sdpo_core.cli", "train",
               "--model", str(model_dir), "--env", "reward", "--env-arg", "fn=toy_reward:reward",
               "--dataset", str(rows),
               "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--num_generations", "4",
               "--per_device_train_batch_size", "2", "--max_completion_length", "6", "--eval_size", "2",
               "--disable_tqdm", "true"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "checkpoint-2" / "sdpo_teacher.json").read_text())["updates"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run" / METRICS_FILE) if "train_runtime" not in r] == [1, 2]


def test_stop_on_collapse_checkpoints_stops_and_notes_it(toy_env, tiny_argv, tmp_path, monkeypatch, capsys):
    import functools

    from sdpo_core import collapse

    # The tiny model fills its 6-token cap: with a 1-step window, pinned lengths hold from step 1.
    monkeypatch.setattr(collapse, "CollapseThresholds",
                        functools.partial(collapse.CollapseThresholds, clipped_level=0.5, clipped_steps=1))
    (run,) = train(tiny_argv("run", 3, "--stop_on_collapse"))
    assert run.global_step == 1
    assert (tmp_path / "run" / "checkpoint-1" / "sdpo_teacher.json").is_file()
    assert "collapse warnings: step 1, lengths pinned at the cap" in (tmp_path / "run" / SUMMARY_FILE).read_text()
    assert "stopped at step 1 on a collapse signature" in capsys.readouterr().out

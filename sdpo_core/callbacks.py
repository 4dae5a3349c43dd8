"""Trainer callbacks for watching and stopping a run: a progress bar, run files, and a clean Ctrl-C.

- `ProgressBarCallback`: one tqdm bar with the step, the mean reward, the success fraction and the
  distillation loss (replaces transformers' bar, which prints every log dict).
- `RunFilesCallback`: `metrics.jsonl` (one JSON line per log, appended as the run goes), and at each save
  and at the end `training_curves.png` (reward, success fraction and loss per step; other runs, e.g. the
  GRPO baseline of `sdpo train --compare-grpo`, on the same axes) and `summary.txt`.
- `InterruptCallback`: `request()` (called from a SIGINT handler) makes the trainer finish the current
  optimizer step, save a checkpoint (teacher included) and stop, so the checkpoint is a consistent state.

All files are written by the world's process zero only. Plots use matplotlib's Agg canvas directly (no
pyplot, no global backend switch); without matplotlib (`pip install sdpo-gym[plot]`) the plot is skipped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
SUMMARY_FILE = "summary.txt"

# Which logged metric each curve shows; the first key a run logged wins. `sdpo/success_fraction` is the
# fraction of rollouts at or above `success_reward_threshold` (logged in both modes when the trainer has it);
# `sdpo/success_sample_fraction` (rollouts with a demonstration) is the SDPO-only fallback.
PANELS: dict[str, tuple[str, ...]] = {
    "reward": ("reward",),
    "success fraction": ("sdpo/success_fraction", "sdpo/success_sample_fraction"),
    "loss": ("sdpo/distillation_loss", "loss"),
}
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


def training_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Per-step training logs (drops the end-of-training summary record, which has `train_runtime`)."""
    return [r for r in records if "step" in r and "train_runtime" not in r]


def series(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> tuple[str | None, list[int], list[float]]:
    """`(key, steps, values)` of the first of `keys` the records hold."""
    chosen = next((k for k in keys if any(first_present(r, (k,)) for r in records)), None)
    if chosen is None:
        return None, [], []
    points = [(int(r["step"]), float(r[chosen])) for r in records if first_present(r, (chosen,))]
    return chosen, [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path | None:
    """Draw reward, success fraction and loss per step for each run (label → records) into a PNG.

    Returns the path, or `None` when matplotlib is not installed or no run has a training record.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed; no plot (pip install 'sdpo-gym[plot]')")
        return None
    runs = {label: training_records(records) for label, records in runs.items()}
    if not any(runs.values()):
        return None
    figure = Figure(figsize=(4.2 * len(PANELS), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    for axis, (title, keys) in zip(figure.subplots(1, len(PANELS)), PANELS.items(), strict=True):
        for label, records in runs.items():
            key, steps, values = series(records, keys)
            if key is None:
                continue
            name = f"{label} ({key})" if len(keys) > 1 else label
            if len(values) < 2 * SMOOTHING:
                axis.plot(steps, values, marker="o", markersize=3, label=name)
                continue
            # one prompt group per step is noisy: faint raw points, and their running mean
            (raw,) = axis.plot(steps, values, alpha=0.3, linewidth=1)
            axis.plot(steps, rolling_mean(values, SMOOTHING), color=raw.get_color(),
                      label=f"{name}, mean of {SMOOTHING} steps")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize="small")
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


def summarize(records: Sequence[Mapping[str, Any]], *, title: str, notes: Mapping[str, str] | None = None,
              window: int = 5) -> str:
    """A short text summary of a run: steps, and each panel's metric over the first and last `window` logs."""
    steps = training_records(records)
    lines = [title]
    if steps:
        lines.append(f"steps logged: {len(steps)} (last step {steps[-1]['step']})")
    end = next((r for r in reversed(records) if "train_runtime" in r), None)
    if end is not None:
        lines.append(f"train runtime: {end['train_runtime']:.0f} s")
    for name, keys in PANELS.items():
        key, _, values = series(steps, keys)
        if key is not None:
            first, last = _mean(values[:window]), _mean(values[-window:])
            shown = min(window, len(values))
            lines.append(f"{name} ({key}): {first:.4g} (mean of the first {shown} logs) -> {last:.4g} (last {shown})")
    lines.extend(f"{key}: {value}" for key, value in (notes or {}).items())
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
        (self.output_dir / SUMMARY_FILE).write_text(
            summarize(records, title=f"{self.label} run in {self.output_dir}", notes=self.notes)
        )


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
    "METRICS_FILE",
    "PANELS",
    "PLOT_FILE",
    "SUMMARY_FILE",
    "InterruptCallback",
    "ProgressBarCallback",
    "RunFilesCallback",
    "first_present",
    "plot_runs",
    "read_metrics",
    "rolling_mean",
    "series",
    "summarize",
    "training_records",
]

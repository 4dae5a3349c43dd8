"""A callback that watches the logged metrics for the collapse signatures of `sdpo_core.diagnostics`.

Each training log adds one point per watched metric; after each log every signature is checked on the
history. A signature that starts to hold is warned about once (an *episode*); it warns again only after it
stopped holding and came back. With `stop=True` the first episode also saves a checkpoint and stops training.
The thresholds and where their defaults come from are in docs/training.md ("Collapse warnings").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sdpo_core import diagnostics

logger = logging.getLogger(__name__)

__all__ = ["CollapseEpisode", "CollapseThresholds", "CollapseWatchCallback"]


@dataclass(frozen=True)
class CollapseThresholds:
    """When each signature holds. The defaults suit a run that logs every step with one 8-completion group per
    step (the embedded demo); see docs/training.md for their origin."""

    entropy_floor: float = 0.1
    entropy_drop_fraction: float = 0.8
    entropy_rise_fraction: float = 0.5
    early_steps: int = 5
    recent_steps: int = 5
    clipped_level: float = 0.9
    clipped_steps: int = 5
    reward_margin: float = 0.2
    reward_window: int = 5

    def __post_init__(self) -> None:
        for name in ("early_steps", "recent_steps", "clipped_steps", "reward_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("entropy_drop_fraction", "clipped_level"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("entropy_floor", "entropy_rise_fraction", "reward_margin"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def signatures(self) -> dict[str, tuple[str, Callable[[list[float | None]], str | None]]]:
        """Signature name → (the logged metric it reads, the check on that metric's history)."""
        return {
            "entropy collapse": ("entropy", lambda h: diagnostics.entropy_collapsed(
                h, floor=self.entropy_floor, drop_fraction=self.entropy_drop_fraction,
                early_steps=self.early_steps, recent_steps=self.recent_steps)),
            "entropy surge": ("entropy", lambda h: diagnostics.entropy_surged(
                h, rise_fraction=self.entropy_rise_fraction, early_steps=self.early_steps,
                recent_steps=self.recent_steps)),
            "lengths pinned at the cap": ("completions/clipped_ratio", lambda h: diagnostics.lengths_pinned(
                h, level=self.clipped_level, steps=self.clipped_steps)),
            "reward falling": ("reward", lambda h: diagnostics.reward_fell(
                h, margin=self.reward_margin, window=self.reward_window)),
        }


@dataclass(frozen=True)
class CollapseEpisode:
    """A signature that started to hold at `step`, and why."""

    step: int
    signature: str
    reason: str


class CollapseWatchCallback(TrainerCallback):
    """Warns (and with `stop`, checkpoints and stops) when a collapse signature appears in the training logs.

    Args:
        thresholds (`CollapseThresholds`, *optional*): when each signature holds; the documented defaults.
        stop (`bool`, *optional*, defaults to `False`): save a checkpoint and stop at the first episode.
    """

    def __init__(self, thresholds: CollapseThresholds | None = None, stop: bool = False) -> None:
        self.thresholds = thresholds or CollapseThresholds()
        self.stop = stop
        self.history: dict[str, list[float | None]] = {}
        self.episodes: list[CollapseEpisode] = []
        """Every episode seen: the step it started at, the signature and why it holds."""
        self.stopped_at: int | None = None
        self._active: set[str] = set()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Mapping[str, Any] | None = None, **kwargs: Any) -> TrainerControl:
        if not logs or "train_runtime" in logs or any(key.startswith("eval_") for key in logs):
            return control
        signatures = self.thresholds.signatures()
        for metric in {metric for metric, _ in signatures.values()}:
            value = logs.get(metric)
            self.history.setdefault(metric, []).append(value if isinstance(value, (int, float)) else None)
        for name, (metric, check) in signatures.items():
            reason = check(self.history[metric])
            if reason is None:
                self._active.discard(name)
                continue
            if name in self._active:
                continue
            self._active.add(name)
            self.episodes.append(CollapseEpisode(state.global_step, name, reason))
            action = "saving a checkpoint and stopping (stop_on_collapse)" if self.stop else "training goes on"
            if state.is_world_process_zero:
                logger.warning("collapse warning at step %d, %s: %s; %s", state.global_step, name, reason,
                               action)
            if self.stop and self.stopped_at is None:
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
        return control

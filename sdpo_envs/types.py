"""Structured results that environments hand to the trainer.

These are the whole contract between an environment and SDPO: a reward for GRPO-style scoring, a
text the teacher may read, and machine-readable details for metrics. No torch import here: plugin
authors depend on this module alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

Task = Mapping[str, Any]
"""One dataset row (its columns by name). Environments read the fields they need from it."""


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class Feedback:
    """What an environment says about one completion.

    Args:
        reward (`float` or `None`):
            The score. `None` means the environment abstains (its own fault, e.g. a sandbox that
            failed to start): TRL turns it into NaN and the sample gets no advantage.
        text (`str`, *optional*, defaults to `""`):
            What the teacher may read: a failing test, a traceback, "your answer 7 is wrong".
            Empty means there is nothing to say (a full pass).
        success (`bool`, *optional*, defaults to `False`):
            Whether the environment considers the episode solved.
        details (`Mapping[str, Any]`, *optional*):
            Machine-readable facts for metrics and logs (per-test verdicts, the parsed answer,
            the exception of a failed episode). Never shown to the teacher.
    """

    reward: float | None
    text: str = ""
    success: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reward is not None:
            if isinstance(self.reward, bool) or not isinstance(self.reward, (int, float)):
                raise TypeError(f"Feedback.reward must be a float or None, got {type(self.reward).__name__}")
            if math.isnan(self.reward):
                raise ValueError("Feedback.reward is NaN; use None to abstain")
            object.__setattr__(self, "reward", float(self.reward))
        if not isinstance(self.text, str):
            raise TypeError(f"Feedback.text must be a str, got {type(self.text).__name__}")
        object.__setattr__(self, "details", _frozen_mapping(self.details))


@dataclass(frozen=True)
class StepResult:
    """The outcome of `Environment.step`, Gym style.

    Args:
        feedback (`Feedback`): reward, text, success and details of the episode.
        done (`bool`, *optional*, defaults to `True`): whether the episode ended (single-turn
            environments always end after one step).
        info (`Mapping[str, Any]`, *optional*): extra diagnostics (timing, the task id).
    """

    feedback: Feedback
    done: bool = True
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "info", _frozen_mapping(self.info))

    @property
    def reward(self) -> float | None:
        return self.feedback.reward

"""Structured results that environments hand to the trainer.

These are the whole contract between an environment and SDPO: a reward for GRPO-style scoring, a
text the teacher may read, and machine-readable details for metrics. No torch import here: plugin
authors depend on this package alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

Task = Mapping[str, Any]
"""One dataset row (its columns by name). Environments read the fields they need from it."""

Prompt = str | list[dict[str, Any]]
"""A prompt: plain text, or chat messages (`[{"role": "user", "content": ...}]`) as TRL takes them."""

Completion = str | Sequence[Mapping[str, Any]]
"""A completion as TRL passes it: text, or the assistant messages of a conversational completion."""


class InvalidResultError(ValueError):
    """An environment or reward callable broke its result contract (wrong count, a non-number, not a `Feedback`).

    Raised rather than turned into a failed episode: it is a bug in code, not in the completion, and it
    would fail every training step the same way.
    """


class EnvironmentSetupError(RuntimeError):
    """An environment cannot run at all (a process environment that cannot be pickled, or that its worker
    processes cannot load). Raised rather than turned into failed episodes: every episode would fail."""


class EnvironmentNotFoundError(LookupError):
    """No environment answers to a name: unknown, hidden by the plugin allowlist/blocklist, registered
    by two plugins, or a router row naming an environment the router does not have."""

    def __str__(self) -> str:  # KeyError-style quoting would hide the message's formatting
        return str(self.args[0]) if self.args else ""


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
            Empty means there is nothing to say (a full pass, or nothing useful).
        success (`bool`, *optional*, defaults to `False`):
            Whether the environment considers the episode solved.
        details (`Mapping[str, Any]`, *optional*):
            Machine-readable facts for metrics and logs (per-test verdicts, the parsed answer,
            the exception of a failed episode under `"error"`). Never shown to the teacher.
    """

    reward: float | None
    text: str = ""
    success: bool = False
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.reward is not None:
            if isinstance(self.reward, bool) or not isinstance(self.reward, numbers.Real):
                raise TypeError(f"Feedback.reward must be a float or None, got {type(self.reward).__name__}")
            reward = float(self.reward)
            if math.isnan(reward):
                raise ValueError("Feedback.reward is NaN; use None to abstain")
            if math.isinf(reward):
                raise ValueError(f"Feedback.reward must be finite, got {reward}")
            object.__setattr__(self, "reward", reward)
        if not isinstance(self.text, str):
            raise TypeError(f"Feedback.text must be a str, got {type(self.text).__name__}")
        object.__setattr__(self, "success", bool(self.success))
        object.__setattr__(self, "details", _frozen_mapping(self.details))

    def __reduce__(self) -> tuple[type[Feedback], tuple[float | None, str, bool, dict[str, Any]]]:
        # A mappingproxy cannot be pickled; process workers send Feedback back to the trainer.
        return (Feedback, (self.reward, self.text, self.success, dict(self.details)))

    @property
    def failed(self) -> bool:
        """Whether the environment could not score the episode (it raised, timed out or crashed)."""
        return "error" in self.details


@dataclass(frozen=True)
class StepResult:
    """The outcome of `Environment.step`, Gym style.

    Args:
        feedback (`Feedback`): the episode so far: the latest attempt's text, success and details, and
            the episode's reward (the attempt's reward, discounted by the turn; see `sdpo_envs.episode`).
        done (`bool`, *optional*, defaults to `True`): whether the episode ended (single-turn
            environments always end after one step).
        info (`Mapping[str, Any]`, *optional*): extra diagnostics (`turn`, `max_turns`, timing).
        observation (`str`, *optional*): while the episode goes on, what the model reads next turn
            (the environment's feedback on this attempt); `None` once it is done.
    """

    feedback: Feedback
    done: bool = True
    info: Mapping[str, Any] = field(default_factory=dict, hash=False)
    observation: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.feedback, Feedback):
            raise TypeError(f"StepResult.feedback must be a Feedback, got {type(self.feedback).__name__}")
        if self.observation is not None and not isinstance(self.observation, str):
            raise TypeError(f"StepResult.observation must be a str or None, got {type(self.observation).__name__}")
        object.__setattr__(self, "info", _frozen_mapping(self.info))

    def __reduce__(self) -> tuple[type[StepResult], tuple[Feedback, bool, dict[str, Any], str | None]]:
        return (StepResult, (self.feedback, self.done, dict(self.info), self.observation))

    @property
    def reward(self) -> float | None:
        """The episode's reward so far (`feedback.reward`)."""
        return self.feedback.reward


@dataclass(frozen=True)
class Turn:
    """One attempt of an episode, as `Environment.respond` sees it in the history.

    Args:
        completion (`str`): the model's attempt (its text).
        feedback (`Feedback`): the environment's feedback on that attempt, undiscounted.
    """

    completion: str
    feedback: Feedback

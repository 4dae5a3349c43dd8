"""The feedback channel: how rewards and feedback texts travel from a reward function to the trainer.

This module is the one owner of that protocol: writing, resetting and validating `last_feedback`, and
what a reward value may be. TRL calls a reward function as `f(prompts=..., completions=...,
completion_ids=..., **columns)` on the local rows and wants one number (or `None`) per row back.
Feedback cannot travel in that return value, so it is kept on the function: `last_feedback` (one text
per row, the protocol the seed reference documents; `""` when there is nothing to say) and, for
environments, `last_results` (the structured `Feedback` objects). A caller resets `last_feedback` to
`None` before a call (`reset_feedback`) and validates what the call left (`read_feedback`), so a list
left over from an earlier call is never read as this one's. Every `Environment` writes both itself
(`RewardFunctionMixin`). `SDPOTrainer` reads them; a plain `GRPOTrainer` ignores them and still gets
the rewards.

What a raw reward function may return is decided here, once (`check_reward`, `check_rewards`, used
by `sdpo_core`'s trainer and the `reward` plugin): a finite real number, or `None` to abstain. `inf`
and NaN are errors naming the function and the row: TRL would pass `inf` on into the advantages and
read NaN as an abstention, so a bug in a reward function would look like an extremely good policy,
or a grader that never answers. An environment's rewards come from `Feedback`, which holds the same
rule (a `Feedback` with a NaN or infinite reward cannot be made).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sdpo_envs.types import Completion, Feedback, InvalidResultError, Task

logger = logging.getLogger(__name__)

# Keyword arguments TRL adds to the dataset columns: per-batch context, not part of a task.
TRAINER_KWARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"})


def check_reward(value: Any, *, name: str, row: int) -> float | None:
    """`value` as a finite float, `None` kept (abstain); `InvalidResultError` (a `ValueError`) naming the
    reward function and the row for anything else, `inf` and NaN included."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidResultError(f"reward function {name!r} returned {value!r} ({type(value).__name__}) for row "
                                 f"{row}; expected a float or None")
    reward = float(value)
    if not math.isfinite(reward):
        raise InvalidResultError(f"reward function {name!r} returned {reward} for row {row}; rewards must be finite "
                                 "(None abstains)")
    return reward


def check_rewards(name: str, rewards: Any, expected: int) -> list[float | None]:
    """A reward function's output as `list[float | None]`, one per row, each checked by `check_reward`."""
    if not isinstance(rewards, Sequence) or isinstance(rewards, (str, bytes)):
        raise InvalidResultError(f"reward function {name!r} returned {type(rewards).__name__}, expected a list of "
                                 "floats")
    if len(rewards) != expected:
        raise InvalidResultError(f"reward function {name!r} returned {len(rewards)} rewards for {expected} "
                                 "completions")
    return [check_reward(value, name=name, row=row) for row, value in enumerate(rewards)]


def reset_feedback(func: Any, name: str) -> Any:
    """Set `func.last_feedback` to `None` before a call, if it has one; return the value it held.

    `InvalidResultError` naming the function if the attribute cannot be set (a read-only property).
    """
    if not hasattr(func, "last_feedback"):
        return None
    previous = func.last_feedback
    try:
        func.last_feedback = None
    except AttributeError as exc:
        raise InvalidResultError(f"reward function {name!r}: last_feedback must be settable (it is reset to None "
                                 "before each call)") from exc
    return previous


def read_feedback(func: Any, name: str, expected: int, previous: Any = None) -> list[str] | None:
    """The feedback texts `func` left in `last_feedback` for a call on `expected` rows; `None` if it left none.

    A list with one text per row is required; a `None` (or NaN, a missing value in a data frame) entry
    reads as `""`. `previous` is what `reset_feedback` returned: getting that very list back means the
    function ignored the reset. Anything else is an `InvalidResultError` naming the function.
    """
    texts = getattr(func, "last_feedback", None)
    if texts is None:
        return None
    if previous is not None and texts is previous:
        raise InvalidResultError(f"reward function {name!r}: last_feedback must be a fresh list per call")
    if not isinstance(texts, Sequence) or isinstance(texts, (str, bytes)) or len(texts) != expected:
        got = f"{len(texts)} entries" if isinstance(texts, Sequence) else type(texts).__name__
        raise InvalidResultError(f"reward function {name!r}: last_feedback must be a list with one text per row; "
                                 f"got {got} for {expected} rows")
    result = []
    for row, text in enumerate(texts):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            text = ""
        if not isinstance(text, str):
            raise InvalidResultError(f"reward function {name!r}: last_feedback[{row}] is {type(text).__name__}, "
                                     "expected str or None")
        result.append(text)
    return result


def read_environment_feedback(environments: Sequence[Any]) -> list[str]:
    """The feedback of TRL `environment_factory` objects, one per rollout: each object's `last_feedback` text.

    An object without the attribute has nothing to say (`""`); a `last_feedback` that is not a `str` (or `None`)
    is an `InvalidResultError` naming the object's class.
    """
    texts = []
    for row, environment in enumerate(environments):
        text = getattr(environment, "last_feedback", None)
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InvalidResultError(f"environment {type(environment).__name__!r} (row {row}): last_feedback is "
                                     f"{type(text).__name__}, expected str or None")
        texts.append(text)
    return texts


def write_feedback(target: Any, results: Sequence[Feedback] | None) -> None:
    """Publish a call's results on `target`: `last_results`, and `last_feedback` (their texts); `None` resets."""
    target.last_results = None if results is None else list(results)
    target.last_feedback = None if results is None else [r.text for r in results]


def completion_text(completion: Completion) -> str:
    """The text of a TRL completion: a string, or the assistant turns of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        parts = []
        for message in completion:
            if not isinstance(message, Mapping) or "content" not in message:
                raise TypeError(f"conversational completion items must be messages with 'content', got {message!r}")
            if message.get("role", "assistant") == "assistant":
                content = message["content"]
                parts.append(content if isinstance(content, str) else _content_text(content))
        return "".join(parts)
    raise TypeError(f"unsupported completion type {type(completion).__name__}")


def _content_text(content: Any) -> str:
    """Text of a multimodal content list (`[{"type": "text", "text": ...}, ...]`)."""
    if not isinstance(content, Sequence):
        return "" if content is None else str(content)
    return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))


def tasks_from_columns(prompts: Sequence[Any], columns: Mapping[str, Any]) -> list[Task]:
    """One task per row from TRL's per-row keyword columns, with the prompt as `prompt`."""
    n = len(prompts)
    task_columns = {k: v for k, v in columns.items() if k not in TRAINER_KWARGS}
    for key, values in task_columns.items():
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise ValueError(f"column {key!r} has {got} for {n} prompts; columns must be per-row lists")
    return [{**{k: v[i] for k, v in task_columns.items()}, "prompt": prompts[i]} for i in range(n)]


class RewardFunctionMixin:
    """Makes an `Environment` callable as a TRL reward function (`list[float | None]`, one per row)."""

    last_feedback: list[str] | None = None
    """The feedback text of each row of the last call; `None` while a call runs or before the first."""
    last_results: list[Feedback] | None = None
    """The structured `Feedback` of each row of the last call."""

    if TYPE_CHECKING:  # provided by Environment
        max_turns: int

        @property
        def label(self) -> str: ...

        def evaluate(
            self,
            tasks: Sequence[Task],
            completions: Sequence[Completion],
            *,
            max_workers: int | None = None,
            timeout: float | None = None,
            extra: Mapping[str, Any] | None = None,
        ) -> list[Feedback]: ...

    @property
    def __name__(self) -> str:  # TRL names reward columns and metrics after `__name__`
        return self.label

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any) -> list[float | None]:
        write_feedback(self, None)
        if self.max_turns > 1 and not self.__dict__.get("_sdpo_warned_single_attempt"):
            self.__dict__["_sdpo_warned_single_attempt"] = True
            logger.warning("%s has max_turns=%d, but as a reward function it scores each completion as one attempt; "
                           "SDPOTrainer(reward_funcs=[env]) plays whole episodes, and a plain GRPOTrainer can through "
                           "environment_factory(env)", self.label, self.max_turns)
        if len(prompts) != len(completions):
            raise ValueError(f"{self.label}: {len(prompts)} prompts but {len(completions)} completions")
        tasks = tasks_from_columns(prompts, kwargs)
        extra = {k: v for k, v in kwargs.items() if k in TRAINER_KWARGS}
        results = self.evaluate(tasks, completions, extra=extra)
        write_feedback(self, results)
        return [r.reward for r in results]  # Feedback holds only finite floats or None

"""The bridge from environments to TRL reward functions.

TRL calls a reward function as `f(prompts=..., completions=..., completion_ids=..., **columns)` on the
local rows and wants one number (or `None`) per row back. Feedback cannot travel in that return value,
so it is kept on the function: `last_feedback` (one text per row, the protocol the seed reference
documents) and `last_results` (the structured `Feedback` objects). `SDPOTrainer` reads both; a plain
`GRPOTrainer` ignores them and still gets the rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sdpo_envs.types import Feedback, Task

if TYPE_CHECKING:
    from sdpo_envs.env import Environment

# Keyword arguments TRL adds to the dataset columns; they are not part of a task.
TRAINER_KWARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"})


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or the assistant turns of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        parts = []
        for message in completion:
            if not isinstance(message, dict) or "content" not in message:
                raise TypeError(f"conversational completion items must be messages with 'content', got {message!r}")
            if message.get("role", "assistant") == "assistant":
                content = message["content"]
                parts.append(content if isinstance(content, str) else _content_text(content))
        return "".join(parts)
    raise TypeError(f"unsupported completion type {type(completion).__name__}")


def _content_text(content: Any) -> str:
    """Text of a multimodal content list (`[{"type": "text", "text": ...}, ...]`)."""
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def tasks_from_columns(prompts: Sequence[Any], columns: dict[str, Any]) -> list[Task]:
    """One task per row from TRL's per-row keyword columns, with the prompt as `prompt`."""
    n = len(prompts)
    task_columns = {k: v for k, v in columns.items() if k not in TRAINER_KWARGS}
    for key, values in task_columns.items():
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(f"column {key!r} has {len(values) if hasattr(values, '__len__') else '?'} values "
                             f"for {n} prompts")
    return [{**{k: v[i] for k, v in task_columns.items()}, "prompt": prompts[i]} for i in range(n)]


class RewardFunctionMixin:
    """Makes an `Environment` callable as a TRL reward function."""

    last_feedback: list[str] | None = None
    last_results: list[Feedback] | None = None

    @property
    def __name__(self) -> str:  # TRL names reward columns after `__name__`
        return getattr(self, "name", "") or type(self).__name__

    def __call__(
        self: Environment, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        self.last_feedback = None
        self.last_results = None
        tasks = tasks_from_columns(prompts, kwargs)
        texts = [completion_text(c) for c in completions]
        results = self.evaluate(tasks, texts)
        self.last_results = results
        self.last_feedback = [r.text for r in results]
        return [r.reward for r in results]

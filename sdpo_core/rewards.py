"""The reward-function contract SDPO adds to TRL's: validated outputs and the feedback channel.

TRL wants `list[float | None]` back from a reward function, one per row. Feedback travels beside it, in
the function's `last_feedback` list (the seed reference's protocol; `sdpo_envs.Environment` objects
follow it too). The trainer resets it to `None` before each call, so a value left over from an earlier
call can never be mistaken for this one's, and requires a fresh list of the right length after it.
What a reward value may be (finite, or `None`) is `sdpo_envs.check_rewards`' rule, shared with the
environments' reward bridge and the `reward` plugin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from trl.trainer.utils import get_callable_name, is_async_callable

from sdpo_envs import check_rewards

__all__ = ["check_rewards", "combine_feedback", "read_feedback", "reset_feedback", "validated_reward_function"]


def validated_reward_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a reward callable so bad outputs fail with the function's name and row; keeps sync/async."""
    name = get_callable_name(func)

    if is_async_callable(func):
        async def checked_async(*args: Any, **kwargs: Any) -> list[float | None]:
            return check_rewards(name, await func(*args, **kwargs), len(kwargs["prompts"]))

        wrapper: Any = checked_async
    else:
        def checked(*args: Any, **kwargs: Any) -> list[float | None]:
            return check_rewards(name, func(*args, **kwargs), len(kwargs["prompts"]))

        wrapper = checked
    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = getattr(func, "__doc__", None)
    wrapper.sdpo_inner = func
    return wrapper


def reset_feedback(func: Any) -> None:
    """Clear `last_feedback` before a call, so stale feedback is never read."""
    if hasattr(func, "last_feedback"):
        try:
            func.last_feedback = None
        except AttributeError as exc:  # a read-only property
            raise TypeError(f"reward function {get_callable_name(func)!r}: last_feedback must be settable") from exc


def read_feedback(func: Any, name: str, expected: int) -> list[str] | None:
    """The feedback texts a function left for this call, `None` if it gives none."""
    feedback = getattr(func, "last_feedback", None)
    if feedback is None:
        return None
    if not isinstance(feedback, Sequence) or isinstance(feedback, (str, bytes)):
        raise ValueError(f"reward function {name!r}: last_feedback must be a list of strings, "
                         f"got {type(feedback).__name__}")
    if len(feedback) != expected:
        raise ValueError(f"reward function {name!r}: last_feedback has {len(feedback)} entries for {expected} "
                         "completions")
    texts = []
    for row, text in enumerate(feedback):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            text = ""
        if not isinstance(text, str):
            raise ValueError(f"reward function {name!r}: last_feedback[{row}] is {type(text).__name__}, not str")
        texts.append(text)
    return texts


def combine_feedback(per_function: Sequence[list[str] | None], rows: int, separator: str = "\n\n") -> list[str]:
    """Join the non-empty feedback of several functions per row, in function order."""
    combined = []
    for row in range(rows):
        parts = [texts[row].strip() for texts in per_function if texts is not None and texts[row].strip()]
        combined.append(separator.join(parts))
    return combined

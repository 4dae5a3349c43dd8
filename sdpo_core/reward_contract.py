"""The reward-function contract SDPO adds to TRL's: validated outputs; the feedback channel itself (resetting and
reading `last_feedback`) is `sdpo_envs.feedback_channel`'s, shared with the environments and the `reward` plugin.

TRL wants `list[float | None]` back from a reward function, one per row. Feedback travels beside it, in
the function's `last_feedback` list (the seed reference's protocol; `sdpo_envs.Environment` objects
follow it too). The trainer resets it to `None` before each call, so a value left over from an earlier
call can never be mistaken for this one's, and requires a fresh list of the right length after it.
What a reward value may be (finite, or `None`) is `sdpo_envs.check_rewards`' rule, shared with the
environments' reward bridge and the `reward` plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from trl.trainer.utils import get_callable_name, is_async_callable

from sdpo_envs import check_rewards

__all__ = ["check_rewards", "combine_feedback", "validated_reward_function"]


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


def combine_feedback(per_function: Sequence[list[str] | None], rows: int, separator: str = "\n\n") -> list[str]:
    """Join the non-empty feedback of several functions per row, in function order."""
    combined = []
    for row in range(rows):
        parts = [texts[row].strip() for texts in per_function if texts is not None and texts[row].strip()]
        combined.append(separator.join(parts))
    return combined

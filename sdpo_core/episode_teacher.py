"""What SDPO's teacher reads about a multi-turn episode (docs/algorithm.md, "SDPO on multi-turn episodes").

The teacher sees the episode with hindsight. Its prompt is the task's prompt rewritten exactly as for a
single completion (`sdpo_core.teacher_prompt`), with two texts chosen per episode:

- the demonstration: the *final answer* of a successful sibling episode (its last assistant turn, or
  for tool-calling environments the last answer it submitted), not the whole sibling episode with the
  environment's messages in it;
- the feedback: the environment's feedback on this episode's *last* attempt, which the student never
  read when its turns ran out.

After that prompt comes the student's whole episode, token for token (assistant turns and the
environment's observations between them); the teacher scores every assistant turn's tokens, and the
observation tokens carry no loss (TRL's `tool_mask`). Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Sequence


def hindsight_demonstrations(completions: Sequence[str], final_answers: Sequence[str | None] | None) -> list[str]:
    """Per row, the text the row demonstrates when it is a successful sibling: its final answer when the episode
    recorded one, else its whole completion (a single-turn row, or an episode without a recorded answer)."""
    if final_answers is None:
        return list(completions)
    if len(final_answers) != len(completions):
        raise ValueError(f"{len(final_answers)} final answers for {len(completions)} completions")
    return [completion if answer is None else answer for completion, answer in zip(completions, final_answers,
                                                                                   strict=True)]


def assistant_turn_spans(env_mask: Sequence[int]) -> list[tuple[int, int]]:
    """The `[start, end)` token spans of the assistant turns of an episode's completion: the runs of 1 in its
    `env_mask` (0 on the environment's observation tokens)."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for position, value in enumerate(env_mask):
        if value not in (0, 1):
            raise ValueError(f"env_mask holds 0 and 1 only; got {value!r} at position {position}")
        if value == 1 and start is None:
            start = position
        elif value == 0 and start is not None:
            spans.append((start, position))
            start = None
    if start is not None:
        spans.append((start, len(env_mask)))
    return spans


__all__ = ["assistant_turn_spans", "hindsight_demonstrations"]

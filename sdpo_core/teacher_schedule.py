"""When and how fast the EMA teacher follows the student: the rate schedule and the periodic reset.

An EMA teacher that keeps pace with the student can drift with it (the self-distillation target moves toward
whatever the student became). These guards hold it back: a rate that decays over training
(`SDPOConfig.teacher_update_rate_schedule` from `teacher_update_rate` to `teacher_update_rate_final`) and a
reset to the initial weights every `teacher_reset_every` generation batches. Pure functions of the position
in training, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math

__all__ = ["TEACHER_RATE_SCHEDULES", "generation_batches", "reset_due", "scheduled_rate"]

TEACHER_RATE_SCHEDULES = ("constant", "linear", "cosine")


def scheduled_rate(initial: float, final: float | None, schedule: str, update_index: int, num_updates: int) -> float:
    """The EMA rate of update `update_index` (0-based) out of `num_updates` in the run.

    `"constant"`: `initial` throughout. `"linear"` and `"cosine"`: `initial` at the first update, `final` at
    the last (and after it, should the run go on), interpolated linearly or along a half cosine in between.
    """
    if schedule not in TEACHER_RATE_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, TEACHER_RATE_SCHEDULES))}; got {schedule!r}")
    if update_index < 0 or num_updates < 1:
        raise ValueError(f"need update_index >= 0 and num_updates >= 1, got {update_index} and {num_updates}")
    if schedule == "constant":
        return initial
    if final is None:
        raise ValueError(f"schedule {schedule!r} needs a final rate")
    progress = 1.0 if num_updates == 1 else min(update_index / (num_updates - 1), 1.0)
    if schedule == "linear":
        return initial + (final - initial) * progress
    return final + (initial - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def reset_due(generations_done: int, every: int | None) -> bool:
    """True after the `generations_done`-th generation batch (1-based) when it is a multiple of `every`."""
    return every is not None and generations_done > 0 and generations_done % every == 0


def generation_batches(max_steps: int, gradient_accumulation_steps: int, steps_per_generation: int,
                       num_iterations: int) -> int:
    """Generation batches (teacher updates) in a run of `max_steps` optimizer steps, at least 1.

    One optimizer step is `gradient_accumulation_steps` micro-steps; one generation batch serves
    `steps_per_generation * num_iterations` micro-steps.
    """
    micro_steps = max_steps * gradient_accumulation_steps
    return max(1, math.ceil(micro_steps / (steps_per_generation * num_iterations)))

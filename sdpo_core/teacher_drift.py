"""The teacher's drift from its initial weights, logged as `sdpo/teacher_drift` after every optimizer step.

Keeping a full copy of the initial weights would double the teacher's memory, so a fixed uniform sample of
coordinates (`SAMPLED_COORDINATES` over all of the teacher's trainable-by-EMA tensors, with replacement) is
kept with its initial values, and the relative L2 distance is estimated on it. With fewer coordinates than
the sample size (tiny models, small adapters) every coordinate is kept and the value is exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from sdpo_core.diagnostics import relative_l2_distance
from sdpo_core.modeling import unwrap
from sdpo_core.teacher import CopiedModelTeacher, LoraEMATeacher, Teacher

__all__ = ["SAMPLED_COORDINATES", "ParameterSample", "TeacherDriftCallback", "moving_teacher_parameters"]

SAMPLED_COORDINATES = 1 << 17
"""Coordinates kept: 0.5 MB of fp32 values; the estimate's relative error is about 1/sqrt(this) times the spread
of the squared per-coordinate changes (a few percent for heavy-tailed changes)."""


class ParameterSample:
    """A fixed sample of coordinates across `tensors`, and their values when the sample was drawn."""

    def __init__(self, tensors: Sequence[Tensor], size: int = SAMPLED_COORDINATES, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        sizes = [t.numel() for t in tensors]
        total = sum(sizes)
        if total <= size:
            picks = torch.arange(total)
        else:
            picks = torch.randint(total, (size,), generator=torch.Generator().manual_seed(seed)).sort().values
        starts = torch.tensor([0, *itertools.accumulate(sizes)])
        owner = torch.searchsorted(starts, picks, right=True) - 1  # which tensor each coordinate is in
        self.indices = [(picks[owner == i] - starts[i]).to(t.device) for i, t in enumerate(tensors)]
        self.reference = self.values(tensors)

    def values(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The sampled coordinates' current values, fp32 on the CPU, one tensor per input tensor."""
        if len(tensors) != len(self.indices):
            raise ValueError(f"the sample covers {len(self.indices)} tensors, got {len(tensors)}")
        return [t.detach().reshape(-1)[index].float().cpu() for t, index in zip(tensors, self.indices, strict=True)]

    def relative_drift(self, tensors: Sequence[Tensor]) -> float:
        """Estimated `‖θ − θ₀‖ / ‖θ₀‖` over the sampled coordinates."""
        return relative_l2_distance(self.values(tensors), self.reference)


def moving_teacher_parameters(teacher: Teacher | None) -> list[Tensor] | None:
    """The tensors an EMA teacher moves (a full copy's parameters, or the teacher adapter's); `None` for teachers
    that do not move (frozen, disabled adapters, the trust-region teacher's frozen reference)."""
    if isinstance(teacher, CopiedModelTeacher) and teacher.rate > 0:
        return list(unwrap(teacher.module).parameters())
    if isinstance(teacher, LoraEMATeacher):
        return [param for _, param, _ in teacher._named_pairs(teacher._model)]
    return None


class TeacherDriftCallback(TrainerCallback):
    """Appends the teacher's estimated relative drift to the trainer's `sdpo/teacher_drift` metric each step.

    Added after the teacher-update callback, so the value is the teacher's after this step's update.
    """

    def __init__(self, trainer: Any, parameters: Sequence[Tensor]) -> None:
        self.trainer = trainer
        self.parameters = list(parameters)
        self.sample = ParameterSample(self.parameters)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._metrics["train"]["sdpo/teacher_drift"].append(self.sample.relative_drift(self.parameters))
        return control

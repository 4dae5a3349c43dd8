"""What SDPO's per-step diagnostics compute, as pure functions (no trainer, no process group).

- Token statistics on the trained tokens, split by the kind of teacher prompt a row got: a demonstration
  (a successful sibling, with or without feedback) or the environment's feedback only. The trainer sums
  them per process, adds the sums across processes and divides once (`masked_totals`, `totals_to_means`).
- How much a completion copies its demonstration (`copy_overlap`: the longest common substring over the
  completion's length).
- How far a parameter set moved from a reference (`relative_l2_distance`), for the teacher's drift.
- What the top-K divergence's tail bucket does (`tail_masses`) and which way a distillation step moves a
  token's entropy (`entropy_change_rate`): the mechanism `docs/training.md` describes for the entropy rise.
- The collapse signatures, each a function of a metric's history (one value per logged step; `None` and
  NaN entries are steps where the metric was undefined and are skipped). Each returns a sentence saying
  why the signature holds, or `None`. `docs/training.md` lists the thresholds and where they come from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ROW_KINDS",
    "copy_overlap",
    "entropy_change_rate",
    "entropy_collapsed",
    "entropy_surged",
    "finite_values",
    "kind_masks",
    "lengths_pinned",
    "longest_common_substring",
    "masked_totals",
    "relative_l2_distance",
    "reward_fell",
    "tail_masses",
    "totals_to_means",
]

ROW_KINDS = ("demo", "feedback")
"""Kinds of rows with a teacher: `demo` (the teacher prompt holds a demonstration) and `feedback` (feedback only)."""


# ------------------------------------------------------------------------------------------ token statistics
def kind_masks(trained_mask: Tensor, demo_rows: Tensor) -> dict[str, Tensor]:
    """`[B, T]` masks of the trained tokens: all of them, those of demonstration rows, those of feedback-only rows.

    `trained_mask` is the loss mask (completion · tool · `sd_mask`), `demo_rows` `[B]` is 1 where the row's
    teacher prompt holds a demonstration. A trained row without a demonstration has feedback only.
    """
    if demo_rows.shape != trained_mask.shape[:1]:
        raise ValueError(f"demo_rows {tuple(demo_rows.shape)} must have one entry per row of the mask "
                         f"{tuple(trained_mask.shape)}")
    demo = demo_rows.to(trained_mask.dtype).unsqueeze(1)  # [B, 1]
    return {"trained": trained_mask, "demo": trained_mask * demo, "feedback": trained_mask * (1 - demo)}


def masked_totals(values: Sequence[Tensor], mask: Tensor) -> Tensor:
    """`[len(values) + 1]`: the masked sum of each `[B, T]` value, then the mask's sum (the token count).

    Masked positions are zeroed with `where`, so a NaN or inf there (e.g. a row skipped by the teacher)
    cannot leak into the sums.
    """
    keep = mask != 0
    sums = [torch.where(keep, value.float() * mask, torch.zeros((), device=value.device)).sum() for value in values]
    return torch.stack([*sums, mask.float().sum()])


def totals_to_means(totals: Tensor, names: Sequence[str]) -> dict[str, float]:
    """Means from `masked_totals` output (possibly summed over processes); NaN where the count is zero."""
    if totals.shape != (len(names) + 1,):
        raise ValueError(f"expected {len(names) + 1} totals for {len(names)} names, got {tuple(totals.shape)}")
    count = float(totals[-1])
    return {name: float(total) / count if count > 0 else math.nan for name, total in zip(names, totals[:-1],
                                                                                       strict=True)}


# ------------------------------------------------------------------------------------------ demonstration copying
def longest_common_substring(text: str, other: str) -> int:
    """Length of the longest string that occurs in both, in `O(len(text) + len(other))`.

    A suffix automaton of `other` is walked along `text`, tracking the longest match ending at each
    character (code demonstrations run to thousands of characters, too long for the quadratic table).
    """
    if not text or not other:
        return 0
    links, lengths = [-1], [0]
    edges: list[dict[str, int]] = [{}]  # state 0 is the empty string
    last = 0
    for char in other:
        state = len(lengths)
        lengths.append(lengths[last] + 1)
        links.append(0)
        edges.append({})
        node = last
        while node != -1 and char not in edges[node]:
            edges[node][char] = state
            node = links[node]
        if node != -1:
            target = edges[node][char]
            if lengths[node] + 1 == lengths[target]:
                links[state] = target
            else:  # split `target`: a clone takes the shorter strings
                clone = len(lengths)
                lengths.append(lengths[node] + 1)
                links.append(links[target])
                edges.append(dict(edges[target]))
                while node != -1 and edges[node].get(char) == target:
                    edges[node][char] = clone
                    node = links[node]
                links[target] = links[state] = clone
        last = state
    best = matched = 0
    node = 0
    for char in text:
        while node and char not in edges[node]:
            node = links[node]
            matched = lengths[node]
        if char in edges[node]:
            node = edges[node][char]
            matched += 1
        best = max(best, matched)
    return best


def copy_overlap(completion: str, demonstration: str) -> float:
    """The fraction of `completion` covered by its longest common substring with `demonstration`, in [0, 1].

    1.0: the completion occurs verbatim in the demonstration. An empty completion copies nothing (0.0).
    """
    if not completion:
        return 0.0
    return longest_common_substring(completion, demonstration) / len(completion)


# ------------------------------------------------------------------------------------------ teacher drift
def relative_l2_distance(current: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    """`‖current − reference‖₂ / ‖reference‖₂` over all tensors together, in float64; NaN if the reference is 0."""
    if len(current) != len(reference):
        raise ValueError(f"{len(current)} tensors against {len(reference)} reference tensors")
    difference = squared = 0.0
    for now, then in zip(current, reference, strict=True):
        if now.shape != then.shape:
            raise ValueError(f"tensor of shape {tuple(now.shape)} against a reference of shape {tuple(then.shape)}")
        then64 = then.detach().double()
        difference += float((now.detach().double() - then64).square().sum())
        squared += float(then64.square().sum())
    return math.sqrt(difference / squared) if squared > 0 else math.nan


# ------------------------------------------------------------------------------------------ the tail bucket
def tail_masses(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`[...]` each: the student's probability outside its own top-`k` tokens, and the teacher's outside those.

    With `distillation_add_tail` the divergence sees exactly these two numbers as its tail bucket. Where the
    teacher's is the larger, the loss raises the student's whole tail (every token outside its top-K, each in
    proportion to its probability), which flattens the student even where the teacher is not flatter: a teacher
    whose distribution differs puts more mass outside the *student's* top-K than outside its own.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if not 0 < k <= student_logits.size(-1):
        raise ValueError(f"k must be in [1, {student_logits.size(-1)}] (the vocabulary), got {k}")
    student_logps = torch.log_softmax(student_logits.detach().float(), dim=-1)  # [..., V]
    teacher_logps = torch.log_softmax(teacher_logits.detach().float(), dim=-1)  # [..., V]
    top_logps, top = student_logps.topk(k, dim=-1)  # [..., K]
    student_tail = (1 - top_logps.exp().sum(-1)).clamp(min=0)
    teacher_tail = (1 - teacher_logps.gather(-1, top).exp().sum(-1)).clamp(min=0)
    return student_tail, teacher_tail


def entropy_change_rate(student_logits: Tensor, per_token_loss: Callable[[Tensor], Tensor]) -> Tensor:
    """`[...]`: how fast each token's entropy changes under gradient descent on its loss, with the logits as
    the parameters: `−∇H · ∇ℓ` (nats per unit of step size; positive: the step flattens the token).

    `per_token_loss` maps logits `[..., V]` to losses `[...]`, each depending on its own token's logits only
    (any SDPO divergence against fixed teacher logits). A model step moves logits through shared weights, so
    this is the direction of the pull on each token, not the size of a training step's effect.
    """
    logits = student_logits.detach().float().requires_grad_(True)  # [..., V]
    with torch.enable_grad():
        (loss_grad,) = torch.autograd.grad(per_token_loss(logits).sum(), logits)
        logps = torch.log_softmax(logits, dim=-1)
        (entropy_grad,) = torch.autograd.grad(-(logps.exp() * logps).sum(), logits)
    return -(entropy_grad * loss_grad).sum(-1)


# ------------------------------------------------------------------------------------------ collapse signatures
def finite_values(history: Sequence[float | None]) -> list[float]:
    """The history's defined values, in order (`None` and NaN dropped)."""
    return [float(v) for v in history if v is not None and math.isfinite(v)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def entropy_collapsed(entropies: Sequence[float | None], *, floor: float, drop_fraction: float, early_steps: int,
                      recent_steps: int) -> str | None:
    """Entropy collapse: the mean of the last `recent_steps` entropies is below `floor`, or has fallen by at least
    `drop_fraction` of the mean of the first `early_steps` (the two windows must not overlap)."""
    values = finite_values(entropies)
    if len(values) < recent_steps:
        return None
    recent = _mean(values[-recent_steps:])
    if recent < floor:
        return f"entropy {recent:.3g} (mean of the last {recent_steps} steps) is below the floor {floor:g}"
    if len(values) < early_steps + recent_steps:
        return None
    early = _mean(values[:early_steps])
    if early > 0 and recent <= (1 - drop_fraction) * early:
        return (f"entropy fell from {early:.3g} (first {early_steps} steps) to {recent:.3g} (last {recent_steps}), "
                f"by {1 - recent / early:.0%} (threshold {drop_fraction:.0%})")
    return None


def entropy_surged(entropies: Sequence[float | None], *, rise_fraction: float, early_steps: int,
                   recent_steps: int) -> str | None:
    """Entropy surge: the mean of the last `recent_steps` entropies exceeds the mean of the first `early_steps` by
    at least `rise_fraction` of it (the policy is flattening)."""
    values = finite_values(entropies)
    if len(values) < early_steps + recent_steps:
        return None
    early, recent = _mean(values[:early_steps]), _mean(values[-recent_steps:])
    if early > 0 and recent >= (1 + rise_fraction) * early:
        return (f"entropy rose from {early:.3g} (first {early_steps} steps) to {recent:.3g} (last {recent_steps}), "
                f"by {recent / early - 1:.0%} (threshold {rise_fraction:.0%})")
    return None


def lengths_pinned(clipped_ratios: Sequence[float | None], *, level: float, steps: int) -> str | None:
    """Lengths pinned at the cap: the fraction of completions cut at `max_completion_length` was at least `level`
    on each of the last `steps` steps."""
    values = finite_values(clipped_ratios)
    if len(values) < steps or min(values[-steps:]) < level:
        return None
    return (f"at least {min(values[-steps:]):.0%} of completions hit the length cap on each of the last {steps} "
            f"steps (threshold {level:.0%})")


def reward_fell(rewards: Sequence[float | None], *, margin: float, window: int) -> str | None:
    """Reward falling: the mean reward over the last `window` steps is at least `margin` below the highest such
    `window`-step mean so far."""
    values = finite_values(rewards)
    if len(values) < window:
        return None
    means = [_mean(values[end - window:end]) for end in range(window, len(values) + 1)]
    peak, now = max(means), means[-1]
    if peak - now >= margin:
        return (f"mean reward over the last {window} steps is {now:.3g}, {peak - now:.3g} below its running peak "
                f"{peak:.3g} (margin {margin:g})")
    return None


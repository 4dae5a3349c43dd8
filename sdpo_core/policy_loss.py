"""GRPO's policy-gradient term as pure tensor functions, for the guards that mix it with SDPO's distillation.

`SDPOConfig.distillation_weight` < 1 blends the two losses and `SDPOConfig.route_by_success` gives each row
one of them; both need GRPO's loss computed from the student forward the distillation already ran. These
functions restate the formulas of TRL 1.16's `GRPOTrainer._compute_loss` for the loss types whose
per-token loss is a clipped (or CISPO-weighted) importance ratio times the advantage; the trainer's tests
compare them with `GRPOTrainer._compute_loss` on the same batch.

Every aggregation takes the **full** GRPO mask for its denominators and an optional `rows` selection for its
numerator, so a row's contribution is exactly what plain GRPO would give it, whichever other rows are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["POLICY_LOSS_TYPES", "aggregate_policy_loss", "policy_per_token_loss", "route_rows"]

# GRPOConfig.loss_type values the same-forward GRPO term reproduces (sapo and vespo are not restated here).
POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo")


def policy_per_token_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    rollout_ratio: Tensor | None = None,
    ref_per_token_logps: Tensor | None = None,
    beta: float = 0.0,
    bias_correction_kl: bool = True,
) -> Tensor:
    """GRPO's per-token loss `[B, T]` (or `[B, 1]` at sequence level) from the sampled tokens' log-probs.

    `per_token_logps` `[B, T]` carries the gradient; `old_per_token_logps` is π_old (`None`: on-policy, π_θ
    detached); `advantages` `[B]` or `[B, T]`; `mask` `[B, T]` (completion · tool mask) weighs the
    sequence-level ratio. Clipped surrogate `-min(r·A, clip(r, 1-ε_low, 1+ε_high)·A)` (`r` capped at `delta`
    when set), or CISPO's `-sg(min(r, ε_high))·A·log π`; times the vLLM `rollout_ratio` when given; plus
    `beta` times the k3 estimate of KL(π_θ‖π_ref) (weighted by `r` with `bias_correction_kl`).
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(map(repr, POLICY_LOSS_TYPES))}; got {loss_type!r}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1]
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    log_ratio = per_token_logps - old  # [B, T]
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence'; got {importance_sampling_level!r}")
    ratio = torch.exp(log_weights)
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(ratio, max=epsilon_high).detach() * advantages * per_token_logps
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token_loss = -torch.min(capped * advantages, clipped * advantages)
    if rollout_ratio is not None:
        per_token_loss = per_token_loss * rollout_ratio
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps")
        ref_gap = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(ref_gap) - ref_gap - 1  # [B, T]
        if bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl
    return per_token_loss


def aggregate_policy_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    rows: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Reduce GRPO's per-token loss to this micro-batch's scalar, as `loss_type` does (before 1/GA scaling).

    - `grpo`: per-sequence token mean, mean over the `B` sequences; `luspo`: per-sequence token sum, mean.
    - `bnpo`: sum over the micro-batch's active tokens / their count.
    - `dr_grpo`: sum / (`B` · `max_completion_length`).
    - `dapo`, `cispo`: sum / `num_items` (the caller's share of the generation batch's active tokens; GRPO's
      normaliser already includes gradient accumulation for these two).

    `rows` `[B]` (0/1) keeps only those rows in the numerator; every denominator still counts all rows of
    `mask`, so each kept row contributes exactly what it does without the selection.
    """
    if per_token_loss.dim() != 2 or mask.dim() != 2 or per_token_loss.size(0) != mask.size(0):
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} do not match")
    mask = mask.to(per_token_loss.dtype)
    kept = mask if rows is None else mask * rows.to(mask.dtype).unsqueeze(1)  # [B, T]
    masked = per_token_loss * kept  # [B, T] (a [B, 1] sequence-level loss broadcasts)
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "luspo":
        return masked.sum(-1).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        if num_items is None:
            raise ValueError(f"loss_type {loss_type!r} needs num_items")
        return masked.sum() / num_items
    raise ValueError(f"loss_type must be one of {', '.join(map(repr, POLICY_LOSS_TYPES))}; got {loss_type!r}")


def route_rows(success: Tensor, sd_mask: Tensor) -> tuple[Tensor, Tensor]:
    """SRPO-style routing: `(policy_rows, distillation_rows)`, float 0/1 `[B]`, disjoint and covering every row.

    A failed row (reward below the success threshold) with a teacher signal is distilled; every other row
    (a success, or a failure without demonstration or feedback) gets GRPO's policy gradient.
    """
    if success.shape != sd_mask.shape or success.dim() != 1:
        raise ValueError(f"success {tuple(success.shape)} and sd_mask {tuple(sd_mask.shape)} must both be [B]")
    distill = ~success.bool() & sd_mask.bool()
    return (~distill).float(), distill.float()

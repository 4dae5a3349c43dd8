"""SDPO's distillation loss as pure tensor functions (no models, no tokenizers).

Reproduces lasgroup/SDPO `compute_self_distillation_loss` (`verl/trainer/ppo/core_algos.py:1085-1188`) and the
top-K bookkeeping of its actor (`verl/workers/actor/dp_actor.py:364-386`, `:808-832`); docs/algorithm.md §2
is the spec. Conventions shared by every function here:

- Logits are `[..., V]` and already divided by the rollout temperature (or the temperature is passed in and
  applied here, in fp32). Log-softmax and logsumexp always run in fp32, whatever the input dtype.
- The top-K support is the **student's** top-K; its K values are real log-probs (not renormalised), and the
  teacher is gathered at the student's indices and normalised by its own full-vocabulary logsumexp.
- The teacher never receives a gradient.
- `topk >= V` means the support is the whole vocabulary, so it is computed exactly as `topk=None`
  (the reference would crash in `torch.topk`; a `V`-sized top-K plus a clamped 1e-7 tail is the same thing
  up to that clamp).

Memory. The `[B, T, V]` fp32 tensors dominate. `per_token_distillation_loss` is the plain-autograd version
(easy to audit, used as the oracle in tests). `chunked_per_token_distillation_loss` (logits given) and
`chunked_distillation_loss` (hidden states and LM-head weights given) compute the same values and gradients
chunk by chunk with a custom autograd function (`_ChunkedDistillation`) that recomputes each chunk's logits
in backward, so the fp32 temporaries are bounded by `chunk_size x V`. The hidden-state path never
materialises `[B, T, V]` logits at all, and in top-K mode neither path keeps the teacher's logits alive for
backward. The only full-size tensor the logits path creates is the gradient of the student's logits.

Speed. `weighted_distillation_loss`, the trainer's path, takes the token weights up front and contracts each
chunk's logit gradient with the head during forward (`_FusedDistillation`): one pass through the LM heads
instead of two (docs/algorithm.md §2.9).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = [
    "TokenStats",
    "WeightedDistillation",
    "aggregate_loss",
    "aggregation_weights",
    "chunked_distillation_loss",
    "chunked_distillation_loss_with_stats",
    "chunked_per_token_distillation_loss",
    "distillation_loss_per_token",
    "importance_weight",
    "per_token_distillation_loss",
    "sampled_token_logps",
    "sampled_token_logps_from_hidden",
    "token_entropy",
    "token_level_reverse_kl",
    "token_stats_from_hidden",
    "weighted_distillation_loss",
    "weighted_token_sum",
]

# lasgroup/SDPO core_algos.py:1112-1118: the top-K log-mass is clamped below 0 so the tail stays finite.
TAIL_LOG_MASS_MAX = -1e-7
# lasgroup/SDPO core_algos.py:1168-1180: the log importance ratio is clamped before exp.
IS_LOG_RATIO_CLAMP = 20.0
DEFAULT_CHUNK_SIZE = 1024


# ------------------------------------------------------------------------------------------------ validation
def _check_args(alpha: float, topk: int | None, chunk_size: int | None = None) -> None:
    """Fail early with the field name; a bad alpha would silently give a NaN mixture."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if topk is not None and (isinstance(topk, bool) or int(topk) != topk or topk < 1):
        raise ValueError(f"topk must be an integer >= 1 or None, got {topk}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")


def _check_same_shape(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Both sides must score the same response tokens over the same vocabulary."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )


def _check_same_vocabulary(student_lm_head: Tensor, teacher_lm_head: Tensor) -> None:
    """Both heads must project onto the same vocabulary, or the top-K indices mean different tokens."""
    if student_lm_head.size(0) != teacher_lm_head.size(0):
        raise ValueError(f"student and teacher vocabularies differ: {student_lm_head.size(0)} vs "
                         f"{teacher_lm_head.size(0)}")


def _effective_topk(topk: int | None, vocab_size: int) -> int | None:
    """`topk >= V` covers the whole vocabulary: use the exact full-vocabulary path (no spurious tail)."""
    return None if topk is None or topk >= vocab_size else int(topk)


# ------------------------------------------------------------------------------------------------ the maths
def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) summed over the last dim; equals `F.kl_div(log_q, log_p, log_target=True).sum(-1)`."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _divergence(student_logps: Tensor, teacher_logps: Tensor, alpha: float) -> Tensor:
    """The α-family of lasgroup/SDPO core_algos.py:1138-1162 over the last dim (buckets or vocabulary)."""
    if alpha == 0.0:  # forward KL(T‖S)
        return _kl(teacher_logps, student_logps)
    if alpha == 1.0:  # reverse KL(S‖T)
        return _kl(student_logps, teacher_logps)
    # generalised JSD: M = (1-α)·S + α·T in probability space, built in log space
    mixture_logps = torch.logaddexp(student_logps + math.log1p(-alpha), teacher_logps + math.log(alpha))
    return (1.0 - alpha) * _kl(student_logps, mixture_logps) + alpha * _kl(teacher_logps, mixture_logps)


def _bucket_logps(logits: Tensor, topk_indices: Tensor | None, add_tail: bool) -> Tensor:
    """Log-probs over the distillation support, from fp32 logits `[n, V]`.

    `topk_indices=None` is the full vocabulary. Otherwise the K real log-probs at the (student's) indices,
    plus a tail bucket or renormalised over K (lasgroup/SDPO core_algos.py:1106-1136).
    """
    logsumexp = torch.logsumexp(logits, dim=-1, keepdim=True)  # [n, 1]
    if topk_indices is None:
        return logits - logsumexp  # [n, V]
    topk_logps = logits.gather(-1, topk_indices) - logsumexp  # [n, K]  dp_actor.py:385-386
    return _topk_support(topk_logps, add_tail)


def _topk_support(topk_logps: Tensor, add_tail: bool) -> Tensor:
    """Real top-K log-probs `[n, K]` -> the support's log-probs: `[n, K+1]` with the tail, else renormalised."""
    topk_log_mass = torch.logsumexp(topk_logps, dim=-1, keepdim=True)  # [n, 1]
    if not add_tail:
        return topk_logps - topk_log_mass  # [n, K]  core_algos.py:1120-1131
    tail_logp = torch.log(-torch.expm1(topk_log_mass.clamp(max=TAIL_LOG_MASS_MAX)))  # [n, 1]  core_algos.py:1112
    return torch.cat([topk_logps, tail_logp], dim=-1)  # [n, K+1]


def _workspace(spec: _DistillSpec, num_rows: int, device: torch.device) -> Tensor:
    """One fp32 `[chunk, V]` scratch buffer per call: fresh `[n, V]` temporaries per chunk cost page faults."""
    return torch.empty(min(spec.chunk_size, max(num_rows, 1)), spec.vocab_size, dtype=torch.float32, device=device)


def _logsumexp_into(logits: Tensor, workspace: Tensor | None) -> Tensor:
    """`logsumexp(logits, -1, keepdim=True)` `[n, 1]` using `workspace` for the `[n, V]` exp."""
    if workspace is None:
        return torch.logsumexp(logits, dim=-1, keepdim=True)
    row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all -inf rows stay -inf
    shifted = torch.sub(logits, row_max, out=workspace[: logits.size(0)]).exp_()  # [n, V]
    return shifted.sum(dim=-1, keepdim=True).log_().add_(row_max)


def _entropy_into(logits: Tensor, logsumexp: Tensor, workspace: Tensor | None) -> Tensor:
    """Entropy `[n]` of softmax(logits) given its logsumexp `[n, 1]`, as −Σ p·log p with log p in `workspace`.

    (lse − Σ p·z is cheaper but cancels: on peaked rows it lost 0.3 % of a 3e-3 entropy in fp32.)
    """
    logps = torch.sub(logits, logsumexp, out=None if workspace is None else workspace[: logits.size(0)])  # [n, V]
    return -torch.bmm(logps.exp().unsqueeze(1), logps.unsqueeze(-1)).view(-1)


def _project_logits(x: Tensor, weight: Tensor | None, bias: Tensor | None, temperature: float) -> Tensor:
    """fp32 tempered logits of a chunk: `x` is logits (`weight=None`) or hidden states for `F.linear`."""
    logits = x if weight is None else F.linear(x, weight, bias)  # [n, V], matmul in the model's dtype
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


# ------------------------------------------------------------------------------------------------ plain version
def per_token_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float, topk: int | None, add_tail: bool
) -> Tensor:
    """Per-token SDPO divergence `[...]` from tempered logits `[..., V]`, with plain autograd.

    The unchunked reference: materialises fp32 `[..., V]` temporaries. The trainer should prefer
    `chunked_per_token_distillation_loss` or `chunked_distillation_loss`, which return the same values.
    """
    _check_args(alpha, topk)
    _check_same_shape(student_logits, teacher_logits)
    student_logits = student_logits.float()  # [..., V]
    teacher_logits = teacher_logits.detach().float()  # [..., V]
    k = _effective_topk(topk, student_logits.size(-1))
    topk_indices = None if k is None else student_logits.detach().topk(k, dim=-1).indices  # [..., K]
    student_logps = _bucket_logps(student_logits, topk_indices, add_tail)  # [..., K+1] / [..., K] / [..., V]
    teacher_logps = _bucket_logps(teacher_logits, topk_indices, add_tail)  # same support as the student
    return _divergence(student_logps, teacher_logps, alpha)  # [...]


# ------------------------------------------------------------------------------------------------ chunked version
@dataclass(frozen=True)
class _DistillSpec:
    alpha: float
    topk: int | None  # already resolved by `_effective_topk`
    add_tail: bool
    chunk_size: int
    temperature: float
    vocab_size: int
    needs_grad: bool  # False under no_grad/inference_mode: skip the K-sized gradient in forward
    teacher_temperature: float = 1.0  # the teacher's logits are divided by temperature · teacher_temperature


class TokenStats(NamedTuple):
    """Per-token statistics `[...]` (fp32, no gradient) the trainer logs and weights with."""

    student_token_logps: Tensor  # log p_student(sampled token)
    entropy: Tensor  # entropy of the student's next-token distribution
    teacher_token_logps: Tensor  # log p_teacher(sampled token)
    teacher_entropy: Tensor  # entropy of the teacher's next-token distribution


class _Rows(NamedTuple):
    """Flattened inputs: logits `[N, V]` (`weight=None`) or hidden states `[N, H]` projected by `weight [V, H]`."""

    student_x: Tensor
    student_weight: Tensor | None
    student_bias: Tensor | None
    teacher_x: Tensor
    teacher_weight: Tensor | None
    teacher_bias: Tensor | None
    token_ids: Tensor | None  # [N], for the statistics


class _TopK(NamedTuple):
    """A chunk's top-K bookkeeping, `[n, ...]` each."""

    indices: Tensor  # [n, K] the student's top-K
    student_logsumexp: Tensor  # [n, 1]
    logps_grad: Tensor | None  # [n, K] ∂ℓ/∂s (s: the student's K real log-probs); None without grad


class _Chunk(NamedTuple):
    """One chunk's forward results."""

    rows: slice
    student_logits: Tensor  # fp32 tempered logits `[n, V]`, valid until the next chunk
    teacher_logits: Tensor
    loss: Tensor  # [n]
    stats: tuple[Tensor, Tensor, Tensor, Tensor] | None  # the `TokenStats` fields, `[n]` each
    topk: _TopK | None  # top-K mode


def _chunk_forward(spec: _DistillSpec, rows: slice, student_logits: Tensor, teacher_logits: Tensor,
                   token_ids: Tensor | None, workspace: Tensor | None) -> _Chunk:
    """Loss, statistics and (top-K mode) ∂ℓ/∂s of one chunk from its fp32 tempered logits `[n, V]`.

    `workspace` is None only for the full-vocabulary loss without statistics, which needs no logsumexp.
    """
    if workspace is None:
        loss = _divergence(_bucket_logps(student_logits, None, False), _bucket_logps(teacher_logits, None, False),
                           spec.alpha)  # [n]
        return _Chunk(rows, student_logits, teacher_logits, loss, None, None)
    student_lse = _logsumexp_into(student_logits, workspace)  # [n, 1]
    teacher_lse = _logsumexp_into(teacher_logits, workspace)  # [n, 1]
    stats = None
    if token_ids is not None:
        ids = token_ids.unsqueeze(-1)  # [n, 1]
        stats = ((student_logits.gather(-1, ids) - student_lse).squeeze(-1),
                 _entropy_into(student_logits, student_lse, workspace),
                 (teacher_logits.gather(-1, ids) - teacher_lse).squeeze(-1),
                 _entropy_into(teacher_logits, teacher_lse, workspace))
    if spec.topk is None:
        loss = _divergence(_bucket_logps(student_logits, None, False), _bucket_logps(teacher_logits, None, False),
                           spec.alpha)  # [n]
        return _Chunk(rows, student_logits, teacher_logits, loss, stats, None)
    top_logits, indices = student_logits.topk(spec.topk, dim=-1)  # [n, K] each
    teacher_logps = _topk_support(teacher_logits.gather(-1, indices) - teacher_lse, spec.add_tail)  # [n, K+1]
    student_topk_logps = top_logits - student_lse  # [n, K]
    grad = None
    if spec.needs_grad:
        with torch.enable_grad():
            student_topk_logps.requires_grad_()
            loss = _divergence(_topk_support(student_topk_logps, spec.add_tail), teacher_logps, spec.alpha)  # [n]
            (grad,) = torch.autograd.grad(loss.sum(), student_topk_logps)  # ∂ℓ/∂s, row by row
        loss = loss.detach()
    else:
        loss = _divergence(_topk_support(student_topk_logps, spec.add_tail), teacher_logps, spec.alpha)
    return _Chunk(rows, student_logits, teacher_logits, loss, stats, _TopK(indices, student_lse, grad))


def _topk_logit_grad(student_logits: Tensor, student_lse: Tensor, indices: Tensor, topk_logps_grad: Tensor,
                     scale: Tensor, out: Tensor) -> Tensor:
    """∂(Σ scale·ℓ)/∂z `[n, V]` in top-K mode, written into `out`: scatter(G at i) − (Σ_k G_k)·softmax(z).

    The loss depends on z only through s_k = z[i_k] − logsumexp(z), so one exp over V is all it costs.
    """
    grad = torch.sub(student_logits, student_lse, out=out).exp_()  # softmax(z)
    grad.mul_(-topk_logps_grad.sum(-1, keepdim=True) * scale)
    return grad.scatter_add_(-1, indices, topk_logps_grad * scale)


def _full_vocab_logit_grad(spec: _DistillSpec, student_logits: Tensor, teacher_logits: Tensor,
                           scale: Tensor) -> Tensor:
    """∂(Σ scale·ℓ)/∂z `[n, V]` over the whole vocabulary, by autograd on the chunk alone."""
    with torch.enable_grad():
        student_leaf = student_logits.detach().requires_grad_()
        chunk_loss = _divergence(_bucket_logps(student_leaf, None, False),
                                 _bucket_logps(teacher_logits, None, False), spec.alpha)  # [n]
        (grad,) = torch.autograd.grad(chunk_loss, student_leaf, scale.squeeze(-1))
    return grad


class _StudentGrads:
    """Gradients of the student's rows, head weight and bias, filled chunk by chunk from logit gradients.

    Weight and bias gradients are summed over chunks in fp32 and cast once (a bf16 head loses less).
    """

    def __init__(self, rows: _Rows, needs: tuple[bool, bool, bool]) -> None:
        self.x, self.weight, self.bias = rows.student_x, rows.student_weight, rows.student_bias
        need_x, need_weight, need_bias = needs
        self.x_grad = torch.empty_like(self.x) if need_x else None
        self.weight_grad = torch.zeros_like(self.weight, dtype=torch.float32) if need_weight else None  # type: ignore[arg-type]
        self.bias_grad = torch.zeros_like(self.bias, dtype=torch.float32) if need_bias else None  # type: ignore[arg-type]

    def logit_grad_buffer(self, rows: slice, workspace: Tensor) -> Tensor:
        """Where to build a chunk's logit gradient: fp32 logits take it in place in their slice of the result."""
        if self.weight is None and self.x_grad is not None and self.x_grad.dtype == torch.float32:
            return self.x_grad[rows]
        return workspace[: self.x[rows].size(0)]

    def add(self, rows: slice, logit_grad: Tensor) -> None:
        """Contract one chunk's logit gradient `[n, V]` with the head (hidden states) or store it (logits)."""
        if self.weight is None:
            if self.x_grad is not None and logit_grad.data_ptr() != self.x_grad[rows].data_ptr():
                self.x_grad[rows] = logit_grad
            return
        grad_out = logit_grad.to(self.weight.dtype)  # [n, V] into the head's matmul, in its dtype
        if self.x_grad is not None:
            self.x_grad[rows] = grad_out @ self.weight  # [n, H]
        if self.weight_grad is not None:
            if grad_out.dtype == torch.float32:
                self.weight_grad.addmm_(grad_out.T, self.x[rows])  # [V, H]
            else:
                self.weight_grad.add_(grad_out.T @ self.x[rows])
        if self.bias_grad is not None:
            self.bias_grad.add_(logit_grad.sum(0))  # [V]

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        weight_grad = None if self.weight_grad is None else self.weight_grad.to(self.weight.dtype)  # type: ignore[union-attr]
        bias_grad = None if self.bias_grad is None else self.bias_grad.to(self.bias.dtype)  # type: ignore[union-attr]
        return self.x_grad, weight_grad, bias_grad


class _LogitBuffers:
    """Reused fp32 `[chunk, V]` buffers the LM-head matmuls write into (fresh ones per chunk cost page faults).

    Only fp32 heads and rows use them; anything else goes through `_project_logits`.
    """

    def __init__(self, spec: _DistillSpec, num_rows: int, device: torch.device) -> None:
        self.spec, self.num_rows, self.device = spec, num_rows, device
        self.buffers: dict[str, Tensor] = {}

    def project(self, side: str, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """Tempered fp32 logits `[n, V]` of one chunk of `side`'s rows; valid until its next chunk."""
        temperature = self.spec.temperature * (self.spec.teacher_temperature if side == "teacher" else 1.0)
        if weight is None or weight.dtype != torch.float32 or x.dtype != torch.float32:
            return _project_logits(x, weight, bias, temperature)
        if side not in self.buffers:
            self.buffers[side] = _workspace(self.spec, self.num_rows, self.device)
        out = self.buffers[side][: x.size(0)]  # [n, V]
        if bias is None:
            torch.mm(x, weight.T, out=out)
        else:
            torch.addmm(bias, x, weight.T, out=out)
        return out if temperature == 1.0 else out.div_(temperature)


def _forward_chunks(spec: _DistillSpec, rows: _Rows, workspace: Tensor | None) -> Iterator[_Chunk]:
    """Every chunk's forward, in order; a chunk's logits are overwritten by the next one."""
    buffers = _LogitBuffers(spec, rows.student_x.size(0), rows.student_x.device)
    for start in range(0, rows.student_x.size(0), spec.chunk_size):
        chunk = slice(start, start + spec.chunk_size)
        student_logits = buffers.project("student", rows.student_x[chunk], rows.student_weight, rows.student_bias)
        teacher_logits = buffers.project("teacher", rows.teacher_x[chunk], rows.teacher_weight, rows.teacher_bias)
        ids = None if rows.token_ids is None else rows.token_ids[chunk]
        yield _chunk_forward(spec, chunk, student_logits, teacher_logits, ids, workspace)


def _empty_outputs(rows: _Rows) -> tuple[Tensor, list[Tensor]]:
    """The per-token loss `[N]` and the four statistics `[N]` (empty without token ids)."""
    num_rows, device = rows.student_x.size(0), rows.student_x.device
    stats_rows = num_rows if rows.token_ids is not None else 0
    return (torch.empty(num_rows, dtype=torch.float32, device=device),
            [torch.empty(stats_rows, dtype=torch.float32, device=device) for _ in range(4)])


def _store(chunk: _Chunk, per_token_loss: Tensor, stats: list[Tensor]) -> None:
    per_token_loss[chunk.rows] = chunk.loss
    if chunk.stats is not None:
        for out, value in zip(stats, chunk.stats, strict=True):
            out[chunk.rows] = value


class _ChunkedDistillation(torch.autograd.Function):
    """Chunk-wise per-token distillation loss with a hand-written, chunk-wise backward.

    Backward writes each chunk's gradient straight into one buffer, so no `[N, V]` fp32 temporary, nor the
    full-size zero tensor per chunk that slicing + `torch.utils.checkpoint` would allocate, is ever built.

    Top-K mode. With G = ∂ℓ/∂s (`[N, K]`, taken by autograd on the tiny K-sized problem in forward) the logit
    gradient is `_topk_logit_grad`: backward needs one exp over V per chunk, and only z (recomputed from the
    saved student input), logsumexp(z) `[N]`, the indices and G are kept. The teacher's logits are not needed
    after forward. Full-vocabulary mode: backward recomputes both sides per chunk and lets autograd
    differentiate the chunk.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, spec: _DistillSpec, student_x: Tensor, student_weight: Tensor | None,
                student_bias: Tensor | None, teacher_x: Tensor, teacher_weight: Tensor | None,
                teacher_bias: Tensor | None, token_ids: Tensor | None) -> tuple[Tensor, ...]:
        rows = _Rows(student_x, student_weight, student_bias, teacher_x, teacher_weight, teacher_bias, token_ids)
        per_token_loss, stats = _empty_outputs(rows)
        k, num_rows, device = spec.topk, rows.student_x.size(0), rows.student_x.device
        workspace = None
        if k is not None or rows.token_ids is not None:
            workspace = _workspace(spec, num_rows, device)  # [chunk, V] fp32, reused by every chunk
        if k is not None:
            topk_indices = torch.empty(num_rows, k, dtype=torch.long, device=device)  # [N, K]
            topk_logps_grad = torch.empty(num_rows, k, dtype=torch.float32, device=device)  # [N, K]
            student_logsumexp = torch.empty(num_rows, 1, dtype=torch.float32, device=device)  # [N, 1]
        for chunk in _forward_chunks(spec, rows, workspace):
            _store(chunk, per_token_loss, stats)
            if chunk.topk is not None:
                topk_indices[chunk.rows] = chunk.topk.indices
                student_logsumexp[chunk.rows] = chunk.topk.student_logsumexp
                if chunk.topk.logps_grad is not None:
                    topk_logps_grad[chunk.rows] = chunk.topk.logps_grad
        ctx.spec = spec  # type: ignore[attr-defined]
        # save_for_backward accepts None entries (absent weights/biases); typed as Any for that reason
        saved: tuple[Any, ...] = (rows.student_x, rows.student_weight, rows.student_bias)
        if k is not None:  # the teacher's logits can be freed as soon as the caller drops them
            saved += (topk_indices, topk_logps_grad, student_logsumexp)
        else:  # the teacher is recomputed in backward
            saved += (rows.teacher_x, rows.teacher_weight, rows.teacher_bias)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*stats)
        return per_token_loss, *stats

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor, *_stats_grads: Tensor) -> tuple[Tensor | None, ...]:
        spec: _DistillSpec = ctx.spec  # type: ignore[attr-defined]
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        if spec.topk is not None:  # top-K backward never needs the teacher
            rows = _Rows(saved[0], saved[1], saved[2], saved[0], None, None, None)
        else:
            rows = _Rows(saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], None)
        grads = _StudentGrads(rows, tuple(ctx.needs_input_grad[1:4]))  # type: ignore[attr-defined,arg-type]
        workspace = _workspace(spec, rows.student_x.size(0), rows.student_x.device)
        buffers = _LogitBuffers(spec, rows.student_x.size(0), rows.student_x.device)
        for start in range(0, rows.student_x.size(0), spec.chunk_size):
            chunk = slice(start, start + spec.chunk_size)
            scale = grad_loss[chunk].float().unsqueeze(-1) / spec.temperature  # [n, 1]; d(z/τ) = dz/τ
            student_logits = buffers.project("student", rows.student_x[chunk], rows.student_weight,
                                             rows.student_bias)  # [n, V]
            if spec.topk is not None:
                topk_indices, topk_logps_grad, student_logsumexp = (t[chunk] for t in saved[3:])
                logit_grad = _topk_logit_grad(student_logits, student_logsumexp, topk_indices, topk_logps_grad,
                                              scale, out=grads.logit_grad_buffer(chunk, workspace))
            else:
                teacher_logits = buffers.project("teacher", rows.teacher_x[chunk], rows.teacher_weight,
                                                 rows.teacher_bias)
                logit_grad = _full_vocab_logit_grad(spec, student_logits, teacher_logits, scale)
            del student_logits
            grads.add(chunk, logit_grad)
        return None, *grads.result(), None, None, None, None


class _FusedDistillation(torch.autograd.Function):
    """Σᵢ wᵢ·ρᵢ·ℓᵢ with its gradients computed in forward (ρ: the importance weight, or 1).

    With the weights known before the loss, each chunk's logit gradient is contracted with the LM head while the
    chunk's logits and softmax are still in memory: the head is applied once per chunk instead of twice (forward,
    then backward's recompute), and backward only scales the stored gradients by the upstream scalar. The
    student's row gradient `[N, H]` and the fp32 head gradient `[V, H]` live from forward to backward.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, spec: _DistillSpec, weights: Tensor, old_token_logps: Tensor | None,
                is_clip: float | None, student_x: Tensor, student_weight: Tensor | None, student_bias: Tensor | None,
                teacher_x: Tensor, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
                token_ids: Tensor | None) -> tuple[Tensor, ...]:
        rows = _Rows(student_x, student_weight, student_bias, teacher_x, teacher_weight, teacher_bias, token_ids)
        per_token_loss, stats = _empty_outputs(rows)
        workspace = _workspace(spec, rows.student_x.size(0), rows.student_x.device)
        needs = tuple(spec.needs_grad and need for need in ctx.needs_input_grad[4:7])  # type: ignore[attr-defined]
        grads = _StudentGrads(rows, needs)  # type: ignore[arg-type]
        total = torch.zeros((), dtype=torch.float32, device=rows.student_x.device)
        for chunk in _forward_chunks(spec, rows, workspace):
            _store(chunk, per_token_loss, stats)
            chunk_weights = weights[chunk.rows].float()  # [n]
            if old_token_logps is not None:
                chunk_weights = chunk_weights * importance_weight(chunk.stats[0], old_token_logps[chunk.rows],  # type: ignore[index]
                                                                  is_clip)
            total += weighted_token_sum(chunk.loss, chunk_weights)
            if not spec.needs_grad:
                continue
            scale = chunk_weights.unsqueeze(-1) / spec.temperature  # [n, 1]; d(z/τ) = dz/τ
            if chunk.topk is not None and chunk.topk.logps_grad is not None:
                # a NaN ∂ℓ/∂s of a zero-weight token (garbage at padding) must not reach the gradient
                topk_logps_grad = torch.where((chunk_weights != 0).unsqueeze(-1), chunk.topk.logps_grad,
                                              torch.zeros_like(chunk.topk.logps_grad))
                out = grads.logit_grad_buffer(chunk.rows, workspace)
                logit_grad = _topk_logit_grad(chunk.student_logits, chunk.topk.student_logsumexp, chunk.topk.indices,
                                              topk_logps_grad, scale, out=out)
            else:
                logit_grad = _full_vocab_logit_grad(spec, chunk.student_logits, chunk.teacher_logits, scale)
            grads.add(chunk.rows, logit_grad)
        ctx.grads = grads.result()  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(per_token_loss, *stats)
        return total, per_token_loss, *stats

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_total: Tensor, *_other_grads: Tensor) -> tuple[Tensor | None, ...]:
        grads: tuple[Tensor | None, ...] = ctx.grads  # type: ignore[attr-defined]
        del ctx.grads  # type: ignore[attr-defined]
        scaled = tuple(None if g is None else g if bool(grad_total == 1) else g * grad_total.to(g.dtype)
                       for g in grads)
        return None, None, None, None, *scaled, None, None, None, None


def _spec(student_rows: Tensor, student_weight: Tensor | None, student_bias: Tensor | None, *, vocab_size: int,
          temperature: float, alpha: float, topk: int | None, add_tail: bool, chunk_size: int | None,
          teacher_temperature: float = 1.0) -> _DistillSpec:
    """Checked options; `needs_grad` is whether any student input takes a gradient here."""
    _check_args(alpha, topk, chunk_size)
    for name, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    return _DistillSpec(
        alpha=float(alpha),
        topk=_effective_topk(topk, vocab_size),
        add_tail=add_tail,
        chunk_size=max(student_rows.size(0), 1) if chunk_size is None else int(chunk_size),
        temperature=float(temperature),
        vocab_size=vocab_size,
        needs_grad=torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (student_rows, student_weight, student_bias)
        ),
        teacher_temperature=float(teacher_temperature),
    )


def _flat_rows(student_x: Tensor, teacher_x: Tensor, token_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """`[..., D]` inputs as `[N, D]` rows (views for contiguous input) and the token ids as `[N]`."""
    lead_shape = student_x.shape[:-1]
    if teacher_x.shape[:-1] != lead_shape:
        raise ValueError(f"student and teacher have different token shapes: {lead_shape} vs {teacher_x.shape[:-1]}")
    if token_ids is not None and token_ids.shape != lead_shape:
        raise ValueError(f"token ids {tuple(token_ids.shape)} do not match the token shape {tuple(lead_shape)}")
    ids = None if token_ids is None else token_ids.reshape(-1)
    return student_x.reshape(-1, student_x.size(-1)), teacher_x.reshape(-1, teacher_x.size(-1)), ids


def _run_chunked(
    student_x: Tensor,
    teacher_x: Tensor,
    student_weight: Tensor | None,
    teacher_weight: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    *,
    vocab_size: int,
    temperature: float,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    chunk_size: int | None,
    token_ids: Tensor | None = None,
) -> tuple[Tensor, TokenStats | None]:
    """Flatten `[..., D]` rows, run the chunked function, restore the leading shape."""
    lead_shape = student_x.shape[:-1]
    student_rows, teacher_rows, ids = _flat_rows(student_x, teacher_x, token_ids)
    spec = _spec(student_rows, student_weight, student_bias, vocab_size=vocab_size, temperature=temperature,
                 alpha=alpha, topk=topk, add_tail=add_tail, chunk_size=chunk_size)
    per_token_loss, *stats = _ChunkedDistillation.apply(
        spec, student_rows, student_weight, student_bias, teacher_rows, teacher_weight, teacher_bias, ids
    )  # [N] each (the statistics are empty without token ids)
    token_stats = None if token_ids is None else TokenStats(*(s.view(lead_shape) for s in stats))
    return per_token_loss.view(lead_shape), token_stats


def chunked_per_token_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> Tensor:
    """`per_token_distillation_loss` computed `chunk_size` tokens at a time, `[..., V] -> [...]`.

    Bounds the fp32 log-softmax temporaries (forward and backward) to `chunk_size x V`; the only full-size
    tensor created is the gradient of `student_logits`, in its own dtype. `temperature` (default 1: logits
    already tempered) divides in fp32 per chunk, sparing a full-size copy. `chunk_size=None`: one chunk.
    """
    _check_same_shape(student_logits, teacher_logits)
    per_token_loss, _ = _run_chunked(
        student_logits, teacher_logits, None, None, None, None,
        vocab_size=student_logits.size(-1), temperature=temperature, alpha=alpha, topk=topk, add_tail=add_tail,
        chunk_size=chunk_size,
    )
    return per_token_loss


def chunked_distillation_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_lm_head: Tensor,
    teacher_lm_head: Tensor,
    *,
    temperature: float,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
) -> Tensor:
    """Per-token SDPO divergence from final hidden states `[..., H]` and LM-head weights `[V, H]`.

    Logits `(hidden @ W.T + b) / temperature` exist only `chunk_size` tokens at a time, in forward and in
    backward (recomputed), so memory is `O(chunk_size x V)` instead of `O(B x T x V)`. The matmul runs in the
    weights' dtype like the model's own head; everything after it runs in fp32. Gradients flow to the
    student's hidden states, weight and bias; never to the teacher's.
    """
    per_token_loss, _ = _run_hidden(
        student_hidden, teacher_hidden, student_lm_head, teacher_lm_head, student_lm_head_bias, teacher_lm_head_bias,
        temperature=temperature, alpha=alpha, topk=topk, add_tail=add_tail, chunk_size=chunk_size, token_ids=None,
    )
    return per_token_loss


def chunked_distillation_loss_with_stats(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_lm_head: Tensor,
    teacher_lm_head: Tensor,
    token_ids: Tensor,
    *,
    temperature: float,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
) -> tuple[Tensor, TokenStats]:
    """`chunked_distillation_loss` plus the sampled tokens' log-probs and both entropies `[...]` (`TokenStats`).

    The statistics come from the logits each chunk builds for the loss anyway, so the trainer needs no second
    pass through the LM heads for its importance ratio and its logged KL and entropies (`token_stats_from_hidden`
    gives the student's separately). They carry no gradient and leave the loss and its gradients unchanged.
    """
    per_token_loss, stats = _run_hidden(
        student_hidden, teacher_hidden, student_lm_head, teacher_lm_head, student_lm_head_bias, teacher_lm_head_bias,
        temperature=temperature, alpha=alpha, topk=topk, add_tail=add_tail, chunk_size=chunk_size,
        token_ids=token_ids,
    )
    assert stats is not None
    return per_token_loss, stats


class WeightedDistillation(NamedTuple):
    """What `weighted_distillation_loss` returns."""

    loss: Tensor  # scalar Σ w·ρ·ℓ, with gradient
    per_token_loss: Tensor  # [...] ℓ, no gradient (for logging)
    stats: TokenStats | None  # present when token ids were given


def weighted_distillation_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_lm_head: Tensor,
    teacher_lm_head: Tensor,
    token_weights: Tensor,
    *,
    temperature: float,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    token_ids: Tensor | None = None,
    old_token_logps: Tensor | None = None,
    is_clip: float | None = None,
    teacher_temperature: float = 1.0,
) -> WeightedDistillation:
    """The scalar `Σ w·ρ·ℓ` over tokens `[...]`, from hidden states, with its gradients computed in the same pass.

    ℓ is `chunked_distillation_loss`'s per-token divergence, `w` the constant `token_weights` (a trainer's mask
    and normaliser, e.g. `aggregation_weights`), ρ the detached `importance_weight` of the sampled tokens
    (`token_ids` and `old_token_logps` given; else 1). Values and gradients equal those of
    `(chunked_distillation_loss(...) * w * ρ).sum()` over `w ≠ 0` (NaN or inf where `w = 0` cannot leak in), but
    each chunk goes through the LM heads once instead of twice: knowing `w` up front, the chunk's logit gradient
    is contracted with the head while its logits still exist. Memory: the student's row gradient and the fp32
    head gradient are held from forward to backward. `teacher_temperature` sharpens (< 1) the teacher: its logits
    are divided by `temperature · teacher_temperature`, and its statistics are those of that distribution.
    """
    _check_same_vocabulary(student_lm_head, teacher_lm_head)
    if token_weights.shape != student_hidden.shape[:-1]:
        raise ValueError(f"token weights {tuple(token_weights.shape)} do not match the token shape "
                         f"{tuple(student_hidden.shape[:-1])}")
    if old_token_logps is not None and (token_ids is None or old_token_logps.shape != token_ids.shape):
        raise ValueError("old_token_logps needs token_ids of the same shape (the ratio is taken at sampled tokens)")
    lead_shape = student_hidden.shape[:-1]
    student_rows, teacher_rows, ids = _flat_rows(student_hidden, teacher_hidden, token_ids)
    spec = _spec(student_rows, student_lm_head, student_lm_head_bias, vocab_size=student_lm_head.size(0),
                 temperature=temperature, alpha=alpha, topk=topk, add_tail=add_tail, chunk_size=chunk_size,
                 teacher_temperature=teacher_temperature)
    old = None if old_token_logps is None else old_token_logps.reshape(-1)
    loss, per_token_loss, *stats = _FusedDistillation.apply(
        spec, token_weights.detach().reshape(-1), old, is_clip, student_rows, student_lm_head, student_lm_head_bias,
        teacher_rows, teacher_lm_head, teacher_lm_head_bias, ids,
    )
    token_stats = None if token_ids is None else TokenStats(*(s.view(lead_shape) for s in stats))
    return WeightedDistillation(loss, per_token_loss.view(lead_shape), token_stats)


def _run_hidden(student_hidden: Tensor, teacher_hidden: Tensor, student_lm_head: Tensor, teacher_lm_head: Tensor,
                student_bias: Tensor | None, teacher_bias: Tensor | None, *, token_ids: Tensor | None,
                **options: Any) -> tuple[Tensor, TokenStats | None]:
    _check_same_vocabulary(student_lm_head, teacher_lm_head)
    return _run_chunked(student_hidden, teacher_hidden, student_lm_head, teacher_lm_head, student_bias, teacher_bias,
                        vocab_size=student_lm_head.size(0), token_ids=token_ids, **options)


def distillation_loss_per_token(
    student: Tensor,
    teacher: Tensor,
    *,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    student_lm_head: Tensor | None = None,
    teacher_lm_head: Tensor | None = None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
) -> Tensor:
    """Per-token loss from hidden states when LM heads are given, from logits otherwise (`[...]`); the tests'
    single door to both paths (the trainer calls `chunked_distillation_loss_with_stats`)."""
    if (student_lm_head is None) != (teacher_lm_head is None):
        raise ValueError("pass both student_lm_head and teacher_lm_head, or neither")
    if student_lm_head is not None and teacher_lm_head is not None:
        return chunked_distillation_loss(
            student, teacher, student_lm_head, teacher_lm_head, temperature=temperature, alpha=alpha, topk=topk,
            add_tail=add_tail, chunk_size=chunk_size, student_lm_head_bias=student_lm_head_bias,
            teacher_lm_head_bias=teacher_lm_head_bias,
        )
    return chunked_per_token_distillation_loss(
        student, teacher, alpha=alpha, topk=topk, add_tail=add_tail, chunk_size=chunk_size, temperature=temperature
    )


# ------------------------------------------------------------------------------------------------ sampled token
class _SampledTokenLogps(torch.autograd.Function):
    """log_softmax(z)[y] in fp32, chunked; backward is `g·(onehot(y) − softmax(z))` written per chunk."""

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, token_ids: Tensor, chunk_size: int) -> Tensor:
        token_logits = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float()  # [N]
        logsumexp = torch.empty_like(token_logits)  # [N]
        for start in range(0, logits.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            logsumexp[rows] = torch.logsumexp(logits[rows].float(), dim=-1)  # [n]
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        ctx.save_for_backward(logits, token_ids, logsumexp)
        return token_logits - logsumexp

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_logps: Tensor) -> tuple[Tensor | None, None, None]:
        logits, token_ids, logsumexp = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        grad_logits = torch.empty_like(logits)  # [N, V]
        for start in range(0, logits.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            grad = grad_logps[rows].float().unsqueeze(-1)  # [n, 1]
            chunk_grad = (logits[rows].float() - logsumexp[rows].unsqueeze(-1)).exp_().mul_(-grad)  # [n, V]
            chunk_grad.scatter_add_(-1, token_ids[rows].unsqueeze(-1), grad)
            grad_logits[rows] = chunk_grad
        return grad_logits, None, None


def sampled_token_logps(logits: Tensor, token_ids: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Log-prob of each sampled token, `[..., V], [...] -> [...]` in fp32.

    Memory-aware: the fp32 logsumexp runs `chunk_size` rows at a time and backward writes the gradient
    (in the logits' dtype) chunk by chunk, so bf16 logits never get a full fp32 copy.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match token ids {tuple(token_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead_shape = token_ids.shape
    rows = logits.reshape(-1, logits.size(-1))  # [N, V]
    token_logps = _SampledTokenLogps.apply(rows, token_ids.reshape(-1), int(chunk_size))  # [N]
    return token_logps.view(lead_shape)


class _HiddenSampledTokenLogps(torch.autograd.Function):
    """log_softmax((h·Wᵀ + b)/τ)[y] in fp32, chunked; logits exist `chunk_size` rows at a time in both passes."""

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: Tensor, weight: Tensor, bias: Tensor | None, token_ids: Tensor,
                temperature: float, chunk_size: int) -> Tensor:
        token_logps = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)  # [N]
        logsumexp = torch.empty_like(token_logps)  # [N]
        for start in range(0, hidden.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _project_logits(hidden[rows], weight, bias, temperature)  # [n, V]
            logsumexp[rows] = torch.logsumexp(logits, dim=-1)
            token_logps[rows] = logits.gather(-1, token_ids[rows].unsqueeze(-1)).squeeze(-1) - logsumexp[rows]
        ctx.temperature, ctx.chunk_size = temperature, chunk_size  # type: ignore[attr-defined]
        ctx.save_for_backward(hidden, weight, bias, token_ids, logsumexp)  # type: ignore[arg-type]  # bias may be None
        return token_logps

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_logps: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, token_ids, logsumexp = ctx.saved_tensors  # type: ignore[attr-defined]
        temperature: float = ctx.temperature  # type: ignore[attr-defined]
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            scale = grad_logps[rows].float().unsqueeze(-1) / temperature  # [n, 1]; d(z/τ) = dz/τ
            logits = _project_logits(hidden[rows], weight, bias, temperature)  # [n, V]
            grad_logits = (logits - logsumexp[rows].unsqueeze(-1)).exp_().mul_(-scale)  # -g·softmax/τ
            grad_logits.scatter_add_(-1, token_ids[rows].unsqueeze(-1), scale)  # + g·onehot(y)/τ
            grad_out = grad_logits.to(weight.dtype)  # [n, V]
            if need_hidden:
                grad_hidden[rows] = grad_out @ weight  # type: ignore[index]
            if need_weight:
                grad_weight.add_(grad_out.T @ hidden[rows])  # type: ignore[union-attr]
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))  # type: ignore[union-attr]
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def sampled_token_logps_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Log-prob of each sampled token from hidden states `[..., H]`, with gradient, `[...]` in fp32.

    What GRPO's policy-gradient term needs on the hidden-state path: the same values as
    `sampled_token_logps(F.linear(hidden, weight, bias) / temperature, token_ids)`, with logits built
    `chunk_size` tokens at a time in forward and again in backward (one extra pass through the LM head, no
    second pass through the model).
    """
    if hidden.shape[:-1] != token_ids.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match token ids {tuple(token_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = hidden.reshape(-1, hidden.size(-1))  # [N, H]
    token_logps = _HiddenSampledTokenLogps.apply(rows, weight, bias, token_ids.reshape(-1), float(temperature),
                                                 int(chunk_size))  # [N]
    return token_logps.view(token_ids.shape)


@torch.no_grad()
def token_entropy(logits: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Entropy of softmax(logits) per token, `[..., V] -> [...]`, fp32, for logging only (no gradient)."""
    rows = logits.reshape(-1, logits.size(-1))  # [N, V]
    entropy = torch.empty(rows.size(0), dtype=torch.float32, device=logits.device)  # [N]
    for start in range(0, rows.size(0), chunk_size):
        chunk_logps = torch.log_softmax(rows[start:start + chunk_size].float(), dim=-1)  # [n, V]
        entropy[start:start + chunk_size] = -(chunk_logps.exp() * chunk_logps).sum(-1)
    return entropy.view(logits.shape[:-1])


# ------------------------------------------------------------------------------------------------ token level
def token_level_reverse_kl(student_token_logps: Tensor, teacher_token_logps: Tensor) -> Tensor:
    """REINFORCE estimate of KL(S‖T) on the sampled token: `sg(log πS − log πT) · log πS`, `[B, T]`.

    Its gradient is `(log πS − log πT)·∇log πS`, the score-function gradient of the reverse KL
    (lasgroup/SDPO core_algos.py:1163-1166; only meaningful with α=1).
    """
    return (student_token_logps - teacher_token_logps).detach() * student_token_logps  # [B, T]


def importance_weight(per_token_logps: Tensor, old_per_token_logps: Tensor | None, is_clip: float | None) -> Tensor:
    """Detached per-token IS ratio `min(exp(clamp(log πθ − log πold, ±20)), is_clip)`, `[B, T]`.

    Clipped above only (lasgroup/SDPO core_algos.py:1168-1180). Ones when `is_clip` is None (disabled) or
    there are no old log-probs (on-policy: πold is πθ detached, so the ratio is exactly 1).
    """
    if old_per_token_logps is None or is_clip is None:
        return torch.ones_like(per_token_logps).detach()
    log_ratio = (per_token_logps - old_per_token_logps).detach()  # [B, T]
    log_ratio = log_ratio.clamp(-IS_LOG_RATIO_CLAMP, IS_LOG_RATIO_CLAMP)
    return log_ratio.exp().clamp(max=is_clip)  # [B, T]


# ------------------------------------------------------------------------------------------------ aggregation
def aggregation_weights(
    mask: Tensor,
    *,
    mode: Literal["sequence_mean", "token_mean"],
    num_sequences: float | Tensor | None = None,
    num_active_tokens: float | Tensor | None = None,
) -> Tensor:
    """Each token's weight `[B, T]` in `aggregate_loss`: its loss is `weighted_token_sum(per_token_loss, weights)`.

    `"sequence_mean"`: mask / the sequence's active tokens (at least 1) / `num_sequences` (default `B`).
    `"token_mean"`: mask / `num_active_tokens` (default: this batch's count, at least 1). Known before the loss
    is computed, so `weighted_distillation_loss` can take its gradient in the same pass.
    """
    mask = mask.float()  # [B, T]
    if mode == "sequence_mean":
        tokens_per_sequence = mask.sum(-1, keepdim=True).clamp(min=1.0)  # [B, 1]
        denominator = mask.size(0) if num_sequences is None else num_sequences
        return mask / tokens_per_sequence / denominator
    if mode == "token_mean":
        denominator = mask.sum().clamp(min=1.0) if num_active_tokens is None else num_active_tokens
        return mask / denominator
    raise ValueError(f"mode must be one of 'sequence_mean', 'token_mean', got {mode!r}")


def weighted_token_sum(per_token_loss: Tensor, weights: Tensor) -> Tensor:
    """`Σ weights·per_token_loss` over tokens with a non-zero weight (NaN or inf elsewhere cannot leak in).

    Always connected to `per_token_loss`'s graph, so an all-masked batch still backpropagates (DDP needs it).
    """
    weights = weights.to(per_token_loss.dtype)
    return torch.where(weights != 0, per_token_loss * weights, torch.zeros_like(per_token_loss)).sum()


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    *,
    mode: Literal["sequence_mean", "token_mean"],
    num_sequences: float | Tensor | None = None,
    num_active_tokens: float | Tensor | None = None,
) -> Tensor:
    """Reduce `[B, T]` per-token losses under `mask` (response · sd_mask · tool mask) to a scalar.

    - `"sequence_mean"`: each sequence's token mean over its mask, summed, divided by `num_sequences`.
      A fully masked sequence adds 0 but counts in `num_sequences`. Pass the number of sequences of the whole
      optimizer step (masked ones included) and sum the micro-batch losses: the result is then independent
      of micro-batching and gradient accumulation. Default: this batch's `B`.
    - `"token_mean"`: masked sum divided by `num_active_tokens`, the step's global count of active tokens
      (default: this batch's count, clamped to >= 1). Pass the global count to be micro-batch invariant.

    How this matches lasgroup/SDPO (docs/algorithm.md §2.6): the reference takes a token mean over the unmasked
    tokens of each micro-batch (core_algos.py:1182-1187) and multiplies by 1/GA (dp_actor.py:746-773); an
    all-masked micro-batch gives 0 (dp_actor.py:848). Its runs use micro-batch 1 (user.yaml:22), so every
    micro-batch is one sequence and the step's loss is the mean over the step's sequences of each
    sequence's token mean, masked sequences contributing 0 to the sum but 1 to the count (and DDP averages
    ranks, i.e. the same mean over all ranks' sequences). `"sequence_mean"` with `num_sequences` = the step's
    sequences is exactly that, at any micro-batch size. `"token_mean"` with the local count is the literal
    per-micro-batch formula; with the global count it is a step-wide token mean.

    An all-masked batch returns a zero still connected to `per_token_loss`'s graph, so `backward()` works
    under DDP; masked positions are zeroed with `where`, so NaN/inf there cannot leak into the value.
    """
    if per_token_loss.shape != mask.shape:
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} differ")
    weights = aggregation_weights(mask, mode=mode, num_sequences=num_sequences, num_active_tokens=num_active_tokens)
    return weighted_token_sum(per_token_loss, weights)


@torch.no_grad()
def token_stats_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Sampled-token log-probs and entropy `[...]` (fp32, no gradient) from hidden states `[..., H]`.

    For the importance ratio and the logged KL and entropy on the hidden-state path: logits exist only
    `chunk_size` tokens at a time.
    """
    if hidden.shape[:-1] != token_ids.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match token ids {tuple(token_ids.shape)}")
    rows = hidden.reshape(-1, hidden.size(-1))  # [N, H]
    ids = token_ids.reshape(-1)  # [N]
    token_logps = torch.empty(rows.size(0), dtype=torch.float32, device=hidden.device)  # [N]
    entropy = torch.empty_like(token_logps)  # [N]
    for start in range(0, rows.size(0), chunk_size):
        chunk = slice(start, start + chunk_size)
        logps = torch.log_softmax(_project_logits(rows[chunk], weight, bias, temperature), dim=-1)  # [n, V]
        token_logps[chunk] = logps.gather(-1, ids[chunk].unsqueeze(-1)).squeeze(-1)
        entropy[chunk] = -(logps.exp() * logps).sum(-1)
    return token_logps.view(token_ids.shape), entropy.view(token_ids.shape)

"""`sdpo_core.loss` against brute-force references written independently here.

The references work in probability space, token by token, in float64: explicit softmax, a Python sort for
the student's top-K, explicit bucket probabilities (tail = 1 − min(Σ_K p, e^-1e-7)), the mixture
M = (1−α)S + αT and KL as Σ p·log(p/q). The implementation works in fp32 log space, so agreement checks
the maths, not a shared code path. Gradients are compared through autograd on both sides.
"""

from __future__ import annotations

import gc
import math
import weakref
from functools import partial

import pytest
import torch

from sdpo_core import loss as sdpo_loss

ALPHAS = [0.0, 0.3, 0.5, 1.0]
B, T, V, H = 2, 3, 11, 5
close = partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ references
def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p·log(p/q), skipping p = 0 terms."""
    return sum((p[i] * torch.log(p[i] / q[i]) for i in range(p.numel()) if p[i] > 0), torch.zeros((), dtype=p.dtype))


def _divergence(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return _kl(t, s)
    if alpha == 1.0:
        return _kl(s, t)
    m = (1 - alpha) * s + alpha * t
    return (1 - alpha) * _kl(s, m) + alpha * _kl(t, m)


def brute_force_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, topk: int | None,
                     add_tail: bool) -> torch.Tensor:
    """Per-token loss `[B, T]` in float64, differentiable w.r.t. `student_logits`."""
    vocab = student_logits.size(-1)
    rows = []
    for b in range(student_logits.size(0)):
        row = []
        for t in range(student_logits.size(1)):
            s_probs = torch.softmax(student_logits[b, t].double(), dim=-1)
            t_probs = torch.softmax(teacher_logits[b, t].detach().double(), dim=-1)
            if topk is None or topk >= vocab:
                s_buckets, t_buckets = s_probs, t_probs
            else:
                order = sorted(range(vocab), key=lambda v, b=b, t=t: -student_logits[b, t, v].item())[:topk]
                s_buckets = torch.stack([s_probs[v] for v in order])
                t_buckets = torch.stack([t_probs[v] for v in order])
                if add_tail:
                    cap = math.exp(-1e-7)
                    s_buckets = torch.cat([s_buckets, (1 - s_buckets.sum().clamp(max=cap)).reshape(1)])
                    t_buckets = torch.cat([t_buckets, (1 - t_buckets.sum().clamp(max=cap)).reshape(1)])
                else:
                    s_buckets, t_buckets = s_buckets / s_buckets.sum(), t_buckets / t_buckets.sum()
            row.append(_divergence(s_buckets, t_buckets, alpha))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _logits(*shape: int, scale: float = 2.0, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float().requires_grad_(requires_grad)


def _grad(fn, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Value of `fn(x)` and d(Σ weights·fn(x))/dx."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad((out * weights.to(out.dtype)).sum(), x)
    return out.detach(), grad


# ------------------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("topk", [4, 1, None, V, V + 5])
def test_matches_brute_force_values_and_grads(alpha, add_tail, topk):
    student, teacher, weights = _logits(B, T, V, seed=1), _logits(B, T, V, seed=2), _logits(B, T, seed=3)
    kwargs = {"alpha": alpha, "topk": topk, "add_tail": add_tail}
    value, grad = _grad(lambda s: sdpo_loss.per_token_distillation_loss(s, teacher, **kwargs), student, weights)
    ref_value, ref_grad = _grad(lambda s: brute_force_loss(s, teacher, alpha, topk, add_tail), student.double(),
                                weights)
    assert value.dtype == torch.float32
    close(value.double(), ref_value)
    close(grad.double(), ref_grad)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("add_tail", [True, False])
def test_matches_trl_port_of_the_reference(alpha, add_tail):
    # TRL 1.16 ports lasgroup/SDPO's top-K loss; same semantics, so a second, external oracle.
    from trl.experimental.sdpo.loss_utils import (
        compute_full_logit_self_distillation_loss,
        compute_topk_self_distillation_loss,
    )

    student, teacher = _logits(B, T, V, seed=43), _logits(B, T, V, seed=44)
    close(sdpo_loss.per_token_distillation_loss(student, teacher, alpha=alpha, topk=4, add_tail=add_tail),
          compute_topk_self_distillation_loss(student, teacher, distillation_topk=4, distillation_alpha=alpha,
                                              distillation_add_tail=add_tail))
    close(sdpo_loss.per_token_distillation_loss(student, teacher, alpha=alpha, topk=None, add_tail=add_tail),
          compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=alpha))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_topk_at_least_vocab_is_full_vocabulary(alpha):
    student, teacher = _logits(B, T, V, seed=4), _logits(B, T, V, seed=5)
    full = sdpo_loss.per_token_distillation_loss(student, teacher, alpha=alpha, topk=None, add_tail=True)
    for topk in (V, V + 1, 10 * V):
        for add_tail in (True, False):
            torch.testing.assert_close(
                sdpo_loss.per_token_distillation_loss(student, teacher, alpha=alpha, topk=topk, add_tail=add_tail),
                full,
            )


def test_alpha_endpoints_are_the_two_kls():
    student, teacher = _logits(B, T, V, seed=6), _logits(B, T, V, seed=7)
    s_logps, t_logps = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    forward_kl = (t_logps.exp() * (t_logps - s_logps)).sum(-1)
    reverse_kl = (s_logps.exp() * (s_logps - t_logps)).sum(-1)
    close(sdpo_loss.per_token_distillation_loss(student, teacher, alpha=0.0, topk=None, add_tail=True), forward_kl)
    close(sdpo_loss.per_token_distillation_loss(student, teacher, alpha=1.0, topk=None, add_tail=True), reverse_kl)


def test_teacher_gets_no_gradient():
    student = _logits(B, T, V, seed=8, requires_grad=True)
    teacher = _logits(B, T, V, seed=9, requires_grad=True)
    for fn in (sdpo_loss.per_token_distillation_loss,
               partial(sdpo_loss.chunked_per_token_distillation_loss, chunk_size=2)):
        for topk in (4, None):
            fn(student, teacher, alpha=0.5, topk=topk, add_tail=True).sum().backward()
            assert teacher.grad is None
            assert student.grad is not None


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk", [4, None])
@pytest.mark.parametrize("add_tail", [True, False])
def test_identical_teacher_gives_zero(alpha, topk, add_tail):
    logits = _logits(B, T, V, seed=10)
    value, grad = _grad(
        lambda s: sdpo_loss.per_token_distillation_loss(s, logits, alpha=alpha, topk=topk, add_tail=add_tail),
        logits, torch.ones(B, T),
    )
    torch.testing.assert_close(value, torch.zeros(B, T), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


def test_divergence_is_positive_and_finite_away_from_the_teacher():
    student, teacher = _logits(B, T, V, seed=11), _logits(B, T, V, seed=12)
    for alpha in ALPHAS:
        out = sdpo_loss.per_token_distillation_loss(student, teacher, alpha=alpha, topk=4, add_tail=True)
        assert torch.isfinite(out).all()
        assert (out > 0).all()


# ------------------------------------------------------------------------------------------------ stability
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk", [4, None])
@pytest.mark.parametrize("add_tail", [True, False])
def test_large_logits_stay_finite(alpha, topk, add_tail):
    student, teacher = _logits(B, T, V, scale=1e4, seed=13), _logits(B, T, V, scale=1e4, seed=14)
    for fn in (sdpo_loss.per_token_distillation_loss,
               partial(sdpo_loss.chunked_per_token_distillation_loss, chunk_size=4)):
        value, grad = _grad(lambda s, fn=fn: fn(s, teacher, alpha=alpha, topk=topk, add_tail=add_tail), student,
                            torch.ones(B, T))
        assert torch.isfinite(value).all()
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("teacher_peak", [0, V - 1])
def test_near_one_topk_mass_clamps_the_tail(alpha, teacher_peak):
    # One dominant logit: the top-K log-mass is ~ -1e-20, the tail is clamped to log(1 − e^-1e-7). The teacher
    # peaks inside the student's top-K (both tails clamped) or outside it (all its mass in the tail).
    student = _logits(B, T, V, scale=0.1, seed=42)
    student[..., 0] = 50.0
    student[..., V - 1] = -5.0
    teacher = student.clone()
    teacher[..., teacher_peak] = 60.0
    value, grad = _grad(
        lambda s: sdpo_loss.per_token_distillation_loss(s, teacher, alpha=alpha, topk=3, add_tail=True), student,
        torch.ones(B, T),
    )
    assert torch.isfinite(value).all()
    assert torch.isfinite(grad).all()
    ref_value, _ = _grad(lambda s: brute_force_loss(s, teacher, alpha, 3, True), student.double(), torch.ones(B, T))
    close(value.double(), ref_value, rtol=1e-4, atol=1e-5)


def test_bf16_inputs_are_computed_in_fp32():
    student_fp32, teacher_fp32 = _logits(B, T, V, scale=8.0, seed=15), _logits(B, T, V, scale=8.0, seed=16)
    student, teacher = student_fp32.bfloat16(), teacher_fp32.bfloat16()
    for fn in (sdpo_loss.per_token_distillation_loss,
               partial(sdpo_loss.chunked_per_token_distillation_loss, chunk_size=4)):
        value, grad = _grad(lambda s, fn=fn: fn(s, teacher, alpha=0.5, topk=4, add_tail=True), student,
                            torch.ones(B, T))
        ref_value, ref_grad = _grad(lambda s, fn=fn: fn(s, teacher.float(), alpha=0.5, topk=4, add_tail=True),
                                    student.float(), torch.ones(B, T))
        assert value.dtype == torch.float32
        assert grad.dtype == torch.bfloat16
        close(value, ref_value)
        torch.testing.assert_close(grad, ref_grad.bfloat16())


def test_invalid_arguments_raise():
    student = _logits(B, T, V)
    with pytest.raises(ValueError, match="alpha"):
        sdpo_loss.per_token_distillation_loss(student, student, alpha=1.5, topk=4, add_tail=True)
    with pytest.raises(ValueError, match="topk"):
        sdpo_loss.per_token_distillation_loss(student, student, alpha=0.5, topk=0, add_tail=True)
    with pytest.raises(ValueError, match="chunk_size"):
        sdpo_loss.chunked_per_token_distillation_loss(student, student, alpha=0.5, topk=4, add_tail=True,
                                                      chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        sdpo_loss.per_token_distillation_loss(student, student[:, :2], alpha=0.5, topk=4, add_tail=True)


# ------------------------------------------------------------------------------------------------ chunked paths
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("topk", [4, None, V])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024, None])
def test_chunked_logits_equal_unchunked(alpha, add_tail, topk, chunk_size):
    student, teacher, weights = _logits(B, T, V, seed=17), _logits(B, T, V, seed=18), _logits(B, T, seed=19)
    kwargs = {"alpha": alpha, "topk": topk, "add_tail": add_tail}
    ref_value, ref_grad = _grad(lambda s: sdpo_loss.per_token_distillation_loss(s, teacher, **kwargs), student,
                                weights)
    value, grad = _grad(
        lambda s: sdpo_loss.chunked_per_token_distillation_loss(s, teacher, chunk_size=chunk_size, **kwargs),
        student, weights,
    )
    close(value, ref_value)
    close(grad, ref_grad)


def test_chunked_logits_temperature_divides_in_fp32():
    student, teacher = _logits(B, T, V, seed=20), _logits(B, T, V, seed=21)
    ref = sdpo_loss.per_token_distillation_loss(student / 0.7, teacher / 0.7, alpha=0.5, topk=4, add_tail=True)
    out = sdpo_loss.chunked_per_token_distillation_loss(student, teacher, alpha=0.5, topk=4, add_tail=True,
                                                        chunk_size=2, temperature=0.7)
    close(out, ref)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk", [4, None])
@pytest.mark.parametrize(("with_bias", "head_requires_grad"), [(True, True), (False, True), (False, False)])
def test_chunked_hidden_states_equal_full_logits(alpha, topk, with_bias, head_requires_grad):
    temperature = 0.7
    student_hidden, teacher_hidden = _logits(B, T, H, scale=1.0, seed=22), _logits(B, T, H, scale=1.0, seed=23)
    student_head, teacher_head = _logits(V, H, scale=1.0, seed=24), _logits(V, H, scale=1.0, seed=25)
    student_bias = _logits(V, scale=0.5, seed=26) if with_bias else None
    teacher_bias = _logits(V, scale=0.5, seed=27) if with_bias else None
    weights = _logits(B, T, seed=28)
    kwargs = {"alpha": alpha, "topk": topk, "add_tail": True}

    def reference(hidden, head, bias):
        student_logits = torch.nn.functional.linear(hidden, head, bias) / temperature  # [B, T, V]
        teacher_logits = torch.nn.functional.linear(teacher_hidden, teacher_head, teacher_bias) / temperature
        return sdpo_loss.per_token_distillation_loss(student_logits, teacher_logits, **kwargs)

    def chunked(hidden, head, bias):
        return sdpo_loss.chunked_distillation_loss(
            hidden, teacher_hidden, head, teacher_head, temperature=temperature, chunk_size=4,
            student_lm_head_bias=bias, teacher_lm_head_bias=teacher_bias, **kwargs,
        )

    results = []
    for fn in (reference, chunked):
        hidden, head = student_hidden.clone().requires_grad_(), student_head.clone().requires_grad_(head_requires_grad)
        bias = student_bias.clone().requires_grad_() if with_bias else None
        leaves = [t for t in (hidden, head, bias) if t is not None and t.requires_grad]
        out = fn(hidden, head, bias)
        results.append((out.detach(), torch.autograd.grad((out * weights).sum(), leaves)))
    (ref_value, ref_grads), (value, grads) = results
    close(value, ref_value, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_chunked_hidden_states_bf16_head_gives_bf16_grads():
    hidden = _logits(B, T, H, scale=1.0, seed=29).bfloat16().requires_grad_()
    head = _logits(V, H, scale=1.0, seed=30).bfloat16().requires_grad_()
    out = sdpo_loss.chunked_distillation_loss(hidden, hidden.detach(), head, head.detach() * 1.1, temperature=1.0,
                                              alpha=0.5, topk=4, add_tail=True, chunk_size=2)
    out.sum().backward()
    assert out.dtype == torch.float32
    assert hidden.grad.dtype == torch.bfloat16
    assert head.grad.dtype == torch.bfloat16
    assert torch.isfinite(head.grad.float()).all()


def test_entry_point_dispatches():
    student_hidden, teacher_hidden = _logits(B, T, H, scale=1.0, seed=31), _logits(B, T, H, scale=1.0, seed=32)
    head = _logits(V, H, scale=1.0, seed=33)
    kwargs = {"alpha": 0.5, "topk": 4, "add_tail": True, "chunk_size": 2}
    from_hidden = sdpo_loss.distillation_loss_per_token(student_hidden, teacher_hidden, student_lm_head=head,
                                                        teacher_lm_head=head, **kwargs)
    from_logits = sdpo_loss.distillation_loss_per_token(student_hidden @ head.T, teacher_hidden @ head.T, **kwargs)
    close(from_hidden, from_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="both"):
        sdpo_loss.distillation_loss_per_token(student_hidden, teacher_hidden, student_lm_head=head, **kwargs)


def test_chunked_topk_path_does_not_keep_the_teacher_alive():
    # The trainer drops the teacher logits right after the loss: backward must not need them in top-K mode.
    student = _logits(B, T, V, seed=34, requires_grad=True)
    teacher = _logits(B, T, V, seed=35)
    teacher_ref = weakref.ref(teacher)
    out = sdpo_loss.chunked_per_token_distillation_loss(student, teacher, alpha=0.5, topk=4, add_tail=True,
                                                        chunk_size=2)
    del teacher
    gc.collect()
    assert teacher_ref() is None
    out.sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("topk", [4, None])
def test_chunked_paths_without_autograd(context, topk):
    # eval runs under no_grad (or inference_mode): same values, no graph
    student, teacher = _logits(B, T, V, seed=45, requires_grad=True), _logits(B, T, V, seed=46)
    head = torch.eye(V)
    reference = sdpo_loss.per_token_distillation_loss(student, teacher, alpha=0.5, topk=topk, add_tail=True)
    with context():
        from_logits = sdpo_loss.chunked_per_token_distillation_loss(student, teacher, alpha=0.5, topk=topk,
                                                                    add_tail=True, chunk_size=2)
        from_hidden = sdpo_loss.chunked_distillation_loss(student, teacher, head, head, temperature=1.0, alpha=0.5,
                                                          topk=topk, add_tail=True, chunk_size=2)
    assert not from_logits.requires_grad
    close(from_logits, reference.detach())
    close(from_hidden, reference.detach(), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    student = torch.zeros(0, T, V, requires_grad=True)
    out = sdpo_loss.chunked_per_token_distillation_loss(student, student.detach(), alpha=0.5, topk=4, add_tail=True)
    assert out.shape == (0, T)
    out.sum().backward()
    assert student.grad.shape == student.shape


# ------------------------------------------------------------------------------------------------ sampled token
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_token_logps(dtype):
    logits = _logits(B, T, V, scale=5.0, seed=36).to(dtype)
    token_ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(37))
    weights = _logits(B, T, seed=38)
    value, grad = _grad(lambda z: sdpo_loss.sampled_token_logps(z, token_ids, chunk_size=2), logits, weights)

    def reference(z):
        return torch.stack([torch.stack([torch.log_softmax(z[b, t].double(), -1)[token_ids[b, t]]
                                         for t in range(T)]) for b in range(B)])

    ref_value, ref_grad = _grad(reference, logits.double(), weights)
    assert value.dtype == torch.float32
    assert grad.dtype == dtype
    close(value.double(), ref_value)
    if dtype == torch.float32:
        close(grad.double(), ref_grad)
    else:
        torch.testing.assert_close(grad, ref_grad.to(dtype))


def test_token_entropy():
    logits = _logits(B, T, V, seed=39)
    probs = torch.softmax(logits.double(), -1)
    close(sdpo_loss.token_entropy(logits, chunk_size=2).double(), -(probs * probs.log()).sum(-1))
    uniform = torch.zeros(1, 1, V, dtype=torch.bfloat16)
    close(sdpo_loss.token_entropy(uniform), torch.full((1, 1), math.log(V)))


# ------------------------------------------------------------------------------------------------ token level
def test_token_level_reverse_kl_value_and_gradient():
    student = torch.tensor([[-0.5, -2.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[-1.0, -1.0, -3.0]], requires_grad=True)
    out = sdpo_loss.token_level_reverse_kl(student, teacher)
    close(out, torch.tensor([[-0.25, 2.0, -2.0]]))
    out.sum().backward()
    # REINFORCE: the gradient w.r.t. log πS is sg(log πS − log πT); the teacher gets none.
    close(student.grad, torch.tensor([[0.5, -1.0, 2.0]]))
    assert teacher.grad is None


# ------------------------------------------------------------------------------------------------ importance weight
def test_importance_weight():
    logps = torch.tensor([[-1.0, -1.0, -1.0, -1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.5, -0.5, -40.0, -100.0]])
    ratio = sdpo_loss.importance_weight(logps, old, is_clip=2.0)
    close(ratio, torch.tensor([[1.0, math.exp(0.5), math.exp(-0.5), 2.0, 2.0]]))
    assert not ratio.requires_grad
    # the ±20 clamp on the log ratio, visible with a huge clip
    unclipped = sdpo_loss.importance_weight(logps, old, is_clip=1e30)
    close(unclipped[0, 3:], torch.tensor([math.exp(20.0), math.exp(20.0)]))
    close(sdpo_loss.importance_weight(logps, torch.tensor([[0.0, 0, 0, 30.0, 0]]), is_clip=1e30)[0, 3],
          torch.tensor(math.exp(-20.0)))
    assert torch.equal(sdpo_loss.importance_weight(logps, None, is_clip=2.0), torch.ones(1, 5))
    assert torch.equal(sdpo_loss.importance_weight(logps, old, is_clip=None), torch.ones(1, 5))
    # on-policy: old = current detached ⇒ exactly 1
    assert torch.equal(sdpo_loss.importance_weight(logps, logps.detach(), is_clip=2.0), torch.ones(1, 5))


# ------------------------------------------------------------------------------------------------ aggregation
def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    return loss, mask


def test_sequence_mean_by_hand():
    loss, mask = _batch()
    # per-sequence means 1.5, 5, (masked) 0, 1; summed 7.5 over 4 sequences, the masked one counted
    close(sdpo_loss.aggregate_loss(loss, mask, mode="sequence_mean"), torch.tensor(7.5 / 4))
    close(sdpo_loss.aggregate_loss(loss, mask, mode="sequence_mean", num_sequences=10), torch.tensor(0.75))


def test_aggregation_weights_by_hand():
    _, mask = _batch()
    by_sequence = sdpo_loss.aggregation_weights(mask, mode="sequence_mean")
    close(by_sequence, torch.tensor([[1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3], [0, 0, 0], [1, 0, 0]]) / 4)
    close(sdpo_loss.aggregation_weights(mask, mode="token_mean", num_active_tokens=3.0), mask / 3)
    loss = torch.tensor([[1.0, float("nan")], [2.0, 3.0]], requires_grad=True)
    total = sdpo_loss.weighted_token_sum(loss, torch.tensor([[0.5, 0.0], [1.0, 2.0]]))
    total.backward()
    close(total, torch.tensor(8.5))
    close(loss.grad, torch.tensor([[0.5, 0.0], [1.0, 2.0]]))


def test_token_mean_by_hand():
    loss, mask = _batch()
    # active tokens: 1+2 + 4+5+6 + 1 = 19 over 6
    close(sdpo_loss.aggregate_loss(loss, mask, mode="token_mean"), torch.tensor(19 / 6))
    close(sdpo_loss.aggregate_loss(loss, mask, mode="token_mean", num_active_tokens=19.0), torch.tensor(1.0))


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean"])
@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_aggregation_is_micro_batch_invariant(mode, micro_batch):
    loss, mask = _batch()
    loss = loss.requires_grad_()
    extra = {"num_sequences": loss.size(0)} if mode == "sequence_mean" else {"num_active_tokens": mask.sum()}
    full = sdpo_loss.aggregate_loss(loss, mask, mode=mode, **extra)
    (full_grad,) = torch.autograd.grad(full, loss)
    parts = [sdpo_loss.aggregate_loss(loss[i:i + micro_batch], mask[i:i + micro_batch], mode=mode, **extra)
             for i in range(0, loss.size(0), micro_batch)]
    summed = torch.stack(parts).sum()
    (summed_grad,) = torch.autograd.grad(summed, loss)
    close(summed, full)
    close(summed_grad, full_grad)


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean"])
def test_all_masked_batch_is_a_graph_connected_zero(mode):
    loss = torch.rand(2, 3, requires_grad=True)
    out = sdpo_loss.aggregate_loss(loss, torch.zeros(2, 3), mode=mode)
    assert out.requires_grad
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(2, 3))


def test_aggregation_ignores_nan_at_masked_positions():
    loss = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    close(sdpo_loss.aggregate_loss(loss, mask, mode="sequence_mean"), torch.tensor(2.0))
    close(sdpo_loss.aggregate_loss(loss, mask, mode="token_mean"), torch.tensor(2.0))
    with pytest.raises(ValueError, match="mode"):
        sdpo_loss.aggregate_loss(loss, mask, mode="mean")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ device
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    student, teacher = _logits(B, T, V, seed=40).to(dtype), _logits(B, T, V, seed=41).to(dtype)

    def run(device: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _grad(lambda s: sdpo_loss.chunked_per_token_distillation_loss(
            s, teacher.to(device), alpha=0.5, topk=4, add_tail=True, chunk_size=2),
            student.to(device), torch.ones(B, T, device=device))

    (cpu_value, cpu_grad), (cuda_value, cuda_grad) = run("cpu"), run("cuda")
    assert cuda_value.device.type == "cuda"
    assert cuda_value.dtype == torch.float32
    assert cuda_grad.dtype == dtype
    close(cuda_value.cpu(), cpu_value)
    torch.testing.assert_close(cuda_grad.cpu(), cpu_grad)


def test_token_stats_from_hidden_match_the_logits_functions():
    from sdpo_core.loss import sampled_token_logps, token_entropy, token_stats_from_hidden

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=generator)
    weight = torch.randn(13, 8, generator=generator)
    bias = torch.randn(13, generator=generator)
    ids = torch.randint(0, 13, (2, 5), generator=generator)
    logits = (hidden @ weight.T + bias) / 0.7
    token_logps, entropy = token_stats_from_hidden(hidden, weight, bias, ids, temperature=0.7, chunk_size=3)
    torch.testing.assert_close(token_logps, sampled_token_logps(logits, ids))
    torch.testing.assert_close(entropy, token_entropy(logits))


@pytest.mark.parametrize("topk", [4, None])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_loss_with_stats_gives_the_same_loss_and_float64_statistics(topk, chunk_size):
    """The statistics (both entropies included) leave loss and gradients bit-identical and match float64."""
    from sdpo_core.loss import chunked_distillation_loss_with_stats

    generator = torch.Generator().manual_seed(1)
    student_hidden = torch.randn(2, 5, 8, generator=generator)
    teacher_hidden = torch.randn(2, 5, 8, generator=generator)
    student_head, teacher_head = torch.randn(13, 8, generator=generator), torch.randn(13, 8, generator=generator)
    bias = torch.randn(13, generator=generator)
    ids = torch.randint(0, 13, (2, 5), generator=generator)
    kwargs = {"temperature": 0.7, "alpha": 0.5, "topk": topk, "add_tail": True, "chunk_size": chunk_size,
              "student_lm_head_bias": bias, "teacher_lm_head_bias": bias}

    results = []
    for with_stats in (False, True):
        hidden, head = student_hidden.clone().requires_grad_(), student_head.clone().requires_grad_()
        if with_stats:
            loss, stats = chunked_distillation_loss_with_stats(hidden, teacher_hidden, head, teacher_head, ids,
                                                               **kwargs)
        else:
            loss = sdpo_loss.chunked_distillation_loss(hidden, teacher_hidden, head, teacher_head, **kwargs)
        results.append((loss.detach(), torch.autograd.grad(loss.sum(), (hidden, head))))
    (plain, plain_grads), (value, grads) = results
    torch.testing.assert_close(value, plain, rtol=0, atol=0)
    for grad, plain_grad in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain_grad, rtol=0, atol=0)

    # float64 references: log-softmax at the sampled token, and -sum p log p
    student_logps = torch.log_softmax((student_hidden.double() @ student_head.double().T + bias.double()) / 0.7, -1)
    teacher_logps = torch.log_softmax((teacher_hidden.double() @ teacher_head.double().T + bias.double()) / 0.7, -1)
    close(stats.student_token_logps, student_logps.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float())
    close(stats.teacher_token_logps, teacher_logps.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float())
    close(stats.entropy, -(student_logps.exp() * student_logps).sum(-1).float())
    close(stats.teacher_entropy, -(teacher_logps.exp() * teacher_logps).sum(-1).float())
    assert not any(t.requires_grad for t in stats)


def test_loss_with_stats_rejects_token_ids_of_another_shape():
    from sdpo_core.loss import chunked_distillation_loss_with_stats

    hidden, head = torch.randn(2, 5, 8), torch.randn(13, 8)
    with pytest.raises(ValueError, match="token ids"):
        chunked_distillation_loss_with_stats(hidden, hidden, head, head, torch.zeros(2, 4, dtype=torch.long),
                                             temperature=1.0, alpha=0.5, topk=4, add_tail=True)


# ------------------------------------------------------------------------------------------------ fused (weighted)
def _fused_inputs(seed: int, with_bias: bool):
    student_hidden, teacher_hidden = _logits(B, T, H, scale=1.0, seed=seed), _logits(B, T, H, scale=1.0, seed=seed + 1)
    # logits of std ~1: a top-K mass near 1 makes the tail ill-conditioned in fp32, for every summation order
    student_head, teacher_head = _logits(V, H, scale=0.5, seed=seed + 2), _logits(V, H, scale=0.5, seed=seed + 3)
    bias = _logits(V, scale=0.5, seed=seed + 4) if with_bias else None
    return student_hidden, teacher_hidden, student_head, teacher_head, bias


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk", [4, None])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_weighted_loss_equals_the_weighted_sum_of_the_per_token_loss(alpha, topk, with_bias, chunk_size):
    """Gradients computed in forward equal autograd's through `chunked_distillation_loss`, weights and all."""
    student_hidden, teacher_hidden, student_head, teacher_head, bias = _fused_inputs(40, with_bias)
    weights = _logits(B, T, seed=45).abs()
    weights[0, 1] = 0.0  # a masked token
    kwargs = {"temperature": 0.7, "alpha": alpha, "topk": topk, "add_tail": True, "chunk_size": chunk_size,
              "teacher_lm_head_bias": bias}
    results = []
    for fused in (False, True):
        hidden, head = student_hidden.clone().requires_grad_(), student_head.clone().requires_grad_()
        student_bias = None if bias is None else bias.clone().requires_grad_()
        leaves = [t for t in (hidden, head, student_bias) if t is not None]
        if fused:
            out = sdpo_loss.weighted_distillation_loss(hidden, teacher_hidden, head, teacher_head, weights,
                                                       student_lm_head_bias=student_bias, **kwargs)
            loss, per_token = out.loss, out.per_token_loss
        else:
            per_token = sdpo_loss.chunked_distillation_loss(hidden, teacher_hidden, head, teacher_head,
                                                            student_lm_head_bias=student_bias, **kwargs)
            loss = (per_token * weights).sum()
        results.append((loss.detach(), per_token.detach(), torch.autograd.grad(3.0 * loss, leaves)))
    (ref_loss, ref_per_token, ref_grads), (loss, per_token, grads) = results
    close(loss, ref_loss)
    torch.testing.assert_close(per_token, ref_per_token, rtol=0, atol=0)
    # the same sums in another order; at α=0 the fp32 tail amplifies rounding to ~5e-5 relative on either path
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_a_teacher_temperature_divides_the_teachers_logits():
    """Sharpening the teacher by τ is the same as a teacher head (and bias) divided by τ: loss, gradients and the
    teacher's statistics; the student's statistics are unchanged."""
    student_hidden, teacher_hidden, student_head, teacher_head, bias = _fused_inputs(50, with_bias=True)
    weights = _logits(B, T, seed=55).abs()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(56))
    results = []
    for head, head_bias, teacher_temperature in ((teacher_head, bias, 0.6), (teacher_head / 0.6, bias / 0.6, 1.0)):
        hidden = student_hidden.clone().requires_grad_()
        out = sdpo_loss.weighted_distillation_loss(
            hidden, teacher_hidden, student_head, head, weights, temperature=0.7, alpha=0.5, topk=4, add_tail=True,
            chunk_size=4, teacher_lm_head_bias=head_bias, token_ids=ids, teacher_temperature=teacher_temperature)
        results.append((out, torch.autograd.grad(out.loss, hidden)[0]))
    (sharpened, grad), (reference, ref_grad) = results
    close(sharpened.loss, reference.loss)
    close(grad, ref_grad)
    for value, ref in zip(sharpened.stats, reference.stats, strict=True):
        close(value, ref)
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        sdpo_loss.weighted_distillation_loss(student_hidden, teacher_hidden, student_head, teacher_head, weights,
                                             temperature=1.0, alpha=0.5, topk=4, add_tail=True,
                                             teacher_temperature=0.0)


def test_weighted_loss_applies_the_importance_weight_at_the_sampled_tokens():
    student_hidden, teacher_hidden, student_head, teacher_head, _ = _fused_inputs(50, False)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    old = _logits(B, T, seed=56) - 3.0
    weights = torch.full((B, T), 0.5)
    kwargs = {"temperature": 1.0, "alpha": 0.5, "topk": 4, "add_tail": True, "chunk_size": 2}
    hidden = student_hidden.clone().requires_grad_()
    out = sdpo_loss.weighted_distillation_loss(hidden, teacher_hidden, student_head, teacher_head, weights,
                                               token_ids=ids, old_token_logps=old, is_clip=2.0, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, hidden)

    reference_hidden = student_hidden.clone().requires_grad_()
    per_token, stats = sdpo_loss.chunked_distillation_loss_with_stats(reference_hidden, teacher_hidden, student_head,
                                                                      teacher_head, ids, **kwargs)
    ratio = sdpo_loss.importance_weight(stats.student_token_logps, old, 2.0)
    assert (ratio != 1.0).any()
    assert (ratio == 2.0).any()
    reference = (per_token * ratio * weights).sum()
    close(out.loss, reference.detach())
    close(grad, torch.autograd.grad(reference, reference_hidden)[0])
    for value, expected in zip(out.stats, stats, strict=True):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_weighted_loss_ignores_nan_at_zero_weight_and_frozen_heads():
    student_hidden, teacher_hidden, student_head, teacher_head, _ = _fused_inputs(60, False)
    teacher_hidden = teacher_hidden.clone()
    teacher_hidden[1, 2] = float("nan")  # a padded position with garbage in it
    weights = torch.ones(B, T)
    weights[1, 2] = 0.0
    hidden = student_hidden.clone().requires_grad_()
    out = sdpo_loss.weighted_distillation_loss(hidden, teacher_hidden, student_head, teacher_head, weights,
                                               temperature=1.0, alpha=0.5, topk=4, add_tail=True, chunk_size=2)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(hidden.grad).all()
    assert not out.per_token_loss.requires_grad
    assert out.stats is None
    assert student_head.grad is None  # a head without requires_grad gets no gradient


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_weighted_loss_without_autograd_gives_the_value(context):
    student_hidden, teacher_hidden, student_head, teacher_head, _ = _fused_inputs(70, False)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(1))
    kwargs = {"temperature": 1.0, "alpha": 0.5, "topk": 4, "add_tail": True, "chunk_size": 2}
    with context():
        out = sdpo_loss.weighted_distillation_loss(student_hidden.requires_grad_(), teacher_hidden, student_head,
                                                   teacher_head, weights, **kwargs)
    per_token = sdpo_loss.chunked_distillation_loss(student_hidden, teacher_hidden, student_head, teacher_head,
                                                    **kwargs)
    close(out.loss, (per_token * weights).sum().detach())


def test_weighted_loss_rejects_mismatched_weights_and_old_logps():
    hidden, head = torch.randn(2, 5, 8), torch.randn(13, 8)
    kwargs = {"temperature": 1.0, "alpha": 0.5, "topk": 4, "add_tail": True}
    with pytest.raises(ValueError, match="token weights"):
        sdpo_loss.weighted_distillation_loss(hidden, hidden, head, head, torch.ones(2, 4), **kwargs)
    with pytest.raises(ValueError, match="old_token_logps"):
        sdpo_loss.weighted_distillation_loss(hidden, hidden, head, head, torch.ones(2, 5),
                                             old_token_logps=torch.zeros(2, 5), **kwargs)
    with pytest.raises(ValueError, match="vocabularies"):
        sdpo_loss.weighted_distillation_loss(hidden, hidden, head, head[:12], torch.ones(2, 5), **kwargs)


def test_weighted_loss_with_a_bf16_head_gives_bf16_grads_like_the_per_token_path():
    student_hidden, teacher_hidden, student_head, teacher_head, _ = _fused_inputs(80, False)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(2))
    kwargs = {"temperature": 1.0, "alpha": 0.5, "topk": 4, "add_tail": True, "chunk_size": 2}
    results = []
    for fused in (False, True):
        hidden = student_hidden.bfloat16().requires_grad_()
        head = student_head.bfloat16().requires_grad_()
        if fused:
            loss = sdpo_loss.weighted_distillation_loss(hidden, teacher_hidden.bfloat16(), head,
                                                        teacher_head.bfloat16(), weights, **kwargs).loss
        else:
            loss = (sdpo_loss.chunked_distillation_loss(hidden, teacher_hidden.bfloat16(), head,
                                                        teacher_head.bfloat16(), **kwargs) * weights).sum()
        results.append(torch.autograd.grad(loss, (hidden, head)))
    for grad, reference in zip(*reversed(results), strict=True):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, reference, rtol=1e-2, atol=1e-2)

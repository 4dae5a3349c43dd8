"""GRPO's policy-gradient term (`sdpo_core.policy_loss`) against hand-computed values, and SRPO-style routing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdpo_core.loss import sampled_token_logps, sampled_token_logps_from_hidden
from sdpo_core.policy_loss import aggregate_policy_loss, policy_per_token_loss, route_rows

EPS = {"epsilon_low": 0.2, "epsilon_high": 0.28}


def test_on_policy_loss_is_minus_the_advantage_and_its_gradient_the_score_function():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    advantages = torch.tensor([1.5, -0.5])
    mask = torch.ones(2, 2)
    loss = policy_per_token_loss(logps, None, advantages, mask, loss_type="grpo", **EPS)
    torch.testing.assert_close(loss, torch.tensor([[-1.5, -1.5], [0.5, 0.5]]))
    loss.sum().backward()  # d/dlogp of -r·A with r = exp(logp - sg(logp)) = 1 is -A
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.5, -1.5], [0.5, 0.5]]))


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[0.5, 1.1, 1.5]]))  # ratios 0.5, 1.1, 1.5
    up = policy_per_token_loss(logps, old, torch.tensor([2.0]), torch.ones(1, 3), loss_type="dapo", **EPS)
    # A > 0: -min(r·A, clip(r, 0.8, 1.28)·A) = -A·min(r, clip(r))
    torch.testing.assert_close(up, torch.tensor([[-1.0, -2.2, -2.56]]))
    down = policy_per_token_loss(logps, old, torch.tensor([-2.0]), torch.ones(1, 3), loss_type="dapo", **EPS)
    # A < 0: -A·max(r, clip(r))
    torch.testing.assert_close(down, torch.tensor([[1.6, 2.2, 3.0]]))
    capped = policy_per_token_loss(logps, old, torch.tensor([-2.0]), torch.ones(1, 3), loss_type="dapo",
                                   delta=1.2, **EPS)
    torch.testing.assert_close(capped, torch.tensor([[1.6, 2.2, 2.56]]))  # r capped at delta=1.2, clip 1.28 wins


def test_cispo_weight_is_detached_and_capped():
    old = torch.zeros(1, 2)
    logps = torch.log(torch.tensor([[0.5, 2.0]])).requires_grad_()
    loss = policy_per_token_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 2), loss_type="cispo",
                                 epsilon_low=0.2, epsilon_high=1.5)
    torch.testing.assert_close(loss, -torch.tensor([[0.5, 1.5]]) * logps.detach())
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, -torch.tensor([[0.5, 1.5]]))


def test_sequence_level_ratio_uses_the_masked_mean_log_ratio():
    old = torch.zeros(1, 3)
    logps = torch.tensor([[0.1, 0.3, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = policy_per_token_loss(logps, old, torch.tensor([1.0]), mask, loss_type="grpo",
                                 importance_sampling_level="sequence", epsilon_low=0.5, epsilon_high=0.5)
    assert loss.shape == (1, 1)
    torch.testing.assert_close(loss, torch.tensor([[-math.exp(0.2)]]))


def test_rollout_ratio_and_kl_term():
    logps = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    loss = policy_per_token_loss(logps, None, torch.tensor([1.0]), torch.ones(1, 2), loss_type="bnpo",
                                 rollout_ratio=torch.tensor([[0.5, 2.0]]), ref_per_token_logps=ref, beta=0.1, **EPS)
    gap = ref - logps
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -2.0]]) + 0.1 * (gap.exp() - gap - 1))
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        policy_per_token_loss(logps, None, torch.tensor([1.0]), torch.ones(1, 2), loss_type="bnpo", beta=0.1, **EPS)


def test_unsupported_loss_type_and_level_are_named():
    args = (torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="loss_type"):
        policy_per_token_loss(*args, loss_type="sapo", **EPS)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_per_token_loss(*args, loss_type="grpo", importance_sampling_level="batch", **EPS)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(("loss_type", "expected"), [
    ("grpo", (1.5 + 5.0 + 7.0) / 3),
    ("luspo", (3.0 + 15.0 + 7.0) / 3),
    ("bnpo", 25.0 / 6),
    ("dr_grpo", 25.0 / (3 * 4)),
    ("dapo", 25.0 / 10),
    ("cispo", 25.0 / 10),
])
def test_aggregation_by_hand(loss_type, expected):
    value = aggregate_policy_loss(PER_TOKEN, MASK, loss_type=loss_type, max_completion_length=4, num_items=10.0)
    assert value.item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ["grpo", "luspo", "bnpo", "dr_grpo", "dapo"])
def test_selected_rows_keep_their_plain_grpo_share(loss_type):
    """Rows split into disjoint selections add up to the whole: a row's share does not depend on the others."""
    options = {"loss_type": loss_type, "max_completion_length": 4, "num_items": 10.0}
    whole = aggregate_policy_loss(PER_TOKEN, MASK, **options)
    parts = [aggregate_policy_loss(PER_TOKEN, MASK, rows=torch.tensor(rows), **options)
             for rows in ([1.0, 0.0, 1.0], [0.0, 1.0, 0.0])]
    torch.testing.assert_close(parts[0] + parts[1], whole)
    middle_row = aggregate_policy_loss(PER_TOKEN, MASK, rows=torch.tensor([0.0, 1.0, 0.0]), **options)
    assert middle_row.item() == pytest.approx(
        {"grpo": 5.0 / 3, "luspo": 5.0, "bnpo": 15.0 / 6, "dr_grpo": 15.0 / 12, "dapo": 1.5}[loss_type])


def test_aggregation_needs_its_normaliser():
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_policy_loss(PER_TOKEN, MASK, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="num_items"):
        aggregate_policy_loss(PER_TOKEN, MASK, loss_type="dapo")
    with pytest.raises(ValueError, match="do not match"):
        aggregate_policy_loss(PER_TOKEN, MASK[:2], loss_type="grpo")


def test_routing_table():
    # rows: success with teacher, success without, failure with teacher, failure without
    policy, distill = route_rows(torch.tensor([True, True, False, False]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert policy.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert distill.tolist() == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="success"):
        route_rows(torch.tensor([True]), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sampled_token_logps_from_hidden_match_the_logits_version(chunk_size, with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 6, generator=generator, requires_grad=True)
    weight = torch.randn(11, 6, generator=generator, requires_grad=True)
    bias = torch.randn(11, generator=generator, requires_grad=True) if with_bias else None
    ids = torch.randint(0, 11, (2, 5), generator=generator)
    upstream = torch.randn(2, 5, generator=generator)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    expected = sampled_token_logps(F.linear(hidden, weight, bias) / 0.7, ids)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    got = sampled_token_logps_from_hidden(hidden, weight, bias, ids, temperature=0.7, chunk_size=chunk_size)
    grads = torch.autograd.grad((got * upstream).sum(), inputs)
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    with pytest.raises(ValueError, match="token ids"):
        sampled_token_logps_from_hidden(hidden, weight, bias, ids[:, :2])

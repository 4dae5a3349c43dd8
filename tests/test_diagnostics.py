"""`sdpo_core.diagnostics` and the teacher-drift sample against hand-computed and brute-force references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sdpo_core.diagnostics import (
    copy_overlap,
    entropy_change_rate,
    entropy_collapsed,
    entropy_surged,
    finite_values,
    kind_masks,
    lengths_pinned,
    longest_common_substring,
    masked_totals,
    relative_l2_distance,
    reward_fell,
    tail_masses,
    totals_to_means,
)
from sdpo_core.loss import per_token_distillation_loss
from sdpo_core.teacher_drift import ParameterSample


# ------------------------------------------------------------------------------------------ token statistics
def test_kind_masks_split_the_trained_tokens_by_row():
    trained = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 2 has no teacher
    masks = kind_masks(trained, torch.tensor([1.0, 0.0, 0.0]))
    assert masks["trained"].tolist() == trained.tolist()
    assert masks["demo"].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert masks["feedback"].tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0]]


def test_kind_masks_reject_a_row_count_mismatch():
    with pytest.raises(ValueError, match="one entry per row"):
        kind_masks(torch.ones(3, 2), torch.ones(2))


def test_masked_totals_and_means_by_hand():
    values = [torch.tensor([[1.0, 2.0, float("nan")], [4.0, 8.0, float("inf")]]), torch.ones(2, 3)]
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    totals = masked_totals(values, mask)
    assert totals.tolist() == [1 + 2 + 8, 3, 3]  # NaN and inf sit at masked positions
    assert totals_to_means(totals, ["a", "b"]) == {"a": pytest.approx(11 / 3), "b": 1.0}


def test_means_of_summed_process_totals_are_the_global_token_mean():
    """Summing each process's totals, then dividing once, weighs every token equally (not every process)."""
    a, b = torch.tensor([[2.0, 4.0]]), torch.tensor([[10.0, 0.0]])
    mask_a, mask_b = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    summed = masked_totals([a], mask_a) + masked_totals([b], mask_b)
    assert totals_to_means(summed, ["x"])["x"] == pytest.approx((2 + 4 + 10) / 3)


def test_means_are_nan_without_tokens():
    means = totals_to_means(masked_totals([torch.ones(2, 2)], torch.zeros(2, 2)), ["x"])
    assert math.isnan(means["x"])
    with pytest.raises(ValueError, match="expected 2 totals"):
        totals_to_means(torch.zeros(3), ["x"])


# ------------------------------------------------------------------------------------------ copying
def brute_force_lcs(a: str, b: str) -> int:
    return max((j - i for i in range(len(a)) for j in range(i + 1, len(a) + 1) if a[i:j] in b), default=0)


@pytest.mark.parametrize("seed", range(40))
def test_longest_common_substring_matches_brute_force(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abcd 1+="
    a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
    b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
    assert longest_common_substring(a, b) == brute_force_lcs(a, b)


def test_copy_overlap_by_hand():
    demo = "3 + 4 = 7. The answer is 7."
    assert copy_overlap("The answer is 7.", demo) == 1.0  # all of it occurs in the demonstration
    assert copy_overlap("The sum is 9", demo) == pytest.approx(len("The ") / len("The sum is 9"))
    assert copy_overlap("xyz", demo) == 0.0
    assert copy_overlap("", demo) == 0.0


def test_copy_overlap_is_linear_on_long_texts():
    text = "def solve(n):\n    return sum(range(n))\n" * 300  # 12k characters: a quadratic table would be 1.4e8 cells
    assert copy_overlap(text, text) == 1.0
    assert copy_overlap(text + "#", text) == pytest.approx(len(text) / (len(text) + 1))


# ------------------------------------------------------------------------------------------ drift
def test_relative_l2_distance_by_hand():
    reference = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]  # norm 5
    moved = [torch.tensor([3.0, 3.0]), torch.tensor([[0.0]])]  # difference (0, 3, -4): norm 5
    assert relative_l2_distance(moved, reference) == pytest.approx(1.0)
    assert relative_l2_distance(reference, reference) == 0.0
    assert math.isnan(relative_l2_distance([torch.ones(1)], [torch.zeros(1)]))
    with pytest.raises(ValueError, match="shape"):
        relative_l2_distance([torch.ones(2)], [torch.ones(3)])


def test_parameter_sample_is_exact_when_every_coordinate_fits():
    tensors = [torch.randn(3, 4), torch.randn(5)]
    sample = ParameterSample(tensors, size=100)
    initial = [t.clone() for t in tensors]
    for t in tensors:
        t.add_(torch.randn_like(t))
    assert sample.relative_drift(tensors) == pytest.approx(relative_l2_distance(tensors, initial))


def test_parameter_sample_estimates_the_drift_of_large_tensors():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(400, 500, generator=generator), torch.randn(100_000, generator=generator)]
    sample = ParameterSample(tensors, size=20_000)
    assert sum(index.numel() for index in sample.indices) == 20_000
    initial = [t.clone() for t in tensors]
    for t in tensors:
        t.add_(0.1 * torch.randn(t.shape, generator=generator))
    assert sample.relative_drift(tensors) == pytest.approx(relative_l2_distance(tensors, initial), rel=0.05)


# ------------------------------------------------------------------------------------------ the tail bucket
def test_tail_masses_by_hand():
    student = torch.tensor([0.5, 0.3, 0.1, 0.1]).log()
    teacher = torch.tensor([0.2, 0.2, 0.3, 0.3]).log()
    student_tail, teacher_tail = tail_masses(student, teacher, k=2)  # the student's top-2: tokens 0 and 1
    assert student_tail.item() == pytest.approx(0.2)
    assert teacher_tail.item() == pytest.approx(0.6)  # the teacher's own top-2 would leave only 0.4 outside


def test_tail_masses_reject_mismatched_logits_and_a_k_outside_the_vocabulary():
    with pytest.raises(ValueError, match="same shape"):
        tail_masses(torch.zeros(2, 5), torch.zeros(2, 6), k=2)
    with pytest.raises(ValueError, match="k must be in"):
        tail_masses(torch.zeros(2, 5), torch.zeros(2, 5), k=6)


def _seed_divergence(teacher_logits, *, topk=3, add_tail=True, alpha=0.5):
    return lambda logits: per_token_distillation_loss(logits, teacher_logits, alpha=alpha, topk=topk,
                                                      add_tail=add_tail)


def _entropy(logits):
    logps = torch.log_softmax(logits.double(), dim=-1)
    return -(logps.exp() * logps).sum(-1)


def test_entropy_change_rate_is_the_derivative_of_the_entropy_along_a_descent_step():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10) * 2, torch.randn(6, 10) * 2
    loss = _seed_divergence(teacher)
    logits = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(logits).sum(), logits)
    step = 1e-3
    finite_difference = (_entropy(student - step * grad) - _entropy(student + step * grad)) / (2 * step)
    torch.testing.assert_close(entropy_change_rate(student, loss).double(), finite_difference, rtol=1e-2,
                               atol=1e-5)


def test_a_teacher_with_more_mass_outside_the_students_top_k_flattens_the_student_only_through_the_tail():
    """The teacher agrees with the student on the top-3 up to scale, but keeps 30 % outside them where the
    student keeps about 6 %: the tail bucket pulls the student's whole tail up, the renormalised top-3 sees
    no difference at all."""
    student = torch.tensor([[4.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    top = torch.softmax(student[0, :3], dim=-1) * 0.7
    teacher = torch.cat([top, torch.full((5,), 0.3 / 5)]).log()[None]
    student_tail, teacher_tail = tail_masses(student, teacher, k=3)
    assert student_tail.item() < 0.06
    assert teacher_tail.item() == pytest.approx(0.3)
    assert entropy_change_rate(student, _seed_divergence(teacher, add_tail=True)).item() > 1e-3
    assert entropy_change_rate(student, _seed_divergence(teacher, add_tail=False)).item() == pytest.approx(0.0,
                                                                                                          abs=1e-7)


def test_a_teacher_equal_to_the_student_does_not_move_its_entropy():
    student = torch.randn(4, 9)
    for add_tail in (True, False):
        rate = entropy_change_rate(student, _seed_divergence(student, add_tail=add_tail))
        torch.testing.assert_close(rate, torch.zeros(4), atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------ collapse signatures
def test_finite_values_skip_undefined_steps():
    assert finite_values([1.0, None, float("nan"), 2.0]) == [1.0, 2.0]


def test_entropy_collapse_below_the_floor():
    assert entropy_collapsed([0.05] * 4, floor=0.1, drop_fraction=0.8, early_steps=5, recent_steps=5) is None
    message = entropy_collapsed([0.05] * 5, floor=0.1, drop_fraction=0.8, early_steps=5, recent_steps=5)
    assert "below the floor 0.1" in message


def test_entropy_collapse_by_a_fraction_of_its_early_level():
    history = [2.0] * 5 + [1.0] * 5 + [0.39] * 5  # early mean 2.0, recent 0.39: fell by 80.5%
    assert "by 80%" in entropy_collapsed(history, floor=0.1, drop_fraction=0.8, early_steps=5, recent_steps=5)
    halved = [2.0] * 5 + [1.0] * 5  # GRPO's healthy halving on the demo is no collapse
    assert entropy_collapsed(halved, floor=0.1, drop_fraction=0.8, early_steps=5, recent_steps=5) is None
    short = [2.0] * 5 + [0.3] * 4  # the windows would overlap
    assert entropy_collapsed(short, floor=0.1, drop_fraction=0.8, early_steps=5, recent_steps=5) is None


def test_entropy_surge():
    history = [2.0, None, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0]  # +50%
    assert "by 50%" in entropy_surged(history, rise_fraction=0.5, early_steps=5, recent_steps=5)
    assert entropy_surged(history, rise_fraction=0.6, early_steps=5, recent_steps=5) is None


def test_lengths_pinned_needs_every_one_of_the_last_steps():
    assert lengths_pinned([0.0, 0.6, 0.7, 0.5], level=0.5, steps=3) is not None
    assert lengths_pinned([0.6, 0.7, 0.4, 0.9], level=0.5, steps=3) is None
    assert lengths_pinned([0.9, 0.9], level=0.5, steps=3) is None


def test_reward_fall_from_its_running_peak():
    # 2-step means: 0.3, 0.5, 0.6, 0.4, 0.25 -> peak 0.6, now 0.25
    rewards = [0.2, 0.4, 0.6, 0.6, 0.2, 0.3]
    assert "0.35 below its running peak 0.6" in reward_fell(rewards, margin=0.3, window=2)
    assert reward_fell(rewards, margin=0.4, window=2) is None
    assert reward_fell([0.9, 0.0, 0.9, 0.0], margin=0.5, window=2) is None  # noise, not a fall

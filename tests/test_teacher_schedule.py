"""The teacher's EMA-rate schedule and periodic reset, as pure functions of the position in training."""

from __future__ import annotations

import math

import pytest

from sdpo_core.teacher_schedule import generation_batches, reset_due, scheduled_rate


def test_constant_schedule_ignores_the_position():
    assert [scheduled_rate(0.05, None, "constant", i, 10) for i in (0, 5, 20)] == [0.05] * 3


def test_linear_schedule_from_first_to_last_update():
    rates = [scheduled_rate(0.5, 0.1, "linear", i, 5) for i in range(5)]
    assert rates == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    assert scheduled_rate(0.5, 0.1, "linear", 9, 5) == pytest.approx(0.1)  # past the planned end: stays final


def test_cosine_schedule_by_hand():
    rates = [scheduled_rate(0.5, 0.1, "cosine", i, 5) for i in range(5)]
    expected = [0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    assert rates == pytest.approx(expected)
    assert (rates[0], rates[2], rates[4]) == pytest.approx((0.5, 0.3, 0.1))


def test_single_update_run_uses_the_final_rate():
    assert scheduled_rate(0.5, 0.1, "linear", 0, 1) == pytest.approx(0.1)


def test_schedule_errors_name_the_problem():
    with pytest.raises(ValueError, match="schedule"):
        scheduled_rate(0.5, 0.1, "step", 0, 4)
    with pytest.raises(ValueError, match="final rate"):
        scheduled_rate(0.5, None, "linear", 0, 4)
    with pytest.raises(ValueError, match="update_index"):
        scheduled_rate(0.5, 0.1, "linear", -1, 4)


def test_reset_is_due_on_multiples_only():
    assert [g for g in range(0, 10) if reset_due(g, 3)] == [3, 6, 9]
    assert not any(reset_due(g, None) for g in range(10))


@pytest.mark.parametrize(("args", "expected"), [
    ((30, 1, 1, 1), 30),   # the demo: one generation batch per optimizer step
    ((10, 4, 4, 1), 10),   # steps_per_generation = gradient accumulation
    ((10, 2, 4, 1), 5),    # one generation serves two optimizer steps
    ((10, 2, 2, 2), 5),    # num_iterations reuses each batch twice
    ((1, 1, 4, 1), 1),     # at least one
])
def test_generation_batches(args, expected):
    assert generation_batches(*args) == expected

"""`sdpo_core.app.evaluation`: pass@k against hand computations, scoring with a toy environment, batched generation."""

from __future__ import annotations

import math

import pytest

from sdpo_core.app.evaluation import (
    EvalResult,
    evaluate_model,
    generate_completions,
    pass_at_k,
    score_completions,
)
from sdpo_envs.testing import FakeEnvironment


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (5, 2, 4, 1.0),  # fewer than k failures: some draw of 4 always holds a success
        (5, 0, 3, 0.0),
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    ],
)
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(2, 3, 1)


TASKS = [{"prompt": [{"role": "user", "content": f"Say {w}"}], "answer": w} for w in ("cat", "dog", "owl")]
COMPLETIONS = [
    ["a cat", "no", "cat!", "dogs"],  # 2 of 4 solved
    ["nothing", "nope", "still no", "no"],  # 0 of 4
    ["owl", "owl", "owl", "owl"],  # 4 of 4
]


def test_score_completions_by_hand():
    result = score_completions(FakeEnvironment(), TASKS, COMPLETIONS, ks=(1, 2))
    assert result.num_tasks == 3
    assert result.num_samples == 4
    # pass@1 = mean of c/n; pass@2 = mean of 1 - C(n-c,2)/C(n,2) = (1 - 1/6, 0, 1) / 3
    assert result.pass_at_k[1] == pytest.approx((2 / 4 + 0 + 1) / 3)
    assert result.pass_at_k[2] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert result.mean_reward == pytest.approx(6 / 12)
    assert result.success_rate == pytest.approx(6 / 12)
    assert result.abstained == 0


def test_samples_show_failures_with_feedback_first():
    result = score_completions(FakeEnvironment(), TASKS, COMPLETIONS, show=2)
    assert len(result.samples) == 2
    assert all(not s.success and s.feedback for s in result.samples)
    assert result.samples[0].prompt == "Say cat"


def test_success_threshold_overrides_the_environment_flag():
    class HalfCredit(FakeEnvironment):
        def score(self, task, completion):
            feedback = super().score(task, completion)
            reward = 0.5 if feedback.success else 0.0
            return type(feedback)(reward=reward, text=feedback.text, success=feedback.success)

    env = HalfCredit()
    assert score_completions(env, TASKS, COMPLETIONS).success_rate == pytest.approx(0.5)
    assert score_completions(env, TASKS, COMPLETIONS, success_threshold=1.0).success_rate == 0.0
    assert score_completions(env, TASKS, COMPLETIONS, success_threshold=0.5).success_rate == pytest.approx(0.5)


def test_k_larger_than_samples_is_an_error():
    with pytest.raises(ValueError, match="k=8"):
        score_completions(FakeEnvironment(), TASKS, COMPLETIONS, ks=(8,))


def test_result_round_trips_through_json_dict():
    result = score_completions(FakeEnvironment(), TASKS, COMPLETIONS, ks=(1, 4))
    again = EvalResult.from_dict(result.to_dict())
    assert again == result
    assert again.samples == result.samples


def test_batched_greedy_generation_equals_one_prompt_at_a_time(model, tokenizer):
    prompts = [t["prompt"] for t in TASKS] + ["plain text prompt"]
    batched = generate_completions(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    single = generate_completions(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single
    assert all(len(per_prompt) == 1 for per_prompt in batched)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, tokenizer):
    import torch

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = generate_completions(model, tokenizer, ["hi"], num_samples=3, temperature=1.0, max_new_tokens=5, seed=7)
    assert torch.rand(1) == expected_next
    again = generate_completions(model, tokenizer, ["hi"], num_samples=3, temperature=1.0, max_new_tokens=5, seed=7)
    assert first == again
    assert len(first[0]) == 3


def test_greedy_with_several_samples_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        generate_completions(model, tokenizer, ["hi"], num_samples=2, temperature=0.0)


def test_evaluate_model_end_to_end(model, tokenizer):
    was_training = model.training
    result = evaluate_model(model, tokenizer, FakeEnvironment(), TASKS, k=[1, 2], max_new_tokens=4, batch_size=2)
    assert result.num_samples == 2  # defaults to the largest k, sampled
    assert set(result.pass_at_k) == {1, 2}
    assert not math.isnan(result.mean_reward)
    assert model.training == was_training

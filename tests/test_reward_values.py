"""What a reward value may be: a finite float or None, one rule (`sdpo_envs.check_rewards`) wherever rewards pass."""

from __future__ import annotations

import asyncio
import math
from fractions import Fraction

import pytest

from sdpo_core import SDPOTrainer
from sdpo_core.reward_contract import validated_reward_function
from sdpo_envs import Environment, Feedback, InvalidResultError, check_reward, check_rewards


def test_valid_rewards_are_floats_or_none():
    assert check_rewards("f", [1, 0.5, None, -2.0, Fraction(3, 4)], 5) == [1.0, 0.5, None, -2.0, 0.75]
    assert all(type(r) is float for r in check_rewards("f", [1, 2], 2))
    assert check_reward(None, name="f", row=0) is None


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, float("nan")])
def test_non_finite_rewards_name_the_function_and_row(bad):
    with pytest.raises(InvalidResultError, match=r"reward function 'my_reward' returned -?(inf|nan) for row 2; "
                                                 r"rewards must be finite \(None abstains\)"):
        check_rewards("my_reward", [0.0, None, bad], 3)
    assert issubclass(InvalidResultError, ValueError)


@pytest.mark.parametrize(("rewards", "message"), [
    ([True], r"returned True \(bool\) for row 0; expected a float or None"),
    (["1"], r"returned '1' \(str\) for row 0"),
    ("1", r"returned str, expected a list of floats"),
    ([1.0, 2.0], r"returned 2 rewards for 1 completions"),
])
def test_malformed_outputs(rewards, message):
    with pytest.raises(InvalidResultError, match=r"reward function 'f' " + message):
        check_rewards("f", rewards, 1)


def test_the_trainer_wrapper_rejects_non_finite_rewards_sync_and_async():
    def infinite(prompts, completions, **kwargs):
        return [1.0, math.inf]

    async def not_a_number(prompts, completions, **kwargs):
        return [math.nan, 1.0]

    with pytest.raises(ValueError, match=r"'infinite' returned inf for row 1"):
        validated_reward_function(infinite)(prompts=["p", "q"], completions=["a", "b"])
    with pytest.raises(ValueError, match=r"'not_a_number' returned nan for row 0"):
        asyncio.run(validated_reward_function(not_a_number)(prompts=["p", "q"], completions=["a", "b"]))
    assert validated_reward_function(infinite).__name__ == "infinite"


def test_an_environment_abstains_with_none_and_cannot_report_nan():
    class Judge(Environment):
        name = "judge"
        error_reward = None

        def score(self, task, completion):
            if completion == "abstain":
                return Feedback(reward=None, text="")
            return Feedback(reward=math.nan if completion == "nan" else 1.0)

    env = Judge()
    assert env(prompts=["p"] * 3, completions=["ok", "abstain", "nan"]) == [1.0, None, None]
    assert env.error_count == 1  # only the NaN row: a failed episode with its reason, never a NaN reward
    assert "NaN" in env.last_results[2].details["error"]
    assert "error" not in env.last_results[1].details


def test_a_training_step_stops_on_an_infinite_reward(model, tokenizer, chat_dataset, make_args):
    def unbounded(prompts, completions, **kwargs):
        return [math.inf if row == 1 else 0.0 for row in range(len(completions))]

    trainer = SDPOTrainer(model=model, reward_funcs=[unbounded], args=make_args(max_steps=1),
                          train_dataset=chat_dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"'unbounded' returned inf for row 1; rewards must be finite"):
        trainer.train()

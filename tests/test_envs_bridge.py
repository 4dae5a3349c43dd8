"""Environments as TRL reward functions: the call contract, the feedback attributes, a real GRPOTrainer step."""

from __future__ import annotations

import pytest
import sdpo_reward
from datasets import Dataset

from sdpo_envs import Environment, Feedback, make
from sdpo_envs.feedback_channel import completion_text, tasks_from_columns
from sdpo_envs.testing import FakeEnvironment, registered_plugin


class RecordingEnv(Environment):
    name = "recording"

    def __init__(self):
        self.extras = []

    def score_batch(self, tasks, completions, *, extra, max_workers, timeout):
        self.extras.append(dict(extra))
        return [Feedback(reward=float(t["answer"] in completion_text(c)), text=f"row {t['answer']}")
                for t, c in zip(tasks, completions, strict=True)]

    def score(self, task, completion):
        raise AssertionError("not used")


def test_call_contract_and_feedback_attributes():
    env = FakeEnvironment()
    assert env.__name__ == "FakeEnvironment"
    env.name = "fake"
    assert env.__name__ == "fake"
    assert FakeEnvironment.__name__ == "FakeEnvironment"
    rewards = env(prompts=["p1", "p2"], completions=["it is 4", "no"], completion_ids=[[1], [2]],
                  answer=["4", "5"], trainer_state=object(), log_metric=print, log_extra=print)
    assert rewards == [1.0, 0.0]
    assert env.last_feedback == ["", "The completion does not contain the answer (1 characters)."]
    assert [r.success for r in env.last_results] == [True, False]


def test_dataset_columns_become_tasks_and_trainer_kwargs_extra():
    env = RecordingEnv()
    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [[{"role": "assistant", "content": "a7"}], [{"role": "assistant", "content": "b"}]]
    assert env(prompts=prompts, completions=completions, completion_ids=[[1], [2]], answer=["7", "8"],
               trainer_state="state") == [1.0, 0.0]
    assert env.extras == [{"completion_ids": [[1], [2]], "trainer_state": "state"}]
    assert env.last_feedback == ["row 7", "row 8"]


def test_tasks_from_columns_validates_lengths():
    assert tasks_from_columns(["p"], {"a": [1], "trainer_state": 0}) == [{"a": 1, "prompt": "p"}]
    with pytest.raises(ValueError, match="column 'a' has 1 values for 2 prompts"):
        tasks_from_columns(["p", "q"], {"a": [1]})


def test_last_feedback_is_reset_when_a_call_fails():
    env = RecordingEnv()
    env(prompts=["p"], completions=["7"], answer=["7"])
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        env(prompts=["p"], completions=["7", "8"], answer=["7"])
    assert env.last_feedback is None
    assert env.last_results is None


def test_completion_text_shapes():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                            {"role": "tool", "content": "ignored"}, {"content": "b"}]) == "ab"
    with pytest.raises(TypeError):
        completion_text(3)  # type: ignore[arg-type]


@pytest.fixture
def reward_plugin():
    with registered_plugin(sdpo_reward):
        yield


def contains_answer(prompts, completions, answer, **kwargs):
    return [1.0 if a in completion_text(c) else 0.0 for a, c in zip(answer, completions, strict=True)]


def test_plain_grpo_trainer_accepts_an_environment(reward_plugin, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from sdpo_core.testing import tiny_model, tiny_tokenizer

    env = make("reward", fn=contains_answer)
    assert env.__name__ == "contains_answer"
    tokenizer = tiny_tokenizer()
    dataset = Dataset.from_dict({"prompt": ["What is 2 + 3?", "What is 1 + 1?", "What is 4 + 4?"],
                                 "answer": ["5", "2", "8"]})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, num_generations=3,
                      max_completion_length=8, max_steps=1, report_to="none", use_cpu=True, logging_steps=1,
                      save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(model=tiny_model(tokenizer), reward_funcs=[env], args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    assert env.last_feedback is not None
    assert len(env.last_feedback) == 3
    assert all(isinstance(r, Feedback) for r in env.last_results)
    logged = [entry for entry in trainer.state.log_history if "rewards/contains_answer/mean" in entry]
    assert logged

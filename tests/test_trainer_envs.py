"""Environments as SDPO reward functions: feedback reaches the teacher through the same path."""

from __future__ import annotations

from sdpo_core import SDPOConfig, SDPOTrainer
from sdpo_envs import Environment, Feedback


class AnswerEnv(Environment):
    """Success iff the completion contains the row's answer; feedback names the expected answer."""

    name = "answer"

    def score(self, task, completion):
        if task["answer"] in completion:
            return Feedback(reward=1.0, success=True)
        return Feedback(reward=0.0, text=f"ENV-FEEDBACK expected {task['answer']}")


def test_environment_feedback_reaches_teacher_prompt(model, tokenizer, chat_dataset, make_args):
    env = AnswerEnv()
    trainer = SDPOTrainer(model=model, reward_funcs=[env], args=make_args(max_steps=1), train_dataset=chat_dataset,
                          processing_class=tokenizer, sdpo_config=SDPOConfig())
    batches = []
    original = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: batches.append(original(inputs)) or batches[-1]
    trainer.train()
    batch = batches[0]
    assert env.last_results is not None
    assert len(env.last_results) == 4
    for row in range(4):
        if env.last_results[row].success:
            continue
        teacher = tokenizer.decode(batch["teacher_prompt_ids"][row][batch["teacher_prompt_mask"][row].bool()])
        assert "ENV-FEEDBACK expected 5" in teacher
        assert "The following is feedback from your unsuccessful earlier attempt" in teacher

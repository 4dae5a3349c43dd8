"""The shipped math and code environments inside real SDPOTrainer steps on a tiny model.

The plugins are registered directly (tests never load installed plugins) and built by name through the
registry, as a user's config would; their feedback must reach the teacher prompts of failed samples.
"""

from __future__ import annotations

import pytest
from datasets import Dataset

from sdpo_core import SDPOConfig, SDPOTrainer
from sdpo_envs import MultiEnvironment, make
from sdpo_envs.testing import registered_plugin

sdpo_math = pytest.importorskip("sdpo_math")
sdpo_code = pytest.importorskip("sdpo_code")


def _teacher_texts(trainer, tokenizer):
    batches = []
    original = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: batches.append(original(inputs)) or batches[-1]
    trainer.train()
    batch = batches[0]
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in
            zip(batch["teacher_prompt_ids"], batch["teacher_prompt_mask"], strict=True)], batch


def test_math_environment_feedback_reaches_teacher(model, tokenizer, make_args):
    with registered_plugin(sdpo_math, "math"):
        env = make("math", checker="inline")
        dataset = sdpo_math.generate_problems(8, difficulty=0, seed=0)
        trainer = SDPOTrainer(model=model, reward_funcs=[env], args=make_args(max_steps=1),
                              train_dataset=dataset, processing_class=tokenizer, sdpo_config=SDPOConfig())
        texts, batch = _teacher_texts(trainer, tokenizer)
    verdicts = [r.details["verdict"] for r in env.last_results]
    assert all(v != "correct" for v in verdicts)  # a random tiny model never answers
    for text, result in zip(texts, env.last_results, strict=True):
        assert result.text.strip()
        assert result.text.strip()[:40] in text
    assert batch["sd_mask"].sum() == 4


def test_code_environment_feedback_reaches_teacher(model, tokenizer, make_args):
    with registered_plugin(sdpo_code, "code"):
        env = make("code", backend="process", time_limit=1.0)
        rows = sdpo_code.load_bundled()[:4]
        dataset = Dataset.from_list(rows)
        trainer = SDPOTrainer(model=model, reward_funcs=[env], args=make_args(max_steps=1),
                              train_dataset=dataset, processing_class=tokenizer, sdpo_config=SDPOConfig())
        texts, batch = _teacher_texts(trainer, tokenizer)
    assert batch["sd_mask"].sum() == 4
    for text, result in zip(texts, env.last_results, strict=True):
        assert result.reward == 0.0
        assert "python" in result.text  # "Incorrect Format: put your code in a ```python block" or similar
        assert result.text.strip()[:40] in text


def test_multi_task_rows_route_by_env_column(model, tokenizer, make_args):
    with registered_plugin(sdpo_math, "math"):
        router = MultiEnvironment({"math": make("math", checker="inline"), "other": make("math", checker="inline")})
        dataset = sdpo_math.generate_problems(8, difficulty=0, seed=1).add_column("env", ["math", "other"] * 4)
        trainer = SDPOTrainer(model=model, reward_funcs=[router], args=make_args(max_steps=1),
                              train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        assert len(router.last_results) == 4
        bad = dataset.map(lambda row: {"env": "nope"})
        trainer = SDPOTrainer(model=model, reward_funcs=[router], args=make_args(max_steps=1),
                              train_dataset=bad, processing_class=tokenizer)
        with pytest.raises(Exception, match="unknown environment 'nope'"):
            trainer.train()

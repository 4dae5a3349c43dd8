"""The per-step diagnostics of `SDPOTrainer` on a tiny model: what is logged, and that it means what it says."""

from __future__ import annotations

import math

import pytest
import torch
from trl import GRPOTrainer

from sdpo_core import SDPOConfig, SDPOTrainer
from sdpo_core.diagnostics import relative_l2_distance
from sdpo_core.testing import tiny_model

DIAGNOSTICS = [
    "entropy", "grad_norm", "completions/clipped_ratio", "completions/mean_length",
    "sdpo/teacher_entropy", "sdpo/student_entropy_trained", "sdpo/student_logp_under_student",
    "sdpo/student_logp_under_teacher", "sdpo/divergence", "sdpo/teacher_student_kl",
    *(f"sdpo/{kind}/{name}" for kind in ("demo", "feedback") for name in (
        "teacher_entropy", "student_entropy", "student_logp_under_student", "student_logp_under_teacher",
        "divergence")),
    "sdpo/demo_copy_overlap", "sdpo/teacher_drift", "sdpo/demo_row_fraction", "sdpo/feedback_row_fraction",
]


def _two_kinds_trainer(tokenizer, chat_dataset, make_args, feedback_reward, **args):
    """Batches of two groups of 4: the first has successes (its failures get a demonstration), the second
    none (feedback only)."""
    reward = feedback_reward(succeed=lambda row: row % 8 in (0, 1))
    return SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[reward],
                       args=make_args(per_device_train_batch_size=8, **args), train_dataset=chat_dataset,
                       processing_class=tokenizer, sdpo_config=SDPOConfig(distillation_topk=7))


def test_every_diagnostic_is_logged_each_step_and_finite(tokenizer, chat_dataset, make_args, feedback_reward):
    trainer = _two_kinds_trainer(tokenizer, chat_dataset, make_args, feedback_reward)
    initial = [p.detach().clone() for p in trainer.teacher.module.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "train_runtime" not in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in DIAGNOSTICS:
            assert isinstance(entry.get(key), float), (entry["step"], key)
            assert math.isfinite(entry[key]), (entry["step"], key)
        assert entry["sdpo/demo_row_fraction"] == 0.5  # rows 0 and 1 demonstrate to each other and to 2 and 3
        assert entry["sdpo/feedback_row_fraction"] == 0.5
        assert 0.0 <= entry["sdpo/demo_copy_overlap"] <= 1.0
    # the tiny model has fewer coordinates than the sample: the drift is exact, and the EMA moves it
    current = list(trainer.teacher.module.parameters())
    assert logs[-1]["sdpo/teacher_drift"] == pytest.approx(relative_l2_distance(current, initial), rel=1e-6)
    assert 0.0 < logs[0]["sdpo/teacher_drift"] < logs[1]["sdpo/teacher_drift"]


def test_frozen_teacher_logs_no_drift(model, tokenizer, chat_dataset, make_args, feedback_reward):
    trainer = SDPOTrainer(model=model, reward_funcs=[feedback_reward()], args=make_args(max_steps=1),
                          train_dataset=chat_dataset, processing_class=tokenizer,
                          sdpo_config=SDPOConfig(teacher_mode="frozen"))
    trainer.train()
    assert "sdpo/teacher_drift" not in trainer.state.log_history[0]


def _reference_statistics(trainer, batch):
    """Float64 token statistics from full logits of both models, computed here without the trainer's code."""
    completion = batch["completion_ids"]
    width = completion.size(1)

    def logps(module, prompt_key):
        ids = torch.cat([batch[f"{prompt_key}_ids"], completion], dim=1)
        mask = torch.cat([batch[f"{prompt_key}_mask"], batch["completion_mask"]], dim=1)
        with torch.no_grad():
            logits = module(input_ids=ids, attention_mask=mask).logits[:, -width - 1:-1, :]
        return torch.log_softmax(logits.double() / trainer.temperature, dim=-1)  # [B, T, V]

    student, teacher = logps(trainer.model, "prompt"), logps(trainer.teacher.module, "teacher_prompt")

    def entropy(p):
        return -(p.exp() * p).sum(-1)

    def sampled(p):
        return p.gather(-1, completion.unsqueeze(-1)).squeeze(-1)

    return {"teacher_entropy": entropy(teacher), "student_entropy": entropy(student),
            "student_logp_under_student": sampled(student), "student_logp_under_teacher": sampled(teacher)}


def _masked_mean(values, mask):
    return float((values * mask).sum() / mask.sum())


@pytest.mark.parametrize("hidden", [True, False])
def test_token_statistics_match_full_logits_and_entropy_is_grpos(tokenizer, chat_dataset, make_args,
                                                                 feedback_reward, hidden):
    trainer = _two_kinds_trainer(tokenizer, chat_dataset, make_args, feedback_reward, temperature=0.7)
    trainer._hidden_state_path = hidden
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(8)])
    assert batch["sd_demo_mask"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    batch["sd_mask"][5] = 0.0  # a row without a teacher signal: the teacher skips it
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer._metrics["train"].clear()
    trainer._compute_loss(trainer.model, batch)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}

    reference = _reference_statistics(trainer, batch)
    completion_mask = batch["completion_mask"].double()
    trained = completion_mask * batch["sd_mask"].double().unsqueeze(1)
    demo = trained * batch["sd_demo_mask"].double().unsqueeze(1)
    feedback = trained - demo
    assert logged["entropy"] == pytest.approx(_masked_mean(reference["student_entropy"], completion_mask), rel=1e-5)
    overall = {"teacher_entropy": "sdpo/teacher_entropy", "student_entropy": "sdpo/student_entropy_trained",
               "student_logp_under_student": "sdpo/student_logp_under_student",
               "student_logp_under_teacher": "sdpo/student_logp_under_teacher"}
    for name, metric in overall.items():
        assert logged[metric] == pytest.approx(_masked_mean(reference[name], trained), rel=1e-5, abs=1e-6), metric
        assert logged[f"sdpo/demo/{name}"] == pytest.approx(_masked_mean(reference[name], demo), rel=1e-5, abs=1e-6)
        assert logged[f"sdpo/feedback/{name}"] == pytest.approx(_masked_mean(reference[name], feedback), rel=1e-5,
                                                                abs=1e-6)
    kl = reference["student_logp_under_student"] - reference["student_logp_under_teacher"]
    assert logged["sdpo/teacher_student_kl"] == pytest.approx(_masked_mean(kl, trained), rel=1e-5, abs=1e-6)

    # GRPO's own loss, on the same batch and weights, logs the same `entropy`
    trainer._metrics["train"].clear()
    GRPOTrainer._compute_loss(trainer, trainer.model, batch)
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(logged["entropy"], rel=1e-5)


def test_a_micro_batch_without_teacher_rows_logs_the_entropy_and_no_trained_token_statistics(
        tokenizer, chat_dataset, make_args, feedback_reward):
    """The `entropy` metric used to be 0 here; the trained-token means are undefined (NaN, logged as None)."""
    trainer = _two_kinds_trainer(tokenizer, chat_dataset, make_args, feedback_reward)
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(8)])
    batch["sd_mask"] = torch.zeros(8)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer._metrics["train"].clear()
    trainer._compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    assert metrics["entropy"][-1] > 0
    for key in ("sdpo/teacher_entropy", "sdpo/divergence", "sdpo/demo/teacher_entropy", "sdpo/feedback/divergence"):
        assert math.isnan(metrics[key][-1]), key
    trainer._metrics["train"].clear()
    GRPOTrainer._compute_loss(trainer, trainer.model, batch)
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(metrics["entropy"][-1], rel=1e-5)


def test_demo_copy_overlap_is_the_mean_over_rows_with_a_demonstration(model, tokenizer, chat_dataset, make_args,
                                                                      feedback_reward):
    trainer = SDPOTrainer(model=model, reward_funcs=[feedback_reward()], args=make_args(),
                          train_dataset=chat_dataset, processing_class=tokenizer)
    completions = ["The answer is 5.", "<think>hmm</think>The answer is 5.", "xyz"]
    assert trainer._demo_copy_overlap(completions, [1, None, 0]) == pytest.approx((1.0 + 0.0) / 2)  # think stripped
    assert math.isnan(trainer._demo_copy_overlap(completions, [None, None, None]))

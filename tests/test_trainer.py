"""SDPOTrainer on a tiny model: real TRL steps, the teacher strategies and the peer regressions."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import math

import pytest
import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from sdpo_core import SDPOConfig, SDPOTrainer
from sdpo_core.testing import tiny_model


def _trainer(model, tokenizer, dataset, args, reward, **sdpo):
    return SDPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                       processing_class=tokenizer, sdpo_config=SDPOConfig(**sdpo))


def _capture_batches(trainer):
    """Record every generation batch the trainer builds (B-first dicts, before shuffling)."""
    batches = []
    original = trainer._generate_and_score_completions

    def wrapped(inputs):
        output = original(inputs)
        batches.append(output)
        return output

    trainer._generate_and_score_completions = wrapped
    return batches


def _teacher_state_at_train_begin(trainer):
    """The teacher as `train(resume_from_checkpoint=...)` restored it, before any step runs."""
    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["state"] = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
            seen["updates"] = trainer.teacher.updates

    trainer.add_callback(Capture())
    return seen


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_sdpo_steps_train_and_log(model, tokenizer, chat_dataset, make_args, feedback_reward):
    before = _params(model)
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(), feedback_reward())
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    assert len(changed) == len(before), f"unchanged parameters: {set(before) - set(changed)}"
    logged = {k for entry in trainer.state.log_history for k in entry}
    for key in ("sdpo/distillation_loss", "sdpo/teacher_student_kl", "sdpo/success_fraction",
                "sdpo/reprompt_sample_fraction", "sdpo/feedback_used_fraction", "sdpo/success_group_fraction",
                "sdpo/is_ratio_mean", "reward", "entropy"):
        assert key in logged, key


def test_feedback_reaches_teacher_prompt_of_failed_samples(model, tokenizer, chat_dataset, make_args,
                                                           feedback_reward):
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(max_steps=1), feedback_reward())
    batches = _capture_batches(trainer)
    trainer.train()
    batch = batches[0]
    assert batch["sd_mask"].tolist() == [1.0] * 4
    for row in range(4):
        text = tokenizer.decode(batch["teacher_prompt_ids"][row][batch["teacher_prompt_mask"][row].bool()])
        assert f"FEEDBACK-{row}" in text
        assert text.count("You are a helpful assistant.") == 1
        assert text.count("<|im_start|>user") == 1
        assert text.endswith("<|im_start|>assistant\n")


def test_success_demo_is_a_sibling_never_self(model, tokenizer, chat_dataset, make_args, feedback_reward):
    reward = feedback_reward(succeed=lambda row: row % 4 == 1)  # one success per group
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(max_steps=1), reward)
    batches = _capture_batches(trainer)
    trainer.train()
    batch = batches[0]
    # the lone success has no other success: masked (its feedback is empty); the failures get its demo
    assert batch["sd_mask"].tolist() == [1.0, 0.0, 1.0, 1.0]
    demo = tokenizer.decode(batch["completion_ids"][1][batch["completion_mask"][1].bool()], skip_special_tokens=True)
    for row in (0, 2, 3):
        text = tokenizer.decode(batch["teacher_prompt_ids"][row][batch["teacher_prompt_mask"][row].bool()])
        assert "Correct solution:" in text
        assert f"FEEDBACK-{row}" not in text  # feedback only without a demonstration (seed default)
        assert demo.strip() in text


def test_disabled_is_plain_grpo(tokenizer, chat_dataset, make_args, feedback_reward):
    grpo = GRPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward(succeed=lambda r: r % 2 == 0)],
                       args=make_args(), train_dataset=chat_dataset, processing_class=tokenizer)
    grpo.train()
    sdpo = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward(succeed=lambda r: r % 2 == 0)],
                       args=make_args(), train_dataset=chat_dataset, processing_class=tokenizer,
                       sdpo_config=SDPOConfig(enabled=False))
    sdpo.train()
    assert sdpo.teacher is None
    for (name, a), (_, b) in zip(grpo.model.named_parameters(), sdpo.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    logged = {k for entry in sdpo.state.log_history for k in entry}
    assert {k for k in logged if k.startswith("sdpo/")} == {"sdpo/success_fraction"}  # only the comparison metric
    assert sdpo.state.log_history[0]["sdpo/success_fraction"] == pytest.approx(0.5)


def test_teacher_is_not_the_student(model, tokenizer, chat_dataset, make_args, feedback_reward):
    """sdpo-rl 0.0.3's bug: a deepcopy made after GRPO patched forward runs the student's weights."""
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(), feedback_reward())
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    before = trainer.teacher.logits(trainer.model, ids, mask, 4).clone()
    with torch.no_grad():
        for param in trainer.teacher.module.parameters():
            param.zero_()
    after = trainer.teacher.logits(trainer.model, ids, mask, 4)
    assert not torch.allclose(before, after)
    student = trainer.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(student, after)


def test_teacher_from_path_is_separate(tmp_path, tokenizer, chat_dataset, make_args, feedback_reward):
    path = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(path)
    trainer = SDPOTrainer(model=str(path), reward_funcs=[feedback_reward()], args=make_args(),
                          train_dataset=chat_dataset, processing_class=tokenizer)
    assert all(t.data_ptr() != s.data_ptr() for t, s in
               zip(trainer.teacher.module.parameters(), trainer.model.parameters(), strict=True))
    ids = torch.tensor([[5, 6, 7, 8]])
    before = trainer.teacher.logits(trainer.model, ids, torch.ones_like(ids), 4).clone()
    with torch.no_grad():
        next(trainer.teacher.module.parameters()).add_(1.0)
    assert not torch.allclose(before, trainer.teacher.logits(trainer.model, ids, torch.ones_like(ids), 4))


def test_in_memory_model_is_the_teacher(tokenizer, chat_dataset, make_args, feedback_reward):
    """TRL's sdpo reloads the teacher from `_name_or_path`: an in-memory edit would be lost."""
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = model(input_ids=ids).logits
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(), feedback_reward())
    torch.testing.assert_close(trainer.teacher.logits(trainer.model, ids, torch.ones_like(ids), 4), expected)


def test_teacher_update_skipped_without_finite_gradient(model, tokenizer, chat_dataset, make_args, feedback_reward):
    initial = _params(model)
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(max_steps=1), feedback_reward())
    trainer.model.lm_head.weight.register_hook(lambda grad: grad * float("nan"))
    trainer.train()
    assert trainer.teacher.updates == 0
    for name, teacher_param in trainer.teacher.module.named_parameters():
        assert torch.equal(teacher_param, initial[name]), name


def test_eval_uses_eval_group_size(model, tokenizer, chat_dataset, make_args, feedback_reward):
    """docs/peers.md SDPO-RL-7: eval must group by num_generations_eval, not num_generations."""
    args = make_args(num_generations_eval=2, per_device_eval_batch_size=4, eval_strategy="no")
    trainer = SDPOTrainer(model=model, reward_funcs=[feedback_reward(succeed=lambda row: row % 2 == 0)], args=args,
                          train_dataset=chat_dataset, eval_dataset=chat_dataset.select(range(4)),
                          processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert "eval_sdpo/reprompt_sample_fraction" in metrics
    # groups of 2 with one success each: the failures get a demo, the lone successes are masked
    assert metrics["eval_sdpo/success_sample_fraction"] == pytest.approx(0.5)


def test_ema_teacher_moves_by_rate_once_per_generation(model, tokenizer, chat_dataset, make_args, feedback_reward):
    rate = 0.25
    initial = _params(model)
    # GA 2 with steps_per_generation 2: one generation batch = one optimizer step
    args = make_args(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     num_generations=4)
    trainer = _trainer(model, tokenizer, chat_dataset, args, feedback_reward(), teacher_update_rate=rate)
    trainer.train()
    assert trainer.teacher.updates == 1
    student = dict(trainer.model.named_parameters())
    for name, teacher_param in trainer.teacher.module.named_parameters():
        expected = (1 - rate) * initial[name] + rate * student[name].detach()
        torch.testing.assert_close(teacher_param, expected, msg=name)


def test_frozen_teacher_never_moves(model, tokenizer, chat_dataset, make_args, feedback_reward):
    initial = _params(model)
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(), feedback_reward(), teacher_mode="frozen")
    trainer.train()
    for name, teacher_param in trainer.teacher.module.named_parameters():
        assert torch.equal(teacher_param, initial[name]), name


def test_trust_region_interpolates_logits(model, tokenizer, chat_dataset, make_args, feedback_reward):
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(), feedback_reward(), teacher_mode="trust_region",
                       teacher_update_rate=0.3)
    trainer.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    reference = trainer.teacher.reference.logits(trainer.model, ids, mask, 4)
    with torch.no_grad():
        live = trainer.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(trainer.teacher.logits(trainer.model, ids, mask, 4), 0.7 * reference + 0.3 * live)


def test_gradient_accumulation_matches_one_big_batch(model, tokenizer, chat_dataset, make_args, feedback_reward):
    """docs/peers.md SDPO-RL-4: GA 2x4 must give the same gradients as GA 1x8."""
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(per_device_train_batch_size=8, num_generations=4),
                       feedback_reward(succeed=lambda row: row % 4 == 0))
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(8)])
    assert batch["sd_mask"].sum() > 0

    def grads(micro_batches, ga):
        trainer.model.zero_grad()
        trainer.current_gradient_accumulation_steps = ga
        for micro in micro_batches:
            trainer._compute_loss(trainer.model, micro).backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    trainer.model.train()
    full = grads([batch], 1)
    for size in (4, 1):  # GA 2x4, and micro-batch 1 x GA 8 (TRL's sdpo aggregation differs here)
        micro = [{k: (v[i:i + size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
                 for i in range(0, 8, size)]
        split = grads(micro, 8 // size)
        for name in full:
            torch.testing.assert_close(split[name], full[name], msg=f"{size}: {name}", rtol=1e-4, atol=1e-6)


def test_masks_and_vllm_ratio_scale_the_loss(model, tokenizer, chat_dataset, make_args, feedback_reward):
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(), feedback_reward())
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(4)])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    base = trainer._compute_loss(trainer.model, batch)
    assert base.item() > 0
    halved = trainer._compute_loss(trainer.model, {**batch, "importance_sampling_ratio": torch.full((4, 1), 0.5)})
    torch.testing.assert_close(halved, base * 0.5)
    no_tools = trainer._compute_loss(trainer.model, {**batch, "tool_mask": torch.zeros_like(batch["completion_mask"])})
    assert no_tools.item() == 0.0
    assert no_tools.requires_grad
    masked = trainer._compute_loss(trainer.model, {**batch, "sd_mask": torch.zeros(4)})
    assert masked.item() == 0.0
    assert masked.requires_grad
    masked.backward()  # graph-connected: backward works on an all-masked micro-batch


def test_importance_ratio_is_one_on_policy_at_low_temperature(model, tokenizer, chat_dataset, make_args,
                                                              feedback_reward):
    """docs/peers.md SDPO-RL-5: logits must be divided by the temperature like GRPO's old log-probs are."""
    args = make_args(max_steps=1, temperature=0.7, num_iterations=2)  # num_iterations > 1 computes old logps
    trainer = _trainer(model, tokenizer, chat_dataset, args, feedback_reward())
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(4)])
    assert "old_per_token_logps" in batch
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer._compute_loss(trainer.model, batch)
    torch.testing.assert_close(trainer._metrics["train"]["sdpo/is_ratio_mean"][-1], 1.0, rtol=0, atol=1e-4)


def test_checkpoint_resume_restores_teacher(model, tokenizer, chat_dataset, make_args, feedback_reward, tmp_path):
    args = make_args(max_steps=2, save_strategy="steps", save_steps=1)
    trainer = _trainer(model, tokenizer, chat_dataset, args, feedback_reward(), teacher_update_rate=0.5)
    trainer.train()
    saved = torch.load(tmp_path / "out" / "checkpoint-1" / "sdpo_teacher.pt", weights_only=True)
    resumed = _trainer(tiny_model(tokenizer, seed=1), tokenizer, chat_dataset, make_args(max_steps=2),
                       feedback_reward(), teacher_update_rate=0.5)
    loaded = _teacher_state_at_train_begin(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    for name, value in saved.items():
        assert torch.equal(loaded["state"][name], value), name
    assert loaded["updates"] == 1
    assert resumed.teacher.updates == 2  # and the EMA keeps its schedule after the resume


def test_lora_ema_shares_base_and_copies_adapter(tokenizer, chat_dataset, make_args, feedback_reward):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    trainer = _trainer(peft_model, tokenizer, chat_dataset, make_args(), feedback_reward(), teacher_mode="lora_ema",
                       teacher_update_rate=0.5)
    params = dict(trainer.model.named_parameters())
    teacher_names = [n for n in params if ".sdpo_teacher." in n]
    assert teacher_names
    for name in teacher_names:
        assert torch.equal(params[name], params[name.replace(".sdpo_teacher.", ".default.")])
        assert not params[name].requires_grad
    trainer.train()
    params = dict(trainer.model.named_parameters())
    for name, value in base_before.items():
        assert torch.equal(params[name], value), name  # base weights untouched and shared
    moved = [n for n in teacher_names
             if not torch.equal(params[n], params[n.replace(".sdpo_teacher.", ".default.")])]
    assert moved
    assert trainer.teacher.updates == 2


def test_config_errors_at_construction(model, tokenizer, chat_dataset, make_args, feedback_reward):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="lora_ema"):
        _trainer(model, tokenizer, chat_dataset, make_args(), feedback_reward(), teacher_mode="lora_ema")
    with pytest.raises(ValueError, match="lora_ema"):
        SDPOTrainer(model=model, reward_funcs=[feedback_reward()], args=make_args(), train_dataset=chat_dataset,
                    processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
                    sdpo_config=SDPOConfig(teacher_mode="ema"))


def test_reward_output_errors_name_function_and_row(model, tokenizer, chat_dataset, make_args):
    def bad_value(prompts, completions, **kwargs):
        return [0.0, "oops", 0.0, 0.0]

    def short(prompts, completions, **kwargs):
        return [0.0]

    for func, pattern in ((bad_value, r"'bad_value'.*row 1"), (short, r"'short' returned 1 rewards for 4")):
        trainer = SDPOTrainer(model=model, reward_funcs=[func], args=make_args(max_steps=1),
                              train_dataset=chat_dataset, processing_class=tokenizer)
        with pytest.raises(ValueError, match=pattern):
            trainer.train()


def test_feedback_of_several_functions_is_combined(model, tokenizer, chat_dataset, make_args, feedback_reward):
    first = feedback_reward(text="FIRST-{row}")
    second = feedback_reward(text="SECOND-{row}")
    second.__name__ = "second"
    trainer = SDPOTrainer(model=model, reward_funcs=[first, second], args=make_args(max_steps=1),
                          train_dataset=chat_dataset, processing_class=tokenizer)
    batches = _capture_batches(trainer)
    trainer.train()
    text = tokenizer.decode(batches[0]["teacher_prompt_ids"][2])
    assert text.index("FIRST-2") < text.index("SECOND-2")


def test_stale_or_malformed_feedback_is_rejected(model, tokenizer, chat_dataset, make_args):
    class WrongLength:
        __name__ = "wrong_length"
        last_feedback = None

        def __call__(self, prompts, completions, **kwargs):
            self.last_feedback = ["only one"]
            return [0.0] * len(prompts)

    trainer = SDPOTrainer(model=model, reward_funcs=[WrongLength()], args=make_args(max_steps=1),
                          train_dataset=chat_dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="'wrong_length': last_feedback must be a list with one text per row; "
                                         "got 1 entries for 4"):
        trainer.train()

    class Stale:
        __name__ = "stale"

        def __init__(self):
            self.last_feedback = ["old"] * 4

        def __call__(self, prompts, completions, **kwargs):
            return [0.0] * len(prompts)  # never sets last_feedback: the old list must not be reused

    trainer = SDPOTrainer(model=model, reward_funcs=[Stale()], args=make_args(max_steps=1),
                          train_dataset=chat_dataset, processing_class=tokenizer)
    batches = _capture_batches(trainer)
    trainer.train()
    assert batches[0]["sd_mask"].sum() == 0


def test_async_reward_function_keeps_working(model, tokenizer, chat_dataset, make_args):
    async def async_reward(prompts, completions, **kwargs):
        return [1.0 if i % 2 else 0.0 for i in range(len(prompts))]

    trainer = SDPOTrainer(model=model, reward_funcs=[async_reward], args=make_args(max_steps=1),
                          train_dataset=chat_dataset, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.log_history[0]["reward"] == pytest.approx(0.5)


def test_overridden_grpo_seams_exist():
    """We override private GRPOTrainer 1.16 methods: pin their signatures."""
    expected = {
        "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
        "_generate_and_score_completions": ["self", "inputs"],
        "_compute_loss": ["self", "model", "inputs"],
        "_save_checkpoint": ["self", "model", "trial"],
        "_load_optimizer_and_scheduler": ["self", "checkpoint"],
        "_get_grad_norm": ["self", "model", "grad_norm"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == params, name
    init = inspect.signature(GRPOTrainer.__init__).parameters
    sdpo_init = inspect.signature(SDPOTrainer.__init__).parameters
    assert list(init) == [p for p in sdpo_init if p != "sdpo_config"]


def _loss_grads_and_metrics(trainer, batch):
    """One training-mode loss and backward on `batch`: (loss, gradients by name, logged KL, logged entropy)."""
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = trainer._metrics["train"]
    return loss.detach(), grads, metrics["sdpo/teacher_student_kl"][-1], metrics["entropy"][-1]


@pytest.mark.parametrize(("teacher_mode", "teacher_temperature"), [("ema", 1.0), ("lora_ema", 1.0), ("ema", 0.8)])
def test_hidden_state_path_matches_logits_path(tokenizer, chat_dataset, make_args, feedback_reward, teacher_mode,
                                               teacher_temperature):
    """The memory-lean path (no [B, T, V] logits) gives the logits path's loss and gradients."""
    model = tiny_model(tokenizer)
    peft_config = None
    if teacher_mode == "lora_ema":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = SDPOTrainer(model=model, reward_funcs=[feedback_reward(succeed=lambda row: row % 4 == 0)],
                          args=make_args(temperature=0.7), train_dataset=chat_dataset, processing_class=tokenizer,
                          peft_config=peft_config, sdpo_config=SDPOConfig(teacher_mode=teacher_mode, alpha=0.3,
                                                                           distillation_topk=7,
                                                                           teacher_temperature=teacher_temperature))
    assert trainer._hidden_state_path
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(4)])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    results = {}
    for hidden in (True, False):
        trainer._hidden_state_path = hidden
        results[hidden] = _loss_grads_and_metrics(trainer, batch)
    torch.testing.assert_close(results[True][0], results[False][0])
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, msg=name, rtol=1e-4, atol=1e-6)
    assert results[True][2] == pytest.approx(results[False][2], rel=1e-4, abs=1e-6)  # statistics from the loss's
    assert results[True][3] == pytest.approx(results[False][3], rel=1e-4, abs=1e-6)  # chunks match a separate pass


@pytest.mark.parametrize("hidden", [True, False])
def test_a_sharper_teacher_is_what_the_student_is_distilled_toward(tokenizer, chat_dataset, make_args,
                                                                   feedback_reward, hidden):
    """`teacher_temperature` < 1 divides the teacher's logits on both paths: the logged teacher entropy falls and
    the loss changes; the student's own statistics do not."""
    trainer = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward()], args=make_args(),
                          train_dataset=chat_dataset, processing_class=tokenizer,
                          sdpo_config=SDPOConfig(distillation_topk=7))
    trainer._hidden_state_path = hidden
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(4)])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    logged = {}
    for temperature in (1.0, 0.5):
        trainer.sdpo_config = dataclasses.replace(trainer.sdpo_config, teacher_temperature=temperature)
        loss = trainer._compute_loss(trainer.model, batch).detach()
        metrics = trainer._metrics["train"]
        logged[temperature] = (loss, metrics["sdpo/teacher_entropy"][-1], metrics["entropy"][-1])
    assert logged[0.5][1] < logged[1.0][1]
    assert not torch.equal(logged[0.5][0], logged[1.0][0])
    assert logged[0.5][2] == pytest.approx(logged[1.0][2])


@pytest.mark.parametrize("hidden", [True, False])
def test_teacher_runs_only_on_rows_with_a_signal(tokenizer, chat_dataset, make_args, feedback_reward, hidden):
    """Rows without a teacher signal skip the teacher forward; loss and gradients equal the all-rows computation."""
    trainer = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward()], args=make_args(),
                          train_dataset=chat_dataset, processing_class=tokenizer,
                          sdpo_config=SDPOConfig(distillation_topk=7))
    trainer._hidden_state_path = hidden
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(4)])
    batch["sd_mask"] = torch.tensor([True, False, True, False])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    method = "hidden_states" if hidden else "logits"
    forward = getattr(trainer.teacher, method)
    rows_seen: list[int] = []

    def spy(student, input_ids, *args):
        rows_seen.append(input_ids.size(0))
        return forward(student, input_ids, *args)

    setattr(trainer.teacher, method, spy)
    results = {}
    for all_rows in (False, True):
        trainer._teacher_on_all_rows = all_rows
        results[all_rows] = _loss_grads_and_metrics(trainer, batch)
    assert rows_seen == [2, 4]
    torch.testing.assert_close(results[False][0], results[True][0])
    assert results[False][1].keys() == results[True][1].keys()
    for name, grad in results[True][1].items():
        torch.testing.assert_close(results[False][1][name], grad, msg=name)
    assert results[False][2] == pytest.approx(results[True][2], rel=1e-5, abs=1e-7)


def test_sharded_training_runs_the_teacher_even_without_a_signal(tokenizer, chat_dataset, make_args,
                                                                   feedback_reward):
    """Under ZeRO-3/FSDP a rank that skipped its teacher forward would leave the others waiting in a collective."""
    trainer = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward()], args=make_args(),
                          train_dataset=chat_dataset, processing_class=tokenizer,
                          sdpo_config=SDPOConfig(distillation_topk=7))
    trainer._hidden_state_path = False  # what sharded runs use
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(4)])
    batch["sd_mask"] = torch.zeros(4, dtype=torch.bool)
    calls: list[int] = []
    forward = trainer.teacher.logits
    trainer.teacher.logits = lambda student, input_ids, *args: calls.append(input_ids.size(0)) or forward(
        student, input_ids, *args)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer._teacher_on_all_rows = False
    assert trainer._compute_loss(trainer.model, batch).item() == 0.0
    assert calls == []
    trainer._teacher_on_all_rows = True
    assert trainer._compute_loss(trainer.model, batch).item() == 0.0
    assert calls == [4]


def test_lora_ema_checkpoint_restores_teacher_adapter(tokenizer, chat_dataset, make_args, feedback_reward, tmp_path):
    from peft import LoraConfig

    def trainer(max_steps, **args):
        return SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward()],
                           args=make_args(max_steps=max_steps, **args), train_dataset=chat_dataset,
                           processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
                           sdpo_config=SDPOConfig(teacher_mode="lora_ema", teacher_update_rate=0.5))

    first = trainer(2, save_strategy="steps", save_steps=1)
    first.train()
    saved = torch.load(tmp_path / "out" / "checkpoint-1" / "sdpo_teacher.pt", weights_only=True)
    assert saved
    assert all(".sdpo_teacher." in name for name in saved)
    resumed = trainer(2)
    loaded = _teacher_state_at_train_begin(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    for name, value in saved.items():
        assert torch.equal(loaded["state"][name], value), name


# ------------------------------------------------------------------------------------ collapse guards
def _loss_and_grads(trainer, compute):
    trainer.model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _assert_same_loss_and_grads(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-7)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, msg=name, rtol=1e-4, atol=1e-6)


def _sum_of(*results):
    loss = sum(r[0] for r in results)
    names = set().union(*(r[1] for r in results))
    return loss, {n: sum(r[1][n] for r in results if n in r[1]) for n in names}


def _scaled(result, weight):
    return result[0] * weight, {n: g * weight for n, g in result[1].items()}


def _guard_trainer(tokenizer, chat_dataset, make_args, feedback_reward, hidden, args=None, **sdpo):
    """A trainer and one generation batch; fp32 (no bf16 autocast), where GRPO's own loss and our term agree to
    float rounding (under CPU bf16 autocast they differ by bf16 rounding: TRL's fused head runs in bf16)."""
    trainer = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward(succeed=lambda r: r % 4 == 0)],
                          args=make_args(bf16=False, **(args or {})), train_dataset=chat_dataset,
                          processing_class=tokenizer, sdpo_config=SDPOConfig(distillation_topk=7, **sdpo))
    trainer._hidden_state_path = hidden
    batch = trainer._generate_and_score_completions([chat_dataset[i] for i in range(4)])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer, batch


def _as_pure_sdpo(trainer):
    trainer.sdpo_config = dataclasses.replace(trainer.sdpo_config, distillation_weight=1.0, route_by_success=False)
    trainer._policy_term = False


@pytest.mark.parametrize("hidden", [True, False])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_blend_is_the_weighted_sum_of_sdpo_and_grpo_losses(tokenizer, chat_dataset, make_args, feedback_reward,
                                                           hidden, loss_type):
    """λ·SDPO + (1−λ)·GRPO, GRPO's term taken from the distillation's student forward, equals the plain trainers'."""
    trainer, batch = _guard_trainer(tokenizer, chat_dataset, make_args, feedback_reward, hidden,
                                    args={"loss_type": loss_type}, distillation_weight=0.25)
    assert batch["advantages"].abs().sum() > 0
    assert 0 < batch["sd_mask"].sum() < 4
    blend = _loss_and_grads(trainer, lambda: trainer._compute_loss(trainer.model, batch))
    metrics = trainer._metrics["train"]
    assert (metrics["sdpo/policy_row_fraction"][-1], metrics["sdpo/distillation_row_fraction"][-1]) == (1.0, 0.75)
    grpo = _loss_and_grads(trainer, lambda: GRPOTrainer._compute_loss(trainer, trainer.model, batch))
    assert metrics["sdpo/policy_loss"][-1] == pytest.approx(grpo[0].item(), rel=1e-5)
    _as_pure_sdpo(trainer)
    sdpo = _loss_and_grads(trainer, lambda: trainer._compute_loss(trainer.model, batch))
    _assert_same_loss_and_grads(blend, _sum_of(_scaled(sdpo, 0.25), _scaled(grpo, 0.75)))


def test_blend_limits_are_the_plain_trainers(tokenizer, chat_dataset, make_args, feedback_reward):
    """λ=0 trains exactly as GRPOTrainer; λ=1 (the default) computes no GRPO term at all."""
    grpo = GRPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward(succeed=lambda r: r % 2 == 0)],
                       args=make_args(), train_dataset=chat_dataset, processing_class=tokenizer)
    grpo.train()
    weight0 = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward(succeed=lambda r: r % 2 == 0)],
                          args=make_args(), train_dataset=chat_dataset, processing_class=tokenizer,
                          sdpo_config=SDPOConfig(distillation_weight=0.0))
    weight0.train()
    for (name, a), (_, b) in zip(grpo.model.named_parameters(), weight0.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    logged = weight0.state.log_history[0]
    assert (logged["sdpo/policy_row_fraction"], logged["sdpo/distillation_row_fraction"]) == (1.0, 0.0)
    assert "sdpo/distillation_loss" not in logged
    default = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward()], args=make_args(),
                          train_dataset=chat_dataset, processing_class=tokenizer)
    assert not default._policy_term


@pytest.mark.parametrize("hidden", [True, False])
def test_routing_gives_each_row_exactly_its_term(tokenizer, chat_dataset, make_args, feedback_reward, hidden):
    """Rows: success with a demo, failure with a signal, failure without, success without.

    Routed: GRPO on rows 0, 2, 3 (successes, and the failure without a teacher signal), distillation on row 1 only,
    each with the share it has in its plain trainer, and the teacher runs on row 1 alone.
    """
    trainer, batch = _guard_trainer(tokenizer, chat_dataset, make_args, feedback_reward, hidden,
                                    route_by_success=True)
    batch["sd_success"] = torch.tensor([True, False, False, True])
    batch["sd_mask"] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    batch["advantages"] = torch.tensor([0.9, -0.4, -0.6, 0.3])
    method = "hidden_states" if hidden else "logits"
    forward = getattr(trainer.teacher, method)
    rows_seen: list[int] = []

    def spy(student, input_ids, *args):
        rows_seen.append(input_ids.size(0))
        return forward(student, input_ids, *args)

    setattr(trainer.teacher, method, spy)
    routed = _loss_and_grads(trainer, lambda: trainer._compute_loss(trainer.model, batch))
    assert rows_seen == [1]
    metrics = trainer._metrics["train"]
    assert (metrics["sdpo/policy_row_fraction"][-1], metrics["sdpo/distillation_row_fraction"][-1]) == (0.75, 0.25)
    policy_only = {**batch, "advantages": batch["advantages"] * torch.tensor([1.0, 0.0, 1.0, 1.0])}
    grpo = _loss_and_grads(trainer, lambda: GRPOTrainer._compute_loss(trainer, trainer.model, policy_only))
    _as_pure_sdpo(trainer)
    distilled_only = {**batch, "sd_mask": torch.tensor([0.0, 1.0, 0.0, 0.0])}
    sdpo = _loss_and_grads(trainer, lambda: trainer._compute_loss(trainer.model, distilled_only))
    assert sdpo[0] > 0
    assert grpo[0] != 0
    _assert_same_loss_and_grads(routed, _sum_of(grpo, sdpo))


@pytest.mark.parametrize("sdpo_config", [
    SDPOConfig(distillation_weight=0.5),
    SDPOConfig(route_by_success=True),
    SDPOConfig(teacher_update_rate_schedule="linear", teacher_update_rate_final=0.0),
    SDPOConfig(teacher_reset_every=1),
    SDPOConfig.from_preset("guarded"),
    SDPOConfig.from_preset("guarded_sharp"),
], ids=["blend", "routing", "schedule", "reset", "preset-guarded", "preset-guarded-sharp"])
def test_each_guard_trains(tokenizer, chat_dataset, make_args, feedback_reward, sdpo_config):
    model = tiny_model(tokenizer)
    before = _params(model)
    trainer = SDPOTrainer(model=model, reward_funcs=[feedback_reward(succeed=lambda r: r % 4 == 0)], args=make_args(),
                          train_dataset=chat_dataset, processing_class=tokenizer, sdpo_config=sdpo_config)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert [n for n, v in before.items() if torch.equal(v, after[n])] == []
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    assert all(math.isfinite(entry["loss"]) for entry in steps)
    last = steps[-1]
    if sdpo_config.distillation_weight < 1:  # every row takes GRPO's term, the 3 failures with a demo distillation
        assert (last["sdpo/policy_row_fraction"], last["sdpo/distillation_row_fraction"]) == (1.0, 0.75)
    elif sdpo_config.route_by_success:  # the lone success of each group: GRPO; its 3 failed siblings: distillation
        assert (last["sdpo/policy_row_fraction"], last["sdpo/distillation_row_fraction"]) == (0.25, 0.75)
    else:
        assert "sdpo/policy_row_fraction" not in last
    if sdpo_config.teacher_update_rate_schedule == "linear":
        assert [entry["sdpo/teacher_update_rate"] for entry in steps] == [0.05, 0.0]
    if sdpo_config.teacher_reset_every == 1:
        assert [entry["sdpo/teacher_reset"] for entry in steps] == [1.0, 1.0]
        assert trainer.teacher.updates == 0
        for name, value in trainer.teacher.module.named_parameters():
            assert torch.equal(value, before[name]), name


def test_schedule_and_reset_survive_a_resume(tokenizer, chat_dataset, make_args, feedback_reward, tmp_path):
    """Three generation batches, rate 0.5 → 0.3 → 0.1, reset after the third; resumed after the first."""
    guards = {"teacher_update_rate": 0.5, "teacher_update_rate_schedule": "linear", "teacher_update_rate_final": 0.1,
              "teacher_reset_every": 3}
    model = tiny_model(tokenizer)
    initial = _params(model)
    first = _trainer(model, tokenizer, chat_dataset, make_args(max_steps=3, save_strategy="steps", save_steps=1),
                     feedback_reward(), **guards)
    first.train()
    rates = [e["sdpo/teacher_update_rate"] for e in first.state.log_history if "sdpo/teacher_update_rate" in e]
    assert rates == pytest.approx([0.5, 0.3])
    resumed = _trainer(tiny_model(tokenizer, seed=1), tokenizer, chat_dataset, make_args(max_steps=3),
                       feedback_reward(), **guards)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    after_resume = [e for e in resumed.state.log_history if e.get("step", 0) > 1 and "loss" in e]
    assert [e.get("sdpo/teacher_update_rate") for e in after_resume] == [pytest.approx(0.3), None]
    assert [e.get("sdpo/teacher_reset") for e in after_resume] == [None, 1.0]
    for name, value in resumed.teacher.module.named_parameters():  # the first run's initial weights, not seed 1's
        assert torch.equal(value, initial[name]), name


def test_guards_refuse_grpo_options_they_do_not_reproduce(model, tokenizer, chat_dataset, make_args,
                                                          feedback_reward):
    with pytest.raises(ValueError, match=r"distillation_weight=0\.5.*loss_type='sapo'"):
        _trainer(model, tokenizer, chat_dataset, make_args(loss_type="sapo"), feedback_reward(),
                 distillation_weight=0.5)
    with pytest.raises(ValueError, match=r"route_by_success.*top_entropy_quantile"):
        _trainer(model, tokenizer, chat_dataset, make_args(top_entropy_quantile=0.5), feedback_reward(),
                 route_by_success=True)
    weight0 = _trainer(model, tokenizer, chat_dataset, make_args(loss_type="sapo"), feedback_reward(),
                       distillation_weight=0.0)  # GRPO's own loss: every option works
    assert not weight0._policy_term


def test_lora_ema_teacher_resets_to_its_initial_adapter(tokenizer, chat_dataset, make_args, feedback_reward):
    from peft import LoraConfig

    trainer = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward()], args=make_args(),
                          train_dataset=chat_dataset, processing_class=tokenizer,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                          sdpo_config=SDPOConfig(teacher_mode="lora_ema", teacher_update_rate=0.5,
                                                 teacher_reset_every=2))
    initial = {name: value.clone() for name, value in trainer.teacher.state_dict().items()}
    assert initial
    assert all(".sdpo_teacher." in name for name in trainer._teacher_initial_state)
    moved = {}

    class AfterFirstBatch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                moved.update(trainer.teacher.state_dict())

    trainer.add_callback(AfterFirstBatch())  # runs after the teacher's own update callback
    trainer.train()
    assert trainer.teacher.updates == 1  # the first batch's EMA step; the second batch reset instead
    assert any(not torch.equal(moved[name], value) for name, value in initial.items())
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, initial[name]), name


def test_a_checkpoint_stopped_by_a_full_disk_says_the_disk_is_full(model, tokenizer, chat_dataset, make_args,
                                                                    feedback_reward, tmp_path, monkeypatch,
                                                                    free_bytes):
    """torch reports a full disk as a bare "unexpected pos"; the run stops with an error that names the disk, and
    the half-written checkpoint is removed."""

    def full_disk_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64704 vs 64596")

    monkeypatch.setattr(torch, "save", full_disk_write)
    free_bytes(2**20)
    trainer = _trainer(model, tokenizer, chat_dataset, make_args(max_steps=1, save_strategy="steps", save_steps=1),
                       feedback_reward())
    with pytest.raises(OSError, match=r"its disk is full \(1\.0 MiB free\).*unexpected pos") as failure:
        trainer.train()
    assert failure.value.errno == errno.ENOSPC
    assert str(tmp_path / "out") in str(failure.value)
    assert not (tmp_path / "out" / "checkpoint-1").exists()  # half written, it would be the one a resume picks

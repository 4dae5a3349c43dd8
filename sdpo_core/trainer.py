"""`SDPOTrainer`: Self-Distillation Policy Optimization as a TRL `GRPOTrainer` subclass.

SDPO (huggingface.co/papers/2601.20802; reference code lasgroup/SDPO at 0e6d510) keeps GRPO's rollout and
scoring, then replaces the policy-gradient loss: each completion gets a *teacher prompt* (the question plus
a successful sibling's answer, or the environment's feedback on this completion), a teacher model scores
the student's exact tokens under it, and the student is distilled toward the teacher token by token.
No reward or advantage enters the loss; rewards only pick demonstrations.

Seams overridden (everything else is GRPOTrainer 1.16's):

- `__init__`: builds the teacher (a copy made before GRPO patches `forward`, a second LoRA adapter, or
  the base with adapters disabled) and prepares it like GRPO's reference model.
- `_calculate_rewards`: reads `last_feedback` from every reward function (reset before the call), and from
  TRL `environment_factory` objects, and gathers prompts, demonstrations and feedback across processes.
- `__init__` and `_generate_and_score_completions`: a multi-turn environment among the reward functions plays
  whole episodes through TRL's `rollout_func` (`sdpo_core.episode_rollout`); the teacher reads episodes with
  hindsight (`sdpo_core.episode_teacher`, docs/algorithm.md "SDPO on multi-turn episodes").
- `_generate_and_score_completions`: builds teacher prompts on the global batch (groups may span
  processes), before GRPO shuffles it, and slices them back to this process.
- `_compute_loss`: the distillation loss (`sdpo_core.loss`); `enabled=False` leaves GRPO's loss untouched.
  The collapse guards `distillation_weight` < 1 and `route_by_success` add GRPO's policy-gradient term
  (`sdpo_core.policy_loss`) from the same student forward; `distillation_weight=0` is GRPO's own loss.
- `_get_grad_norm`, a callback's `on_step_end`: EMA once per generation batch, skipped when no step of the
  batch had a finite gradient norm; its rate follows `teacher_update_rate_schedule` and every
  `teacher_reset_every`-th batch resets the teacher instead (`sdpo_core.teacher_schedule`).
- `_save_checkpoint`, `_load_optimizer_and_scheduler`: teacher weights travel with checkpoints (and a checkpoint
  that a full disk stops says so).

Deviations from lasgroup/SDPO are deliberate and documented in docs/algorithm.md: the loss is micro-batch
invariant (the reference's runs are micro-batch 1), teacher-prompt truncation never cuts the generation
header, the thinking strip also handles a completion that starts inside `<think>`, and a lone success may
optionally be its own demonstration.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from accelerate.utils import gather_object, is_peft_model
from torch import nn
from transformers import PreTrainedModel, ProcessorMixin, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import create_model_from_path, get_config_model_id, pad

from sdpo_core import diagnostics
from sdpo_core import loss as sdpo_loss
from sdpo_core.config import SDPOConfig
from sdpo_core.disk_space import full_disk_message
from sdpo_core.episode_rollout import EpisodeRollout, check_rollout_arguments
from sdpo_core.episode_teacher import hindsight_demonstrations
from sdpo_core.modeling import add_hidden_states_forward, causal_lm, lm_head, supports_hidden_state_path
from sdpo_core.policy_loss import POLICY_LOSS_TYPES, aggregate_policy_loss, policy_per_token_loss, route_rows
from sdpo_core.reward_contract import combine_feedback, validated_reward_function
from sdpo_core.teacher import (
    CopiedModelTeacher,
    DisabledAdapterTeacher,
    LoraEMATeacher,
    Teacher,
    TrustRegionTeacher,
    strip_patched_forward,
)
from sdpo_core.teacher_drift import TeacherDriftCallback, moving_teacher_parameters
from sdpo_core.teacher_prompt import build_teacher_batch, strip_thinking
from sdpo_core.teacher_schedule import generation_batches, reset_due, scheduled_rate
from sdpo_envs.feedback_channel import completion_text, read_environment_feedback, read_feedback, reset_feedback

logger = logging.getLogger(__name__)

TEACHER_STATE_FILE = "sdpo_teacher.pt"
TEACHER_META_FILE = "sdpo_teacher.json"
TEACHER_INITIAL_STATE_FILE = "sdpo_teacher_initial.pt"
_FLAT_REWARD_WARN_AFTER = 5

# Token means logged each step: (term of `_DistillationTerms` or derived, metric over all trained tokens, metric name
# under `sdpo/demo/` and `sdpo/feedback/`, or None when only the overall mean is logged). docs/training.md lists them.
_TOKEN_METRICS = (
    ("teacher_entropy", "sdpo/teacher_entropy", "teacher_entropy"),
    ("entropy", "sdpo/student_entropy_trained", "student_entropy"),
    ("student_token_logps", "sdpo/student_logp_under_student", "student_logp_under_student"),
    ("teacher_token_logps", "sdpo/student_logp_under_teacher", "student_logp_under_teacher"),
    ("per_token_loss", "sdpo/divergence", "divergence"),
    ("k1", "sdpo/teacher_student_kl", None),
    ("is_ratio", "sdpo/is_ratio_mean", None),
)


class _DistillationTerms(NamedTuple):
    """Per-token `[B, T]` terms of one micro-batch; rows without a teacher hold zeros in the teacher's terms."""

    per_token_loss: torch.Tensor  # the divergence, before importance weighting
    student_token_logps: torch.Tensor  # log p_student(sampled token), differentiable on the logits path
    teacher_token_logps: torch.Tensor  # log p_teacher(sampled token)
    entropy: torch.Tensor  # the student's entropy, on every row
    teacher_entropy: torch.Tensor  # the teacher's entropy
    loss: torch.Tensor  # the scalar Σ weight·ρ·ℓ (ρ: the importance ratio), with its gradient


def _scatter_rows(rows: torch.Tensor, num_rows: int, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`[b, T]` tensors of the selected `rows` back to `[num_rows, T]`, zeros elsewhere (differentiable)."""
    return tuple(value.new_zeros(num_rows, *value.shape[1:]).index_add(0, rows, value) for value in values)


class _TeacherUpdateCallback(TrainerCallback):
    """Calls the trainer's teacher update after each optimizer step; the trainer decides when it is due."""

    def __init__(self, trainer: SDPOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._maybe_update_teacher()
        return control


class SDPOTrainer(GRPOTrainer):
    """GRPOTrainer with SDPO's self-distillation loss. Takes GRPOTrainer's arguments plus `sdpo_config`.

    Args:
        sdpo_config (`SDPOConfig`, *optional*): the SDPO settings; defaults to `SDPOConfig()`.

    Reward functions may carry feedback for the teacher in a `last_feedback` list (one string per row,
    set on every call), as `sdpo_envs.Environment` objects do. Feedback of several functions is joined.
    """

    _tag_names = ["trl", "grpo", "sdpo"]  # noqa: RUF012  (an instance attribute of GRPOTrainer)
    _name = "SDPO"
    # What GRPOTrainer holds, typed as this subclass uses it (transformers' Trainer types them more loosely).
    args: GRPOConfig
    model: Any  # a transformers or PEFT model, possibly wrapped for DDP
    num_generations: int
    num_generations_eval: int

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Callable] | None = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        sdpo_config: SDPOConfig | None = None,
    ) -> None:
        self.sdpo_config = sdpo_config if sdpo_config is not None else SDPOConfig()
        if not isinstance(self.sdpo_config, SDPOConfig):
            raise TypeError(f"sdpo_config must be an SDPOConfig, got {type(self.sdpo_config).__name__}")
        cfg = self.sdpo_config
        uses_peft = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
        if cfg.enabled:
            _check_teacher_mode(cfg.teacher_mode, peft_config is not None, uses_peft)
            if isinstance(processing_class, ProcessorMixin):
                raise NotImplementedError(
                    "SDPO teacher prompts for vision-language models (a ProcessorMixin processing_class) are not "
                    "supported yet; use SDPOConfig(enabled=False) for GRPO"
                )

        # The copy must precede GRPOTrainer.__init__, which patches model.forward (see teacher.py).
        copies_model = cfg.enabled and cfg.teacher_mode in ("ema", "frozen", "trust_region") and peft_config is None
        teacher_copy = None
        if copies_model and not isinstance(model, str):
            teacher_copy = strip_patched_forward(copy.deepcopy(model))

        # a multi-turn environment among the reward functions plays whole episodes (sdpo_core.episode_rollout)
        self._episode_rollout: EpisodeRollout | None = None
        if reward_funcs is not None:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            self._episode_rollout = check_rollout_arguments(funcs, rollout_func, environment_factory)
            if self._episode_rollout is not None:
                rollout_func = self._episode_rollout
                funcs = [self._episode_rollout.reward_function if f is self._episode_rollout.environment else f
                         for f in funcs]
            reward_funcs = [f if isinstance(f, (nn.Module, str)) else validated_reward_function(f) for f in funcs]

        super().__init__(
            model=model,  # type: ignore[arg-type]  # any nn.Module causal LM works, as in GRPOTrainer itself
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )

        self.teacher: Teacher | None = None
        self._hidden_state_path = False
        self._teacher_generations_done = 0
        self._finite_step_in_generation = False
        self._flat_generations = 0
        self._stash: dict[str, Any] = {}
        # GRPO's term beside the distillation, from the same student forward (distillation_weight 0 is GRPO's own)
        self._policy_term = cfg.enabled and (0.0 < cfg.distillation_weight < 1.0 or cfg.route_by_success)
        if self._policy_term:
            _check_policy_term(self)
        self._teacher_generations_offset = 0  # generation batches done before a resume (the schedule's position)
        self._teacher_initial_state: dict[str, torch.Tensor] | None = None
        # ZeRO-3/FSDP gather parameters with collectives inside forward: every rank must run the same teacher
        # forwards, so no rank may skip rows (or a whole micro-batch) that have no teacher signal.
        self._teacher_on_all_rows = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if cfg.enabled:
            if copies_model and teacher_copy is None:
                teacher_copy = self._teacher_from_path(quantization_config)
            self.teacher = self._build_teacher(teacher_copy)
            if cfg.teacher_reset_every is not None:  # a CPU copy of the initial teacher weights to reset to
                self._teacher_initial_state = self.teacher.state_dict()
            self.add_callback(_TeacherUpdateCallback(self))
            drifting = moving_teacher_parameters(self.teacher)
            if drifting is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # not sharded
                self.add_callback(TeacherDriftCallback(self, drifting))
            self._hidden_state_path = self._can_use_hidden_states()
            if self._hidden_state_path:
                add_hidden_states_forward(causal_lm(self.model))
            logger.info("SDPO teacher: %s (update rate %s)", cfg.teacher_mode, cfg.teacher_update_rate)

    @property
    def _steps_per_generation(self) -> int:
        """`GRPOConfig.steps_per_generation`, which its `__post_init__` always sets."""
        steps = self.args.steps_per_generation
        assert steps is not None
        return steps

    # ------------------------------------------------------------------------------------ teacher set-up
    def _teacher_from_path(self, quantization_config: Any) -> nn.Module:
        """Load the teacher from the student's path, the way GRPOTrainer loads its reference model."""
        model_init_kwargs = dict(self.args.model_init_kwargs or {})  # type: ignore[arg-type]  # parsed to a dict
        if quantization_config is not None:
            model_init_kwargs["quantization_config"] = quantization_config
        if self.args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            model_init_kwargs["device_map"] = None
        model_init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        model_init_kwargs.setdefault("dtype", self.model.dtype)
        model_init_kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
        return create_model_from_path(get_config_model_id(self.model.config), **model_init_kwargs)

    def _build_teacher(self, teacher_copy: nn.Module | None) -> Teacher:
        cfg = self.sdpo_config
        if cfg.teacher_mode == "lora_ema":
            return LoraEMATeacher(self.model, cfg.teacher_update_rate)
        if teacher_copy is None:  # a fresh LoRA run: the initial model is the base with adapters off
            reference: Teacher = DisabledAdapterTeacher()
        else:
            teacher_copy = self._prepare_teacher_module(teacher_copy)
            rate = cfg.teacher_update_rate if cfg.teacher_mode == "ema" else 0.0
            reference = CopiedModelTeacher(teacher_copy, rate, "ema" if rate else "frozen")
            reference.check_matches(self.model)
        if cfg.teacher_mode == "trust_region":
            return TrustRegionTeacher(reference, cfg.teacher_update_rate)
        return reference

    def _can_use_hidden_states(self) -> bool:
        """The memory-lean loss path: top-K/full-vocabulary distillation from hidden states and LM heads.

        Needs logits that are a plain linear projection, parameters that are not sharded (ZeRO-3/FSDP
        gather them only inside forward), and a teacher whose logits come from one model (not trust-region).
        """
        cfg = self.sdpo_config
        return (
            cfg.full_logit_distillation
            and cfg.teacher_mode != "trust_region"
            and not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and supports_hidden_state_path(self.model)
            and (not isinstance(self.teacher, CopiedModelTeacher) or supports_hidden_state_path(self.teacher.module))
        )

    def _prepare_teacher_module(self, module: nn.Module) -> Any:
        """Place the teacher like GRPO's reference model; never `accelerator.prepare` (DDP on a frozen module)."""
        module.requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(module, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(module, self.accelerator)
        return self.accelerator.prepare_model(module, evaluation_mode=True)

    # ------------------------------------------------------------------------------- rewards, feedback
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        sources = [getattr(f, "sdpo_inner", f) for f in self.reward_funcs]
        if not self.sdpo_config.enabled:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._log_success_fraction(self._total_rewards(rewards_per_func))
            return rewards_per_func
        named = list(zip(sources, self.reward_func_names, strict=True))
        previous = [reset_feedback(source, name) for source, name in named]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        per_function = [read_feedback(source, name, len(prompts), before)
                        for (source, name), before in zip(named, previous, strict=True)]
        environments = getattr(self, "environments", None)
        if environments:  # TRL's environment_factory objects: their last_feedback is the environment's feedback
            per_function.append(read_environment_feedback(environments))
        local_feedback = combine_feedback(per_function, len(prompts))
        final_answers = self._final_answers(environments)
        demonstrations = hindsight_demonstrations([completion_text(c) for c in completions], final_answers)
        # "shortest" ranks what is demonstrated: an episode's final answer (characters), else the completion (tokens)
        lengths = list(map(len, completion_ids_list if final_answers is None else demonstrations))
        self._stash = {
            "prompts": gather_object(list(prompts)),
            "completions": gather_object(demonstrations),
            "feedback": gather_object(local_feedback),
            "lengths": gather_object(lengths),
            "rewards_per_func": rewards_per_func,
        }
        return rewards_per_func

    def _final_answers(self, environments: Sequence[Any] | None) -> list[str | None] | None:
        """Each episode's final answer, what a successful episode demonstrates; `None` for single-turn rows."""
        if self._episode_rollout is not None:
            return self._episode_rollout.reward_function.last_answers
        if environments:
            return [getattr(environment, "last_answer", None) for environment in environments]
        return None

    def _generate_and_score_completions(self, inputs):
        if self._episode_rollout is not None:  # TRL hands rollout_func the prompts only; the episodes need the rows
            self._episode_rollout.rows = list(inputs)
        output = super()._generate_and_score_completions(inputs)
        if not self.sdpo_config.enabled:
            return output
        mode = "train" if self.model.training else "eval"
        stash, self._stash = self._stash, {}
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = self._total_rewards(stash["rewards_per_func"])
        self._log_success_fraction(rewards)
        global_rows = len(stash["prompts"])
        if global_rows % group_size:
            raise ValueError(
                f"the global batch has {global_rows} completions, not a multiple of the group size {group_size} "
                f"({'num_generations' if mode == 'train' else 'num_generations_eval'})"
            )
        # seeded from a string (hashed with sha512), so every process draws the same "random" demonstrations
        rng = random.Random(f"{self.args.seed}-{self.state.global_step}-{mode}")
        batch = build_teacher_batch(
            stash["prompts"],
            stash["completions"],
            rewards.tolist(),
            stash["feedback"],
            group_size=group_size,
            config=self.sdpo_config,
            tokenizer=self._tokenizer,
            chat_template_kwargs=self._teacher_chat_template_kwargs(),
            completion_lengths=stash["lengths"],
            rng=rng,
        )
        local_rows = output["completion_ids"].size(0)
        process_slice = slice(self.accelerator.process_index * local_rows,
                              (self.accelerator.process_index + 1) * local_rows)
        device = self.accelerator.device
        teacher_ids = [torch.tensor(ids, dtype=torch.long) for ids in batch.input_ids[process_slice]]
        output["teacher_prompt_ids"] = pad(teacher_ids, padding_value=self._tokenizer.pad_token_id,
                                           padding_side="left").to(device)
        output["teacher_prompt_mask"] = pad([torch.ones_like(t) for t in teacher_ids], padding_value=0,
                                            padding_side="left").to(device)
        sd_mask = torch.tensor(batch.sd_mask[process_slice], dtype=torch.float32, device=device)
        output["sd_mask"] = sd_mask
        output["sd_demo_mask"] = torch.tensor([kind == "demo" for kind in batch.row_kinds[process_slice]],
                                              dtype=torch.float32, device=device)
        output["sd_success"] = (rewards[process_slice] >= self.sdpo_config.success_reward_threshold).to(device)
        loss_mask = output["completion_mask"] * output.get("tool_mask", 1) * sd_mask.unsqueeze(1)
        output["sd_num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        for key, value in batch.metrics.items():
            self._metrics[mode][f"sdpo/{key}"].append(value)
        self._metrics[mode]["sdpo/demo_copy_overlap"].append(self._demo_copy_overlap(stash["completions"],
                                                                                     batch.demo_index))
        self._warn_if_no_signal(batch.metrics.get("reprompt_sample_fraction", 0.0))
        return output

    def _total_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """Weighted sum per completion `[B]`, as GRPO computes it; NaN where every function abstained."""
        weighted = rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = weighted.nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        return rewards

    def _log_success_fraction(self, rewards: torch.Tensor) -> None:
        """Completions reaching `success_reward_threshold`, logged in SDPO and GRPO runs alike (to compare)."""
        mode = "train" if self.model.training else "eval"
        successes = (rewards >= self.sdpo_config.success_reward_threshold).float().mean().item()
        self._metrics[mode]["sdpo/success_fraction"].append(successes)

    def _demo_copy_overlap(self, completions: Sequence[str], demo_index: Sequence[int | None]) -> float:
        """Mean `copy_overlap` of each completion with its demonstration, over rows with one (NaN: none)."""
        strip = self.sdpo_config.remove_thinking_from_demonstration
        overlaps = [diagnostics.copy_overlap(completions[row], strip_thinking(completions[demo]) if strip
                                             else completions[demo])
                    for row, demo in enumerate(demo_index) if demo is not None]
        return sum(overlaps) / len(overlaps) if overlaps else math.nan

    def _teacher_chat_template_kwargs(self) -> dict[str, Any]:
        """The student's template settings (tools, chat template, kwargs), then `apply_chat_template_kwargs`."""
        kwargs: dict[str, Any] = dict(self.chat_template_kwargs)  # type: ignore[arg-type]  # parsed to a dict
        if self.tools:
            kwargs["tools"] = self.tools
        if getattr(self, "chat_template", None) is not None:
            kwargs["chat_template"] = self.chat_template
        return kwargs

    def _warn_if_no_signal(self, reprompt_fraction: float) -> None:
        self._flat_generations = self._flat_generations + 1 if reprompt_fraction == 0.0 else 0
        if self._flat_generations == _FLAT_REWARD_WARN_AFTER:
            logger.warning(
                "SDPO: no completion had a teacher signal (no successful sibling and no feedback) for %d generation "
                "batches in a row; the loss is zero. Lower success_reward_threshold, raise num_generations, or use "
                "an environment that gives feedback.", _FLAT_REWARD_WARN_AFTER,
            )

    # ------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        cfg = self.sdpo_config
        if not cfg.enabled:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        if cfg.distillation_weight == 0.0:  # GRPO's loss exactly (the teacher is not consulted)
            ones = torch.ones_like(inputs["sd_mask"])
            self._log_routing_metrics(mode, ones, ones * 0.0)
            return super()._compute_loss(model, inputs)
        policy_rows = distill_rows = None
        if cfg.route_by_success:
            policy_rows, distill_rows = route_rows(inputs["sd_success"], inputs["sd_mask"])
        elif self._policy_term:
            policy_rows, distill_rows = torch.ones_like(inputs["sd_mask"]), inputs["sd_mask"]
        if distill_rows is not None:  # rows routed away from the distillation skip the teacher too
            inputs = {**inputs, "sd_mask": distill_rows}
        sd_mask = inputs["sd_mask"]  # [B]
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1) * sd_mask.unsqueeze(1)  # [B, T]
        weights = self._token_weights(inputs, mask, mode)  # [B, T]
        terms_of = self._distillation_from_hidden if self._hidden_state_path else self._distillation_from_logits
        terms = terms_of(model, inputs, weights)
        student_token_logps = terms.student_token_logps
        if not sd_mask.any():  # lasgroup/SDPO dp_actor.py:848: no teacher signal in this micro-batch
            self._metrics[mode]["sdpo/empty_target_batch"].append(1.0)
        is_ratio = sdpo_loss.importance_weight(student_token_logps, inputs.get("old_per_token_logps"), cfg.is_clip)
        loss = terms.loss
        reported = loss.detach()
        if mode == "train" and cfg.loss_aggregation == "sequence_mean":  # log the loss before GA's scaling
            reported = reported * self.current_gradient_accumulation_steps

        self._log_loss_metrics(mode, reported, inputs, mask, terms, is_ratio)
        if policy_rows is None or distill_rows is None:  # both are set, or neither
            return loss
        policy_loss = self._policy_loss(inputs, student_token_logps, policy_rows, mode)
        self._log_routing_metrics(mode, policy_rows, distill_rows)
        if cfg.route_by_success:
            return loss + policy_loss
        return cfg.distillation_weight * loss + (1.0 - cfg.distillation_weight) * policy_loss

    def _token_weights(self, inputs, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """Each token's weight `[B, T]` in this micro-batch's SDPO loss (the loss is Σ weight·ρ·ℓ, ρ the importance
        ratio): the aggregation's, times the vLLM rollout correction as GRPO applies it, scaled for gradient
        accumulation. Known before the forward, so the hidden-state loss takes its gradient in the same pass."""
        cfg = self.sdpo_config
        if cfg.loss_aggregation == "sequence_mean":
            weights = sdpo_loss.aggregation_weights(mask, mode="sequence_mean", num_sequences=mask.size(0))
            if mode == "train":
                weights = weights / self.current_gradient_accumulation_steps
        else:
            normalizer = inputs["sd_num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self._steps_per_generation
            weights = sdpo_loss.aggregation_weights(mask, mode="token_mean", num_active_tokens=normalizer)
        if "importance_sampling_ratio" in inputs:
            weights = weights * inputs["importance_sampling_ratio"]
        return weights

    def _policy_loss(self, inputs, per_token_logps: torch.Tensor, rows: torch.Tensor, mode: str) -> torch.Tensor:
        """GRPO's loss on `rows`, from the log-probs (with grad) of the distillation's own student forward.

        Scaled for gradient accumulation as `GRPOTrainer._compute_loss` scales it, so it adds to SDPO's term.
        """
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)  # [B, T]
        per_token_loss = policy_per_token_loss(
            per_token_logps, inputs.get("old_per_token_logps"), inputs["advantages"], mask,
            loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=self.args.delta, importance_sampling_level=self.importance_sampling_level,
            rollout_ratio=inputs.get("importance_sampling_ratio") if self.use_vllm
            and self.vllm_importance_sampling_correction else None,
            ref_per_token_logps=inputs.get("ref_per_token_logps"), beta=self.beta,
            bias_correction_kl=self.args.use_bias_correction_kl,
        )  # [B, T] or [B, 1]
        num_items = None
        if self.loss_type in ("dapo", "cispo"):
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self._steps_per_generation
        loss = aggregate_policy_loss(per_token_loss, mask, loss_type=self.loss_type, rows=rows,
                                     max_completion_length=self.max_completion_length, num_items=num_items)
        self._metrics[mode]["sdpo/policy_loss"].append(self.accelerator.gather(loss.detach()).mean().item())
        if mode == "train" and num_items is None:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    @torch.no_grad()
    def _log_routing_metrics(self, mode: str, policy_rows: torch.Tensor, distill_rows: torch.Tensor) -> None:
        """Which rows trained on GRPO's term and which on the distillation (a row may take both in a blend)."""
        gather = self.accelerator.gather
        self._metrics[mode]["sdpo/policy_row_fraction"].append(gather(policy_rows.float()).mean().item())
        self._metrics[mode]["sdpo/distillation_row_fraction"].append(gather(distill_rows.float()).mean().item())

    def _inputs_for(self, inputs, prompt_key: str):
        """Prompt + completion ids and mask, with `prompt_key` the student's or the teacher's prompt."""
        prompt_ids, prompt_mask = inputs[f"{prompt_key}_ids"], inputs[f"{prompt_key}_mask"]
        input_ids = torch.cat([prompt_ids, inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([prompt_mask, inputs["completion_mask"]], dim=1)
        return input_ids, attention_mask, inputs["completion_ids"].size(1) + 1

    def _teacher_rows(self, sd_mask: torch.Tensor) -> torch.Tensor | None:
        """Indices of the rows with a teacher signal when only those should go through the teacher and the loss;
        `None` for every row (all active, or sharded parameters: see `_teacher_on_all_rows`)."""
        if self._teacher_on_all_rows or bool(sd_mask.all()):
            return None
        return sd_mask.nonzero(as_tuple=True)[0]

    def _teacher_inputs(self, inputs, rows: torch.Tensor | None):
        """Teacher prompt + completion ids and mask, only the `rows` that go through the teacher (all for `None`)."""
        teacher_ids, teacher_mask, keep = self._inputs_for(inputs, "teacher_prompt")
        if rows is None:
            return teacher_ids, teacher_mask, keep
        return teacher_ids[rows], teacher_mask[rows], keep

    def _distillation_from_logits(self, model, inputs, weights: torch.Tensor):
        """The loss Σ weight·ρ·ℓ from full `[B, T, V]` logits (token-level and trust-region modes need them)."""
        cfg = self.sdpo_config
        completion_ids = inputs["completion_ids"]
        input_ids, attention_mask, keep = self._inputs_for(inputs, "prompt")
        student_logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                               use_cache=False).logits[:, :-1, :] / self.temperature  # [B, T, V]
        student_token_logps = sdpo_loss.sampled_token_logps(student_logits, completion_ids)  # [B, T]
        entropy = sdpo_loss.token_entropy(student_logits)  # [B, T]
        is_ratio = sdpo_loss.importance_weight(student_token_logps, inputs.get("old_per_token_logps"), cfg.is_clip)
        if not inputs["sd_mask"].any() and not self._teacher_on_all_rows:
            zero = student_token_logps * 0.0  # graph-connected
            return _DistillationTerms(zero, student_token_logps, student_token_logps.detach(), entropy,
                                      torch.zeros_like(entropy), sdpo_loss.weighted_token_sum(zero, weights))
        rows = self._teacher_rows(inputs["sd_mask"])
        student_rows_logps = student_token_logps
        if rows is not None:  # rows without a signal are masked out of the loss: skip their teacher forward
            student_logits, student_rows_logps = student_logits[rows], student_token_logps[rows]
            completion_ids = completion_ids[rows]
        assert self.teacher is not None  # set in __init__ whenever SDPO is enabled
        teacher_logits = self.teacher.logits(model, *self._teacher_inputs(inputs, rows))
        teacher_logits = teacher_logits[:, :-1, :] / (self.temperature * cfg.teacher_temperature)  # [b, T, V]
        teacher_token_logps = sdpo_loss.sampled_token_logps(teacher_logits, completion_ids)  # [b, T]
        teacher_entropy = sdpo_loss.token_entropy(teacher_logits)  # [b, T]
        if cfg.full_logit_distillation:
            per_token_loss = sdpo_loss.chunked_per_token_distillation_loss(
                student_logits, teacher_logits, alpha=cfg.alpha, topk=cfg.distillation_topk,
                add_tail=cfg.distillation_add_tail, chunk_size=cfg.distillation_chunk_size,
            )  # [b, T]
        else:
            per_token_loss = sdpo_loss.token_level_reverse_kl(student_rows_logps, teacher_token_logps)
        if rows is not None:
            per_token_loss, teacher_token_logps, teacher_entropy = _scatter_rows(
                rows, student_token_logps.size(0), per_token_loss, teacher_token_logps, teacher_entropy)
        loss = sdpo_loss.weighted_token_sum(per_token_loss * is_ratio, weights)
        return _DistillationTerms(per_token_loss, student_token_logps, teacher_token_logps, entropy, teacher_entropy,
                                  loss)

    def _distillation_from_hidden(self, model, inputs, weights: torch.Tensor):
        """The loss Σ weight·ρ·ℓ from final hidden states and the LM heads, its gradient taken in the same pass
        (`weighted_distillation_loss`): `[B, T, V]` logits never exist, and each chunk meets the heads once."""
        cfg = self.sdpo_config
        completion_ids = inputs["completion_ids"]
        input_ids, attention_mask, keep = self._inputs_for(inputs, "prompt")
        student_hidden = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                               sdpo_hidden_states=True)[:, :-1, :]  # [B, T, H]
        student_head = lm_head(model)
        policy_logps = None
        if self._policy_term:  # GRPO's term needs every row's sampled-token log-probs, with grad
            policy_logps = sdpo_loss.sampled_token_logps_from_hidden(
                student_hidden, *student_head, completion_ids, temperature=self.temperature,
                chunk_size=cfg.distillation_chunk_size,
            )  # [B, T]
        if not inputs["sd_mask"].any():
            student_token_logps, entropy = sdpo_loss.token_stats_from_hidden(
                student_hidden, *student_head, completion_ids, temperature=self.temperature,
                chunk_size=cfg.distillation_chunk_size,
            )  # [B, T] each, no grad
            zero = student_hidden.sum(-1) * 0.0 + student_head.weight.sum() * 0.0  # graph-connected
            if policy_logps is not None:
                student_token_logps = policy_logps
            return _DistillationTerms(zero, student_token_logps, student_token_logps.detach(), entropy,
                                      torch.zeros_like(entropy), zero.sum())
        rows = self._teacher_rows(inputs["sd_mask"])
        active_hidden, active_ids, old_logps = student_hidden, completion_ids, inputs.get("old_per_token_logps")
        if rows is not None:  # rows without a signal are masked out of the loss: skip their teacher forward
            active_hidden, active_ids, weights = student_hidden[rows], completion_ids[rows], weights[rows]
            old_logps = None if old_logps is None else old_logps[rows]
        assert self.teacher is not None  # set in __init__ whenever SDPO is enabled
        teacher_hidden, teacher_head = self.teacher.hidden_states(model, *self._teacher_inputs(inputs, rows))
        teacher_hidden = teacher_hidden[:, :-1, :]  # [b, T, H]
        # the statistics come out of the loss's own chunk logits: no second pass through either LM head
        loss, per_token_loss, stats = sdpo_loss.weighted_distillation_loss(
            active_hidden, teacher_hidden, student_head.weight, teacher_head.weight, weights,
            temperature=self.temperature, alpha=cfg.alpha, topk=cfg.distillation_topk,
            add_tail=cfg.distillation_add_tail, chunk_size=cfg.distillation_chunk_size,
            student_lm_head_bias=student_head.bias, teacher_lm_head_bias=teacher_head.bias, token_ids=active_ids,
            old_token_logps=old_logps, is_clip=cfg.is_clip, teacher_temperature=cfg.teacher_temperature,
        )  # a scalar, then [b, T] each
        assert stats is not None  # token ids were given
        terms = _DistillationTerms(per_token_loss, stats.student_token_logps, stats.teacher_token_logps,
                                   stats.entropy, stats.teacher_entropy, loss)
        if rows is not None:
            # Rows without a signal get zeros in the teacher's terms; the loss mask and the trained-token metrics
            # exclude them. Every parameter still reaches the loss through the active rows, as DDP needs. The
            # student's statistics of those rows (which never went through the loss) are computed alone, for the
            # `entropy` metric over all completion tokens.
            per_token_loss, student_logps, teacher_logps, entropy, teacher_entropy = _scatter_rows(
                rows, student_hidden.size(0), *terms[:-1])
            terms = _DistillationTerms(per_token_loss, student_logps, teacher_logps, entropy, teacher_entropy, loss)
            skipped = (inputs["sd_mask"] == 0).nonzero(as_tuple=True)[0]
            skipped_logps, skipped_entropy = sdpo_loss.token_stats_from_hidden(
                student_hidden[skipped], *student_head, completion_ids[skipped], temperature=self.temperature,
                chunk_size=cfg.distillation_chunk_size,
            )  # [B - b, T] each, no grad
            terms = terms._replace(
                student_token_logps=terms.student_token_logps.index_copy(0, skipped, skipped_logps),
                entropy=terms.entropy.index_copy(0, skipped, skipped_entropy),
            )
        if policy_logps is not None:
            terms = terms._replace(student_token_logps=policy_logps)
        return terms

    @torch.no_grad()
    def _log_loss_metrics(self, mode, loss, inputs, mask, terms: _DistillationTerms, is_ratio) -> None:
        """This micro-batch's loss metrics, each a token mean over all processes (NaN when it has no token).

        `entropy` is the student's over all completion tokens, exactly as GRPO logs it, so SDPO and GRPO runs
        compare; the trained-token statistics are split by row kind (`diagnostics.kind_masks`).
        """
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        completion_mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        entropy_totals = self.accelerator.reduce(diagnostics.masked_totals([terms.entropy], completion_mask),
                                                 reduction="sum")
        metrics["entropy"].append(diagnostics.totals_to_means(entropy_totals, ["entropy"])["entropy"])

        values = {**terms._asdict(), "per_token_loss": terms.per_token_loss.detach(),
                  "k1": terms.student_token_logps - terms.teacher_token_logps,  # estimates KL(student‖teacher)
                  "is_ratio": is_ratio}
        names = [name for name, _, _ in _TOKEN_METRICS]
        kinds = diagnostics.kind_masks(mask, inputs["sd_demo_mask"])
        totals = self.accelerator.reduce(
            torch.stack([diagnostics.masked_totals([values[name] for name in names], kind_mask)
                         for kind_mask in kinds.values()]), reduction="sum")  # [kinds, metrics + 1]
        for kind, kind_totals in zip(kinds, totals, strict=True):
            means = diagnostics.totals_to_means(kind_totals, names)
            for name, overall, per_kind in _TOKEN_METRICS:
                if kind == "trained":
                    metrics[overall].append(means[name])
                elif per_kind is not None:
                    metrics[f"sdpo/{kind}/{per_kind}"].append(means[name])

        ratio_max = torch.where(mask.bool(), is_ratio, torch.zeros_like(is_ratio)).max()
        metrics["sdpo/distillation_loss"].append(gather(loss).mean().item())
        metrics["sdpo/is_ratio_max"].append(gather(ratio_max).max().item())
        metrics["sdpo/active_token_fraction"].append(
            (gather(mask.sum()).sum() / gather(torch.ones_like(mask).sum()).sum().clamp(min=1.0)).item()
        )

    # ---------------------------------------------------------------------------------- teacher update
    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(grad_norm) if grad_norm is not None else 0.0
        self._finite_step_in_generation |= grad_norm is None or math.isfinite(value)
        return grad_norm

    def _maybe_update_teacher(self) -> None:
        """EMA once per generation batch, after its last optimizer step (lasgroup/SDPO dp_actor.py:918-920)."""
        if self.teacher is None:
            return
        generate_every = self._steps_per_generation * self.num_iterations
        completed = self._step // generate_every
        if completed <= self._teacher_generations_done:
            return
        self._teacher_generations_done = completed
        cfg = self.sdpo_config
        generation = self._teacher_generations_offset + completed  # 1-based, across resumes
        if reset_due(generation, cfg.teacher_reset_every) and self._teacher_initial_state is not None:
            self.teacher.load_state_dict(self._teacher_initial_state)
            self._metrics["train"]["sdpo/teacher_reset"].append(1.0)
        elif self._finite_step_in_generation:
            if cfg.teacher_update_rate_schedule != "constant":
                total = generation_batches(self.state.max_steps, self.args.gradient_accumulation_steps,
                                           self._steps_per_generation, self.num_iterations)
                self.teacher.rate = scheduled_rate(cfg.teacher_update_rate, cfg.teacher_update_rate_final,
                                                   cfg.teacher_update_rate_schedule, generation - 1, total)
                self._metrics["train"]["sdpo/teacher_update_rate"].append(self.teacher.rate)
            self.teacher.update(self.model)
        else:
            logger.warning("SDPO: no finite gradient norm in this generation batch; teacher update skipped")
            self._metrics["train"]["sdpo/teacher_update_skipped"].append(1.0)
        self._finite_step_in_generation = False

    # ----------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Save `checkpoint-<step>` now (model, optimizer, trainer state and the teacher), as the Trainer does at
        its save steps: for a run stopped between them (an interrupt) that `resume_from_checkpoint` continues."""
        self._save_checkpoint(self.model, trial=None)

    def _save_checkpoint(self, model, trial):
        try:
            self._save_checkpoint_with_teacher(model, trial)
        except (OSError, RuntimeError) as exc:
            message = full_disk_message(self._get_output_dir(trial=trial), exc)
            if message is None:
                raise
            checkpoint = self._checkpoint_folder(trial)
            if self.args.should_save and os.path.isdir(checkpoint):
                # half written, it would be the checkpoint `--resume` picks as the latest; it also holds the space
                shutil.rmtree(checkpoint, ignore_errors=True)
                message += f" (the incomplete {checkpoint} was removed)"
            raise OSError(errno.ENOSPC, message) from exc

    def _checkpoint_folder(self, trial) -> str:
        """Where the Trainer writes this step's checkpoint."""
        return os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _save_checkpoint_with_teacher(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.teacher is None or not self.args.should_save:
            return
        checkpoint = self._checkpoint_folder(trial)
        state = self.teacher.state_dict()
        if state:
            torch.save(state, os.path.join(checkpoint, TEACHER_STATE_FILE))
        if self._teacher_initial_state is not None:
            torch.save(self._teacher_initial_state, os.path.join(checkpoint, TEACHER_INITIAL_STATE_FILE))
        generations = self._teacher_generations_offset + self._teacher_generations_done
        with open(os.path.join(checkpoint, TEACHER_META_FILE), "w") as f:
            json.dump({"teacher_mode": self.sdpo_config.teacher_mode, "updates": self.teacher.updates,
                       "generations": generations}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.teacher is None or checkpoint is None:
            return
        meta_path = os.path.join(checkpoint, TEACHER_META_FILE)
        if not os.path.exists(meta_path):
            logger.warning("SDPO: checkpoint %s has no teacher state; the teacher restarts from its current weights",
                           checkpoint)
            return
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["teacher_mode"] != self.sdpo_config.teacher_mode:
            raise ValueError(f"checkpoint teacher_mode {meta['teacher_mode']!r} differs from the configured "
                             f"{self.sdpo_config.teacher_mode!r}")
        state_path = os.path.join(checkpoint, TEACHER_STATE_FILE)
        if os.path.exists(state_path):
            self.teacher.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        self.teacher.updates = meta["updates"]
        # GRPOTrainer counts its micro-steps (`_step`) from 0 again after a resume; count generations likewise,
        # and keep the generations before the checkpoint as the rate schedule's and the reset's offset.
        self._teacher_generations_done = self._step // (self._steps_per_generation * self.num_iterations)
        self._teacher_generations_offset = meta.get("generations", meta["updates"]) - self._teacher_generations_done
        initial_path = os.path.join(checkpoint, TEACHER_INITIAL_STATE_FILE)
        if self._teacher_initial_state is not None and os.path.exists(initial_path):
            self._teacher_initial_state = torch.load(initial_path, map_location="cpu", weights_only=True)


def _check_policy_term(trainer: SDPOTrainer) -> None:
    """The same-forward GRPO term restates GRPO's loss for the common options only; refuse the others by name."""
    cfg, args = trainer.sdpo_config, trainer.args
    guard = "route_by_success" if cfg.route_by_success else f"distillation_weight={cfg.distillation_weight}"
    if trainer.loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"{guard} computes GRPO's loss beside the distillation for GRPOConfig.loss_type in "
                         f"{', '.join(POLICY_LOSS_TYPES)}; got loss_type={trainer.loss_type!r}")
    unsupported = [name for name, on in (
        ("top_entropy_quantile", args.top_entropy_quantile < 1.0),
        ("off_policy_mask_threshold", args.off_policy_mask_threshold is not None),
        ("entropy_coef / use_adaptive_entropy", trainer._entropy_bonus_enabled),
    ) if on]
    if unsupported:
        raise ValueError(f"{guard} does not reproduce GRPOConfig's {', '.join(unsupported)} in its GRPO term; "
                         "leave them at their defaults, or use distillation_weight=0 (GRPO's own loss)")


def _check_teacher_mode(mode: str, fresh_peft: bool, uses_peft: bool) -> None:
    if mode == "lora_ema" and not uses_peft:
        raise ValueError("teacher_mode='lora_ema' needs a PEFT model: pass peft_config= or a PeftModel")
    if mode == "ema" and fresh_peft:
        raise ValueError(
            "teacher_mode='ema' with peft_config would keep a second full copy of the base model as the teacher; "
            "use teacher_mode='lora_ema' (a second adapter, EMA on adapter weights) or pass a PeftModel instance"
        )


__all__: Sequence[str] = ["SDPOTrainer"]

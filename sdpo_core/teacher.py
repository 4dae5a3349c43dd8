"""The SDPO teacher: a second set of weights that scores the student's tokens under the teacher prompt.

Every strategy answers four calls: `logits(student, input_ids, attention_mask, logits_to_keep)` (raw
logits, no grad, not temperature-scaled), `hidden_states(student, input_ids, attention_mask, keep)` (final
hidden states and the LM head, for the memory-lean loss path), `update(student)` (once per generation batch,
after its optimizer steps) and `state_dict()`/`load_state_dict()` (checkpointing).

- `CopiedModelTeacher`: a full copy of the initial student, EMA-updated (`ema`) or never (`frozen`).
  The copy is made *before* GRPOTrainer patches `model.forward` with its fused LM head: a copy made
  after it keeps a closure over the student's original forward, so the "teacher" would silently run
  the student's weights (docs/peers.md SDPO-RL-1). `strip_patched_forward` guards against it.
- `LoraEMATeacher`: a second LoRA adapter `sdpo_teacher` on the student's base, initialised from the
  student's adapter; EMA touches the adapter weights only.
- `DisabledAdapterTeacher`: frozen teacher of a fresh LoRA run: the base with adapters disabled.
- `TrustRegionTeacher`: logits `(1 - c) * z_frozen + c * z_student` (lasgroup/SDPO dp_actor.py:51-64).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sdpo_core.modeling import LMHead, backbone_hidden_states, lm_head, unwrap

TEACHER_ADAPTER = "sdpo_teacher"


def strip_patched_forward(module: nn.Module) -> nn.Module:
    """Drop an instance-level `forward` (a patch copied along with the module) so the class forward runs."""
    module.__dict__.pop("forward", None)
    return module


def _forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    logits_to_keep: int) -> torch.Tensor:
    return model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, use_cache=False
    ).logits


@torch.no_grad()
def ema_update_(pairs: Iterator[tuple[torch.Tensor, torch.Tensor]], rate: float) -> int:
    """`teacher = (1 - rate) * teacher + rate * student`, accumulated in fp32, one parameter pair at a time.

    Returns the number of parameters updated. lasgroup/SDPO dp_actor.py:132-151.
    """
    count = 0
    for teacher_param, student_param in pairs:
        mixed = teacher_param.detach().float().mul_(1.0 - rate).add_(student_param.detach().float(), alpha=rate)
        teacher_param.data.copy_(mixed.to(teacher_param.dtype))
        count += 1
    return count


@contextlib.contextmanager
def _gathered(params: list[torch.Tensor]) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for an in-place update (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


class Teacher(abc.ABC):
    """One teacher strategy."""

    mode: str = ""
    updates: int = 0
    rate: float = 0.0  # the EMA rate; 0 for teachers that never move

    @abc.abstractmethod
    def logits(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               logits_to_keep: int) -> torch.Tensor:
        """Raw teacher logits `[B, logits_to_keep, V]`, computed without grad."""

    def hidden_states(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      keep: int) -> tuple[torch.Tensor, LMHead]:
        """Final hidden states `[B, keep, H]` and the LM head, without grad (the memory-lean path)."""
        raise NotImplementedError(f"{type(self).__name__} has no hidden-state path")

    def update(self, student: nn.Module) -> None:
        """Move the teacher toward the student (once per generation batch). Frozen teachers do nothing."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got {len(state)} tensors")


class CopiedModelTeacher(Teacher):
    """A separate full model: EMA-updated (`rate > 0`) or frozen (`rate == 0`)."""

    def __init__(self, module: nn.Module, rate: float, mode: str) -> None:
        self.module = strip_patched_forward(module)
        self.module.requires_grad_(False)
        self.module.eval()
        self.rate = rate
        self.mode = mode

    def logits(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               logits_to_keep: int) -> torch.Tensor:
        with torch.no_grad():
            return _forward_logits(self.module, input_ids, attention_mask, logits_to_keep)

    def hidden_states(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      keep: int) -> tuple[torch.Tensor, LMHead]:
        with torch.no_grad():
            return backbone_hidden_states(self.module, input_ids, attention_mask, keep), lm_head(self.module)

    def check_matches(self, student: nn.Module) -> None:
        """Fail early if the EMA could not pair every teacher parameter with a student parameter."""
        student_params = dict(unwrap(student).named_parameters())
        for name, param in unwrap(self.module).named_parameters():
            other = student_params.get(name)
            if other is None or (other.shape != param.shape and not hasattr(param, "ds_id")):
                raise ValueError(f"teacher parameter {name!r} has no student counterpart of the same shape")

    def update(self, student: nn.Module) -> None:
        if self.rate == 0.0:
            return
        student_params = dict(unwrap(student).named_parameters())
        for name, teacher_param in unwrap(self.module).named_parameters():
            student_param = student_params[name]
            with _gathered([teacher_param, student_param]):
                ema_update_(iter([(teacher_param, student_param)]), self.rate)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in unwrap(self.module).state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unwrap(self.module).load_state_dict(state, strict=True)


@contextlib.contextmanager
def _active_adapter(peft_model: Any, adapter: str, restore: str) -> Iterator[None]:
    """Run with `adapter` active and frozen, then restore `restore` as the trainable adapter."""
    peft_model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(restore)


class LoraEMATeacher(Teacher):
    """A second LoRA adapter on the student's own base model, EMA-updated on adapter weights only."""

    mode = "lora_ema"

    def __init__(self, student: nn.Module, rate: float) -> None:
        peft_model = unwrap(student)
        if not hasattr(peft_model, "peft_config"):
            raise ValueError("teacher_mode='lora_ema' needs a PEFT model (pass peft_config= or a PeftModel)")
        self.student_adapter = peft_model.active_adapter
        if TEACHER_ADAPTER not in peft_model.peft_config:
            config = peft_model.peft_config[self.student_adapter]
            peft_model.add_adapter(TEACHER_ADAPTER, config)
            peft_model.set_adapter(self.student_adapter)  # keeps only the student's adapter trainable
            ema_update_(self._pairs(peft_model), 1.0)  # initialise from the student's adapter (not zeros)
        self._model = peft_model
        self.rate = rate

    def _named_pairs(self, peft_model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        params = dict(peft_model.named_parameters())
        marker = f".{TEACHER_ADAPTER}."
        found = False
        for name, teacher_param in params.items():
            if marker in name:
                student_name = name.replace(marker, f".{self.student_adapter}.")
                yield name, teacher_param, params[student_name]
                found = True
        if not found:
            raise ValueError(f"the PEFT model has no parameters of adapter {TEACHER_ADAPTER!r}")

    def _pairs(self, peft_model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((t, s) for _, t, s in self._named_pairs(peft_model))

    def logits(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               logits_to_keep: int) -> torch.Tensor:
        peft_model = unwrap(student)
        with torch.no_grad(), _active_adapter(peft_model, TEACHER_ADAPTER, self.student_adapter):
            return _forward_logits(peft_model, input_ids, attention_mask, logits_to_keep)

    def hidden_states(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      keep: int) -> tuple[torch.Tensor, LMHead]:
        with torch.no_grad(), _active_adapter(self._model, TEACHER_ADAPTER, self.student_adapter):
            return backbone_hidden_states(self._model, input_ids, attention_mask, keep), lm_head(self._model)

    def update(self, student: nn.Module) -> None:
        for _, teacher_param, student_param in self._named_pairs(self._model):
            with _gathered([teacher_param, student_param]):
                ema_update_(iter([(teacher_param, student_param)]), self.rate)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().clone() for name, t, _ in self._named_pairs(self._model)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, teacher_param, _ in self._named_pairs(self._model):
                if name not in state:
                    raise KeyError(f"checkpointed teacher state lacks {name!r}")
                teacher_param.data.copy_(state[name].to(teacher_param.device, teacher_param.dtype))


class DisabledAdapterTeacher(Teacher):
    """Frozen teacher of a fresh LoRA run: the base model with every adapter disabled."""

    mode = "frozen"

    def logits(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               logits_to_keep: int) -> torch.Tensor:
        peft_model = unwrap(student)
        with torch.no_grad(), peft_model.disable_adapter():
            return _forward_logits(peft_model, input_ids, attention_mask, logits_to_keep)

    def hidden_states(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      keep: int) -> tuple[torch.Tensor, LMHead]:
        peft_model = unwrap(student)
        with torch.no_grad(), peft_model.disable_adapter():
            return backbone_hidden_states(peft_model, input_ids, attention_mask, keep), lm_head(peft_model)


class TrustRegionTeacher(Teacher):
    """Interpolates a frozen teacher's logits with the live student's: `(1 - c) z_ref + c z_student`."""

    mode = "trust_region"

    def __init__(self, reference: Teacher, rate: float) -> None:
        self.reference = reference
        self.rate = rate

    def logits(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               logits_to_keep: int) -> torch.Tensor:
        reference_logits = self.reference.logits(student, input_ids, attention_mask, logits_to_keep)
        with torch.no_grad():
            student_logits = _forward_logits(unwrap(student), input_ids, attention_mask, logits_to_keep)
        return torch.lerp(reference_logits.float(), student_logits.float(), self.rate)  # lasgroup/SDPO dp_actor.py:51

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.reference.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reference.load_state_dict(state)

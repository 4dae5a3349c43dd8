"""How SDPO reaches inside a causal LM: its backbone's hidden states and its output head.

The memory-lean loss path projects final hidden states through the LM head chunk by chunk, so the
`[B, T, V]` logits never exist. The student's forward must still go through the (DDP-)wrapped model, or
gradient synchronisation is skipped; `add_hidden_states_forward` adds a keyword to the model's own forward
for that, the way TRL adds its fused LM head.
"""

from __future__ import annotations

import functools
import types
from typing import Any, NamedTuple

import torch
from torch import nn


class LMHead(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None


def unwrap(model: nn.Module) -> Any:
    """The user-level module under DDP-style wrappers (`.module`).

    Typed `Any`: what comes back is a transformers or PEFT model, whose methods (`get_output_embeddings`,
    `set_adapter`, `peft_config`, ...) `nn.Module`'s type does not know.
    """
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def causal_lm(model: nn.Module) -> Any:
    """The `*ForCausalLM` module: under DDP-style wrappers and under a PEFT model."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def lm_head(model: nn.Module) -> LMHead:
    """The output projection's weight `[V, H]` and bias of a causal LM."""
    head = causal_lm(model).get_output_embeddings()
    return LMHead(head.weight, head.bias)


def backbone_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           keep: int) -> torch.Tensor:
    """Final (normed) hidden states of the last `keep` positions `[B, keep, H]`, skipping the LM head."""
    outputs = causal_lm(model).base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return outputs.last_hidden_state[:, -keep:, :]





def supports_hidden_state_path(model: nn.Module) -> bool:
    """True when logits are exactly `hidden @ W.T + b`: a plain linear head, no soft-capping or scaling."""
    lm = causal_lm(model)
    config = lm.config.get_text_config()
    scaling = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    scaled = any(getattr(config, name, None) is not None for name in scaling)
    head = lm.get_output_embeddings()
    return type(head) is nn.Linear and not scaled and hasattr(lm, "base_model") and lm.base_model is not lm


def add_hidden_states_forward(model: nn.Module) -> None:
    """Let `model(..., sdpo_hidden_states=True, logits_to_keep=k)` return hidden states `[B, k, H]`.

    Any other call goes to the forward the model had before (TRL's fused-head forward included).
    """
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: nn.Module, *args: Any, sdpo_hidden_states: bool = False, **kwargs: Any) -> Any:
        if not sdpo_hidden_states:
            return previous(*args, **kwargs)
        hidden = backbone_hidden_states(self, kwargs["input_ids"], kwargs["attention_mask"], kwargs["logits_to_keep"])
        # The head is applied outside this forward; a zero-valued use keeps it in the forward graph, so DDP with
        # find_unused_parameters=True does not mark it unused and then see its gradient arrive.
        head = self.get_output_embeddings()  # type: ignore[operator]  # a transformers model's method
        anchor = head.weight.sum() * 0.0 + (0.0 if head.bias is None else head.bias.sum() * 0.0)
        return hidden + anchor

    model.forward = types.MethodType(forward, model)

"""How SDPO reaches inside a causal LM: its backbone's hidden states and its output head.

The memory-lean loss path projects final hidden states through the LM head chunk by chunk, so the
`[B, T, V]` logits never exist. The student's forward must still go through the (DDP-)wrapped model, or
gradient synchronisation is skipped; `add_hidden_states_forward` adds a keyword to the model's own forward
for that, the way TRL adds its fused LM head.
"""

from __future__ import annotations

import functools
import inspect
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
    """Final (normed) hidden states of the last `keep` positions `[B, keep, H]`, skipping the LM head.

    Without autograd (the teacher), rows whose first `L - keep` tokens and mask are identical go through them once
    when that saves work (`shared_prefix_pays`): the failures of a group share one demonstration, so their teacher
    prompts are the same. Same positions and mask as one pass over every row, so the same values up to rounding.
    The number of forward calls then depends on the data: not for parameters sharded across ranks (ZeRO-3/FSDP
    gather them inside each call), which the trainer never sends here.
    """
    lm = causal_lm(model)
    prefix_length = input_ids.size(1) - keep
    if prefix_length > 0 and not torch.is_grad_enabled() and _keeps_a_cache(lm):
        first, group = distinct_rows(input_ids[:, :prefix_length], attention_mask[:, :prefix_length])
        if shared_prefix_pays(first.numel(), input_ids.size(0), prefix_length, keep):
            return _shared_prefix_hidden_states(lm, input_ids, attention_mask, prefix_length, first, group)
    outputs = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return outputs.last_hidden_state[:, -keep:, :]


def _keeps_a_cache(lm: Any) -> bool:
    """Whether a forward fills a KV cache: not for stateful (recurrent) models, and not under gradient
    checkpointing in training mode, where transformers turns the cache off (a LoRA teacher runs inside the
    training student)."""
    # transformers 5.x renamed the property; read through the class so the deprecated one is not touched
    name = "is_activation_checkpointing" if hasattr(type(lm), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    checkpointing = getattr(lm, name, False) and lm.training
    return not getattr(lm, "_is_stateful", False) and not checkpointing


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row of each distinct `(ids, mask)` row `[U]`, and the index into those of every row `[B]`."""
    _, group = torch.unique(torch.cat([ids, mask.to(ids.dtype)], dim=1), dim=0, return_inverse=True)  # [B]
    rows = torch.arange(ids.size(0), device=ids.device)
    first = torch.full((int(group.max()) + 1,), ids.size(0), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, group, rows, reduce="amin")  # [U]
    return first, group


def shared_prefix_pays(distinct: int, rows: int, prefix_length: int, keep: int) -> bool:
    """Whether one pass over the `distinct` prefixes plus one over every row's last `keep` positions costs at most
    90 % of the token positions of one pass over everything (two forward calls are not free)."""
    return distinct * prefix_length + rows * keep <= 0.9 * rows * (prefix_length + keep)


def _shared_prefix_hidden_states(lm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 prefix_length: int, first: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The distinct prefixes fill a KV cache, copied to their rows; then every row's last positions attend to it."""
    from transformers import DynamicCache

    backbone = lm.base_model
    # transformers renamed the keyword `past_key_values` to `cache` within the 5.x range we support
    cache_keyword = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    cache = DynamicCache(config=lm.config)
    backbone(input_ids=input_ids[first, :prefix_length], attention_mask=attention_mask[first, :prefix_length],
             use_cache=True, **{cache_keyword: cache})
    if cache.get_seq_length() != prefix_length:  # the rows' last positions would attend to no prompt at all
        raise RuntimeError(f"{type(lm).__name__} did not fill its KV cache over the {prefix_length} shared prompt "
                           "positions; the teacher's shared-prefix pass cannot be used with this model")
    cache.reorder_cache(group.long())  # type: ignore[arg-type]  # [U, ...] -> [B, ...]
    outputs = backbone(input_ids=input_ids[:, prefix_length:], attention_mask=attention_mask, use_cache=True,
                       **{cache_keyword: cache})
    return outputs.last_hidden_state  # [B, keep, H]


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

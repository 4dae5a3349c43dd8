"""`sdpo_core.modeling`: the teacher's pass over shared prompt prefixes gives what one pass over every row gives."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from sdpo_core.modeling import backbone_hidden_states, causal_lm, distinct_rows, shared_prefix_pays
from sdpo_core.testing import tiny_model, tiny_tokenizer

PROMPT, COMPLETION = 12, 5


def test_distinct_rows_against_brute_force():
    ids = torch.tensor([[0, 5, 6], [1, 2, 3], [0, 5, 6], [0, 5, 6], [1, 2, 3], [0, 5, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]])
    first, group = distinct_rows(ids, mask)
    for a, b in itertools.combinations(range(ids.size(0)), 2):
        same = torch.equal(ids[a], ids[b]) and torch.equal(mask[a], mask[b])
        assert (group[a] == group[b]) == same  # the same mask with other ids, or other mask, is another group
    for row in range(ids.size(0)):
        representative = first[group[row]]
        assert representative <= row  # the first row of its group
        assert torch.equal(ids[representative], ids[row])
        assert torch.equal(mask[representative], mask[row])
    assert first.numel() == 4


def test_sharing_pays_only_when_prefixes_repeat_enough():
    assert shared_prefix_pays(distinct=2, rows=8, prefix_length=88, keep=31)  # 2·88 + 8·31 = 424 of 952
    assert not shared_prefix_pays(distinct=8, rows=8, prefix_length=88, keep=31)  # nothing shared
    assert not shared_prefix_pays(distinct=7, rows=8, prefix_length=10, keep=31)  # too little shared


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Six rows, left-padded prompts: two share prompt A, three share prompt B (padded by 3), one has prompt C;
    every completion differs and one ends in padding."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (PROMPT,), generator=generator) for _ in range(3)]
    rows, masks = [], []
    for prompt_index, pad in [(0, 0), (1, 3), (0, 0), (1, 3), (2, 1), (1, 3)]:
        prompt = prompts[prompt_index].clone()
        prompt[:pad] = 0
        completion = torch.randint(5, 400, (COMPLETION,), generator=generator)
        rows.append(torch.cat([prompt, completion]))
        masks.append(torch.cat([torch.zeros(pad), torch.ones(PROMPT - pad + COMPLETION)]).long())
    ids, mask = torch.stack(rows), torch.stack(masks)
    mask[2, -2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_tokenizer()).eval()


def _count_backbone_calls(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    backbone = causal_lm(model).base_model
    real = backbone.forward

    @functools.wraps(real)  # keeps the signature, which tells which cache keyword the model takes
    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].size(0))
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone, "forward", counted)
    return calls


def test_teacher_pass_over_shared_prefixes_equals_one_pass_over_everything(model, monkeypatch):
    ids, mask = _batch()
    keep = COMPLETION + 1
    with torch.no_grad():
        plain = causal_lm(model).base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        calls = _count_backbone_calls(model, monkeypatch)
        shared = backbone_hidden_states(model, ids, mask, keep)
    assert calls == [3, 6]  # the three distinct prefixes once, then every row's last `keep` positions
    torch.testing.assert_close(shared, plain.last_hidden_state[:, -keep:], rtol=1e-5, atol=1e-5)


def test_student_pass_with_autograd_is_one_plain_pass(model, monkeypatch):
    ids, mask = _batch()
    calls = _count_backbone_calls(model, monkeypatch)
    hidden = backbone_hidden_states(model, ids, mask, COMPLETION + 1)
    assert calls == [6]
    assert hidden.requires_grad


def test_a_model_whose_cache_is_off_goes_through_everything_at_once(monkeypatch):
    # a LoRA teacher runs inside the training student; under gradient checkpointing transformers turns the cache
    # off, so the shared pass would leave the completions without their prompt
    model = tiny_model(tiny_tokenizer())
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask = _batch()
    calls = _count_backbone_calls(model, monkeypatch)
    with torch.no_grad():
        backbone_hidden_states(model, ids, mask, COMPLETION + 1)
    assert calls == [6]

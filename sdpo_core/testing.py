"""Tiny, hub-free artefacts for tests, examples and benchmarks.

A random `LlamaForCausalLM` and a byte-level BPE tokenizer trained in memory, with a ChatML chat
template, so that a whole SDPO step runs on a CPU in well under a second and without network.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 2 + 3? The answer is 5.",
    "Write a function that returns the sum of a list. def f(xs): return sum(xs)",
    "Correctly solve the original question. Correct solution: feedback from your unsuccessful earlier attempt",
    "print(input()) for i in range(10): x = int(input()) + 1",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ \\boxed{42} ```python```",
    "system user assistant You are a helpful assistant. Wrong Answer Runtime Error Expected Output Input",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A ChatML byte-level BPE tokenizer; `<|im_end|>` is EOS, `<|endoftext|>` is padding."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(tokenizer: PreTrainedTokenizerFast | None = None, *, seed: int = 0, hidden_size: int = 64,
               num_layers: int = 2) -> LlamaForCausalLM:
    """A random 2-layer Llama sized to `tokenizer`'s vocabulary."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def fit_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], *,
                max_steps: int = 400, target_loss: float = 0.003) -> None:
    """Fit a tiny model to continue each rendered `context` with its `target` text (loss on the target only), so a
    test can rely on what it writes (a random model writes nothing useful). Raises if it does not get there."""
    rows, lengths = [], []
    for context, target in pairs:
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        rows.append(tokenizer(context, add_special_tokens=False)["input_ids"] + target_ids)
        lengths.append(len(target_ids))
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    labels = torch.full_like(ids, -100)
    for row, n in enumerate(lengths):
        labels[row, -n:] = ids[row, -n:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(max_steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < target_loss:
            return
    raise AssertionError(f"the tiny model did not learn its answers (loss {loss.item():.4f})")


def save_tiny_model(folder: str | os.PathLike[str]) -> str:
    """Save `tiny_model` and `tiny_tokenizer` into `folder`, for what loads a model by path (the `sdpo` CLI, the
    benchmarks, vLLM); returns the folder as a string."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return os.fspath(folder)


"""The CUDA paths: the hidden-state losses on CUDA equal CPU, an SDPO step in bf16 on CUDA, and vLLM colocate.

Marked `gpu` and skipped without a CUDA device (and, for vLLM, without vllm installed); CI on CPU deselects them.
Run them on a GPU machine with `python -m pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_core import SDPOConfig, SDPOTrainer
from sdpo_core import loss as sdpo_loss
from sdpo_core.testing import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_state_loss_on_cuda_equals_cpu(dtype):
    tokens, hidden_size, vocab = 24, 32, 300
    student_hidden, teacher_hidden = _random(tokens, hidden_size, seed=1), _random(tokens, hidden_size, seed=2)
    student_head, teacher_head = _random(vocab, hidden_size, seed=3), _random(vocab, hidden_size, seed=4)

    def run(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = student_hidden.to(device, dtype).requires_grad_()
        head = student_head.to(device, dtype).requires_grad_()
        loss = sdpo_loss.chunked_distillation_loss(
            hidden, teacher_hidden.to(device, dtype), head, teacher_head.to(device, dtype),
            alpha=0.5, topk=8, add_tail=True, temperature=0.7, chunk_size=5)
        hidden_grad, head_grad = torch.autograd.grad(loss.sum(), [hidden, head])
        return loss.detach().float().cpu(), hidden_grad.float().cpu(), head_grad.float().cpu()

    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for on_cpu, on_cuda in zip(run("cpu"), run("cuda"), strict=True):
        torch.testing.assert_close(on_cuda, on_cpu, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_loss_on_cuda_equals_cpu(dtype):
    """The trainer's path (gradient taken in forward, logit buffers reused per chunk) on CUDA."""
    tokens, hidden_size, vocab = 24, 32, 300
    student_hidden, teacher_hidden = _random(tokens, hidden_size, seed=5), _random(tokens, hidden_size, seed=6)
    student_head, teacher_head = _random(vocab, hidden_size, seed=7), _random(vocab, hidden_size, seed=8)
    weights, ids = _random(tokens, seed=9).abs(), torch.arange(tokens) * 7 % vocab

    def run(device: str) -> tuple[torch.Tensor, ...]:
        hidden = student_hidden.to(device, dtype).requires_grad_()
        head = student_head.to(device, dtype).requires_grad_()
        out = sdpo_loss.weighted_distillation_loss(
            hidden, teacher_hidden.to(device, dtype), head, teacher_head.to(device, dtype), weights.to(device),
            alpha=0.5, topk=8, add_tail=True, temperature=0.7, chunk_size=5, token_ids=ids.to(device))
        hidden_grad, head_grad = torch.autograd.grad(out.loss, [hidden, head])
        return (out.loss.detach().cpu(), out.stats.entropy.cpu(), hidden_grad.float().cpu(),
                head_grad.float().cpu())

    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for on_cpu, on_cuda in zip(run("cpu"), run("cuda"), strict=True):
        torch.testing.assert_close(on_cuda, on_cpu, **tolerance)


def _steps(trainer: SDPOTrainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "sdpo/distillation_loss" in entry]


def test_sdpo_step_in_bf16_on_cuda(tokenizer, chat_dataset, make_args, feedback_reward):
    model = tiny_model(tokenizer, seed=0).to(torch.bfloat16)
    args = make_args(use_cpu=False, bf16=True)
    trainer = SDPOTrainer(model=model, reward_funcs=[feedback_reward()], args=args, train_dataset=chat_dataset,
                          processing_class=tokenizer, sdpo_config=SDPOConfig())
    steps = _steps(trainer)
    assert steps
    assert all(math.isfinite(s["sdpo/distillation_loss"]) for s in steps)
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert next(trainer.teacher.module.parameters()).device.type == "cuda"


def test_sdpo_step_with_vllm_colocate(tmp_path, tokenizer, chat_dataset, make_args, feedback_reward):
    pytest.importorskip("vllm")
    path = tmp_path / "tiny-llama"
    tiny_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = make_args(use_cpu=False, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2)
    trainer = SDPOTrainer(model=str(path), reward_funcs=[feedback_reward()], args=args, train_dataset=chat_dataset,
                          processing_class=tokenizer, sdpo_config=SDPOConfig())
    steps = _steps(trainer)
    assert steps
    assert all(math.isfinite(s["sdpo/distillation_loss"]) for s in steps)
    assert all("sdpo/is_ratio_mean" in s for s in steps)

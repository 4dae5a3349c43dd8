"""Shared fixtures: a tiny hub-free model, tokenizer and dataset, a trainer factory, and a disk's free space."""

from __future__ import annotations

import os
from collections import namedtuple

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig

from sdpo_core import disk_space
from sdpo_core.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # so `sdpo train` run in-process keeps it (sdpo_core.app.cpu_threads)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_model(tokenizer, seed=0)


@pytest.fixture
def chat_dataset():
    questions = ["What is 2 + 3?", "What is 4 + 1?", "What is 6 + 2?", "What is 1 + 1?"] * 4
    return Dataset.from_dict({
        "prompt": [[{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": q}] for q in questions],
        "answer": ["5", "5", "8", "2"] * 4,
    })


@pytest.fixture
def make_args(tmp_path):
    """A factory of GRPOConfigs for 1-2 CPU steps of the tiny model."""

    def make(**overrides) -> GRPOConfig:
        return GRPOConfig(**{**_ARGS, "output_dir": str(tmp_path / "out"), **overrides})

    return make


@pytest.fixture
def free_bytes(monkeypatch):
    """Set the free space every disk reports to the checkpoint writer's full-disk check."""
    usage = namedtuple("usage", "total used free")

    def set_free(free: int) -> None:
        monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - free, free))

    return set_free


@pytest.fixture
def feedback_reward():
    """The `FeedbackReward` class."""
    return FeedbackReward


_ARGS = {
    "per_device_train_batch_size": 4,
    "num_generations": 4,
    "max_completion_length": 8,
    "max_steps": 2,
    "learning_rate": 1e-2,
    "report_to": "none",
    "use_cpu": True,
    "logging_steps": 1,
    "save_strategy": "no",
    "seed": 0,
    "temperature": 1.0,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


class FeedbackReward:
    """Reward 1 on rows chosen by `succeed(row)`, else 0 with a feedback text naming the row."""

    def __init__(self, succeed=lambda row: False, text="FEEDBACK-{row}"):
        self.succeed = succeed
        self.text = text
        self.last_feedback = None
        self.calls = 0
        self.__name__ = "feedback_reward"

    def __call__(self, prompts, completions, **kwargs):
        base = self.calls * len(prompts)
        self.calls += 1
        rewards, feedback = [], []
        for i in range(len(prompts)):
            ok = self.succeed(base + i)
            rewards.append(1.0 if ok else 0.0)
            feedback.append("" if ok else self.text.format(row=base + i))
        self.last_feedback = feedback
        return rewards

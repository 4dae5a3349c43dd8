"""`CollapseWatchCallback`: warnings once per episode on synthetic logs, and a real checkpoint-and-stop."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import TrainerControl, TrainerState

from sdpo_core import SDPOConfig, SDPOTrainer
from sdpo_core.app.collapse import CollapseThresholds, CollapseWatchCallback
from sdpo_core.testing import tiny_model

TIGHT = CollapseThresholds(early_steps=2, recent_steps=2, clipped_steps=2, reward_window=2)


def _feed(callback, logs_per_step, caplog):
    """Send one training log per step; return the control after each and the warnings logged."""
    state = TrainerState()
    state.is_world_process_zero = True
    controls = []
    with caplog.at_level(logging.WARNING, logger="sdpo_core.app.collapse"):
        for step, logs in enumerate(logs_per_step, start=1):
            state.global_step = step
            controls.append(callback.on_log(None, state, TrainerControl(), logs=logs))
    return controls, [r.getMessage() for r in caplog.records if r.name == "sdpo_core.app.collapse"]


def test_reward_fall_warns_once_per_episode(caplog):
    # 2-step means from step 2: 0.6, 0.55, 0.3 (fall), 0.1, 0.35 (still 0.25 below), 0.6 (recovered), 0.35 (fall)
    rewards = [0.6, 0.6, 0.5, 0.1, 0.1, 0.6, 0.6, 0.1, 0.1]
    callback = CollapseWatchCallback(TIGHT)
    controls, warnings = _feed(callback, [{"reward": r, "entropy": 1.0} for r in rewards], caplog)
    assert [(e.step, e.signature) for e in callback.episodes] == [(4, "reward falling"), (8, "reward falling")]
    assert len(warnings) == 2
    assert "step 4, reward falling: mean reward over the last 2 steps is 0.3, 0.3 below its running peak 0.6" \
        in warnings[0]
    assert "training goes on" in warnings[0]
    assert not any(c.should_training_stop or c.should_save for c in controls)


def test_entropy_and_length_signatures_read_their_metrics(caplog):
    logs = [{"entropy": e, "completions/clipped_ratio": c, "reward": 0.5}
            for e, c in [(2.0, 0.0), (2.0, 0.95), (3.2, 0.9), (3.0, 0.2)]]
    callback = CollapseWatchCallback(TIGHT)
    _feed(callback, logs, caplog)
    assert [(e.step, e.signature) for e in callback.episodes] == [(3, "lengths pinned at the cap"),
                                                                  (4, "entropy surge")]


def test_eval_and_summary_logs_and_missing_values_are_not_steps(caplog):
    callback = CollapseWatchCallback(TIGHT)
    logs = [{"reward": 0.6}, {"eval_reward": 0.0}, {"train_runtime": 3.0, "reward": 0.0}, {"loss": 1.0},
            {"reward": 0.6}]
    _feed(callback, logs, caplog)
    assert callback.history["reward"] == [0.6, None, 0.6]
    assert callback.episodes == []


def test_stop_requests_a_checkpoint_and_a_stop(caplog):
    callback = CollapseWatchCallback(TIGHT, stop=True)
    controls, warnings = _feed(callback, [{"reward": r} for r in (0.8, 0.8, 0.1, 0.1)], caplog)
    assert callback.stopped_at == 3  # (0.8 + 0.1) / 2 is 0.35 below the peak 0.8
    assert not controls[1].should_save
    assert controls[2].should_save
    assert controls[2].should_training_stop
    assert "saving a checkpoint and stopping" in warnings[0]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("early_steps", 0, "early_steps must be >= 1"),
    ("clipped_level", 1.5, r"clipped_level must be in \(0, 1\]"),
    ("reward_margin", 0.0, "reward_margin must be > 0"),
])
def test_bad_thresholds_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        CollapseThresholds(**{field: value})


def test_real_run_stops_with_a_checkpoint_on_pinned_lengths(model, tokenizer, chat_dataset, make_args,
                                                            feedback_reward, tmp_path):
    """The random tiny model rarely ends a completion before the 8-token cap."""
    watch = CollapseWatchCallback(CollapseThresholds(clipped_level=0.5, clipped_steps=1), stop=True)
    trainer = SDPOTrainer(model=model, reward_funcs=[feedback_reward()], args=make_args(max_steps=3),
                          train_dataset=chat_dataset, processing_class=tokenizer, callbacks=[watch],
                          sdpo_config=SDPOConfig())
    trainer.train()
    assert trainer.state.log_history[0]["completions/clipped_ratio"] >= 0.5
    assert watch.stopped_at == 1
    assert trainer.state.global_step == 1
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert json.loads((checkpoint / "sdpo_teacher.json").read_text())["updates"] == 1
    assert [e.signature for e in watch.episodes] == ["lengths pinned at the cap"]


def test_grpo_runs_are_watched_too(tokenizer, chat_dataset, make_args, feedback_reward):
    watch = CollapseWatchCallback(CollapseThresholds(clipped_level=0.5, clipped_steps=1))
    trainer = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[feedback_reward()], args=make_args(max_steps=1),
                          train_dataset=chat_dataset, processing_class=tokenizer, callbacks=[watch],
                          sdpo_config=SDPOConfig(enabled=False))
    trainer.train()
    assert watch.history["entropy"][0] > 0
    assert [e.signature for e in watch.episodes] == ["lengths pinned at the cap"]

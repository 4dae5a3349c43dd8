"""Feedback and StepResult: small, frozen, validated, picklable (process workers send them back)."""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path

import pytest

from sdpo_envs import Feedback, StepResult


def test_feedback_defaults_and_coercion():
    feedback = Feedback(reward=1)
    assert feedback.reward == 1.0
    assert isinstance(feedback.reward, float)
    assert (feedback.text, feedback.success, dict(feedback.details)) == ("", False, {})
    assert Feedback(reward=None).reward is None


@pytest.mark.parametrize(("reward", "error"), [(True, TypeError), ("1", TypeError), (math.nan, ValueError),
                                               (math.inf, ValueError)])
def test_feedback_rejects_bad_rewards(reward, error):
    with pytest.raises(error, match="reward"):
        Feedback(reward=reward)


def test_feedback_rejects_non_text():
    with pytest.raises(TypeError, match="text"):
        Feedback(reward=0.0, text=None)  # type: ignore[arg-type]


def test_feedback_is_frozen_including_details():
    source = {"verdicts": ["AC"]}
    feedback = Feedback(reward=0.5, details=source)
    source["extra"] = 1  # the caller's dict is copied
    assert "extra" not in feedback.details
    with pytest.raises(dataclasses.FrozenInstanceError):
        feedback.reward = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        feedback.details["new"] = 1  # type: ignore[index]


def test_feedback_and_step_result_pickle_and_hash():
    feedback = Feedback(reward=0.5, text="t", success=True, details={"a": [1]})
    result = StepResult(feedback, done=True, info={"seconds": 0.1})
    for obj in (feedback, result):
        assert pickle.loads(pickle.dumps(obj)) == obj
    assert hash(feedback) == hash(Feedback(reward=0.5, text="t", success=True, details={"other": 1}))


def test_step_result_exposes_reward_and_failed():
    result = StepResult(Feedback(reward=None, details={"error": "boom"}))
    assert result.reward is None
    assert result.done
    assert result.feedback.failed
    assert not Feedback(reward=0.0).failed
    with pytest.raises(TypeError):
        StepResult(feedback=0.0)  # type: ignore[arg-type]


def test_types_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, sdpo_envs, sdpo_envs.testing; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])

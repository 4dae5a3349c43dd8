"""The Environment base: Gym style, batched evaluate, the failure policy, async scoring, formatting."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sdpo_envs import Environment, Feedback, InvalidResultError, StepResult
from sdpo_envs.testing import FakeEnvironment, check_environment


class EchoEnv(Environment):
    """Reward 1 if the completion equals the task's answer."""

    name = "echo"

    def score(self, task, completion):
        if completion == "RAISE":
            raise ValueError("cannot score this")
        ok = completion == task["answer"]
        return Feedback(reward=float(ok), text="" if ok else f"not {completion}", success=ok)


class AsyncEnv(Environment):
    async def score(self, task, completion):
        await asyncio.sleep(0.01)
        if completion == "SLOW":
            await asyncio.sleep(5)
        return Feedback(reward=1.0 if completion == task["answer"] else 0.0)


def test_reset_returns_prompt_and_step_ends_episode():
    env = EchoEnv()
    assert env.reset({"prompt": "say a", "answer": "a"}) == "say a"
    result = env.step("a")
    assert isinstance(result, StepResult)
    assert (result.reward, result.feedback.text, result.done) == (1.0, "", True)
    assert result.info["seconds"] >= 0
    assert env.step("b").feedback.text == "not b"


def test_step_before_reset_and_missing_prompt():
    env = EchoEnv()
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("a")
    with pytest.raises(KeyError, match="no 'prompt' field"):
        env.reset({"answer": "a"})


def test_step_accepts_conversational_completion():
    env = EchoEnv()
    env.reset({"prompt": "p", "answer": "a"})
    assert env.step([{"role": "assistant", "content": "a"}]).reward == 1.0


def test_evaluate_keeps_order_and_checks_lengths():
    env = EchoEnv()
    tasks = [{"answer": str(i)} for i in range(20)]
    completions = [str(i) if i % 2 else "x" for i in range(20)]
    rewards = [f.reward for f in env.evaluate(tasks, completions, max_workers=4)]
    assert rewards == [float(i % 2) for i in range(20)]
    assert env.evaluate([], []) == []
    with pytest.raises(ValueError, match="2 tasks but 1 completions"):
        env.evaluate([{}, {}], ["a"])


def test_raising_episode_gets_error_reward_and_is_counted(caplog):
    env = EchoEnv()
    with caplog.at_level(logging.WARNING, logger="sdpo_envs.env"):
        results = env.evaluate([{"answer": "a"}] * 3, ["a", "RAISE", "a"])
    assert [r.reward for r in results] == [1.0, 0.0, 1.0]
    failed = results[1]
    assert failed.failed
    assert not failed.success
    assert failed.text == ""
    assert failed.details["error"] == "ValueError: cannot score this"
    assert "Traceback" in failed.details["traceback"]
    assert env.error_count == 1
    assert "1 of 3 episodes could not be scored" in caplog.text
    assert "error_count=1" in caplog.text


def test_error_reward_is_configurable():
    env = EchoEnv()
    env.error_reward = None
    assert env.evaluate([{"answer": "a"}], ["RAISE"])[0].reward is None


def test_wrong_result_type_raises_invalid_result():
    class Bad(Environment):
        def score(self, task, completion):
            return 1.0

    with pytest.raises(InvalidResultError, match=r"Bad.score\(\) returned float, expected Feedback"):
        Bad().evaluate([{}], ["x"])


def test_score_batch_override_contract():
    class Batch(Environment):
        calls = 0

        def score(self, task, completion):
            raise AssertionError("not used")

        def score_batch(self, tasks, completions, *, extra, max_workers, timeout):
            self.calls += 1
            if extra.get("boom"):
                raise RuntimeError("batch failed")
            if extra.get("short"):
                return []
            return [Feedback(reward=float(len(c))) for c in completions]

    env = Batch()
    assert [f.reward for f in env.evaluate([{}, {}], ["a", "bb"])] == [1.0, 2.0]
    assert env.calls == 1
    failed = env.evaluate([{}, {}], ["a", "b"], extra={"boom": True})
    assert all(f.failed and "batch failed" in f.details["error"] for f in failed)
    assert env.error_count == 2
    with pytest.raises(InvalidResultError, match="returned 0 results for 2 episodes"):
        env.evaluate([{}, {}], ["a", "b"], extra={"short": True})


def test_async_score_runs_concurrently_with_timeout():
    env = AsyncEnv()
    results = env.evaluate([{"answer": "a"}] * 3, ["a", "b", "SLOW"], timeout=0.5)
    assert [r.reward for r in results] == [1.0, 0.0, 0.0]
    assert results[2].details["timed_out"] is True
    assert "timed out after 0.5 s" in results[2].details["error"]


def test_async_score_inside_a_running_loop():
    async def main():
        return AsyncEnv().evaluate([{"answer": "a"}], ["a"])

    assert asyncio.run(main())[0].reward == 1.0


def test_feedback_formatter_is_applied_and_failures_are_contained(caplog):
    env = EchoEnv()
    seen = []

    def formatter(task, result):
        seen.append((dict(task), result.info["completion"]))
        if result.feedback.text == "not boom":
            raise RuntimeError("formatter bug")
        return None if result.feedback.success else result.feedback.text.upper()

    env.feedback_formatter = formatter
    results = env.evaluate([{"answer": "a"}] * 3, ["a", "b", "boom"])
    assert [r.text for r in results] == ["", "NOT B", "not boom"]
    assert seen[1] == ({"answer": "a"}, "b")
    assert "formatter bug" in caplog.text


def test_fake_environment_passes_check_environment():
    assert check_environment(FakeEnvironment())[0].success


def test_check_environment_reports_broken_env():
    class Broken(Environment):
        def score(self, task, completion):
            raise RuntimeError("always")

    with pytest.raises(AssertionError, match="could not be scored: RuntimeError: always"):
        check_environment(Broken())

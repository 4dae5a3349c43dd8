"""evaluate() concurrency: threads overlap, timeouts fail episodes, process environments run elsewhere."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sdpo_envs import EnvironmentSetupError
from sdpo_envs.testing import FakeEnvironment


def test_threads_overlap_slow_episodes():
    env = FakeEnvironment(delay=0.2, max_workers=16)
    started = time.monotonic()
    results = env.evaluate([{"answer": "x"}] * 64, ["x"] * 64)
    elapsed = time.monotonic() - started
    assert all(r.success for r in results)
    # 64 x 0.2 s is 12.8 s in sequence; 4 waves of 16 take ~0.8 s. Generous bound for a shared machine.
    assert elapsed < 12.8 / 3, elapsed


def test_thread_timeout_fails_the_episode_without_waiting_for_it():
    env = FakeEnvironment(max_workers=4, episode_timeout=0.3)
    started = time.monotonic()
    results = env.evaluate([{"answer": "a"}, {"answer": "b", "delay": 3.0}, {"answer": "c"}], ["a", "b", "x"])
    assert time.monotonic() - started < 2.5
    assert [r.reward for r in results] == [1.0, 0.0, 0.0]
    assert results[1].details["timed_out"] is True
    assert results[1].details["error"] == "episode timed out after 0.3 s"
    assert not results[2].failed
    assert env.error_count == 1


def test_stuck_threads_are_replaced_so_the_rest_still_runs():
    env = FakeEnvironment(max_workers=2, episode_timeout=0.3)
    started = time.monotonic()
    tasks = [{"answer": "a", "delay": 30}, {"answer": "b", "delay": 30}, {"answer": "c"}, {"answer": "d"}]
    results = env.evaluate(tasks, ["a", "b", "c", "d"])
    assert time.monotonic() - started < 5
    assert [r.reward for r in results] == [0.0, 0.0, 1.0, 1.0]
    assert results[0].details["timed_out"] is True
    assert env.error_count == 2


@pytest.fixture
def process_env():
    env = FakeEnvironment(concurrency="process", max_workers=2, episode_timeout=1.0)
    yield env
    env.close()


def test_process_environment_runs_in_other_processes(process_env):
    results = process_env.evaluate([{"answer": str(i)} for i in range(6)], [str(i) for i in range(6)])
    assert all(r.success for r in results)
    pids = {r.details["pid"] for r in results}
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2
    # the pool persists across calls (TRL scores every step)
    again = process_env.evaluate([{"answer": "a"}] * 4, ["a"] * 4)
    assert {r.details["pid"] for r in again} <= pids


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_process_workers_do_not_import_torch(process_env):
    import torch  # noqa: F401  -- the trainer process has torch; its workers must not pay for it

    (result,) = process_env.evaluate([{"answer": "a"}], ["a"])
    maps = Path(f"/proc/{result.details['pid']}/maps").read_text()
    assert "torch" not in maps


def test_process_timeout_kills_the_worker_and_the_pool_recovers(process_env):
    started = time.monotonic()
    results = process_env.evaluate([{"answer": "a", "delay": 60}, {"answer": "b"}], ["a", "b"])
    assert time.monotonic() - started < 30
    assert results[0].failed
    assert results[0].details["timed_out"] is True
    assert results[0].details["error"] == "episode timed out after 1 s"
    assert results[1].success
    assert process_env.error_count == 1
    assert all(r.success for r in process_env.evaluate([{"answer": "a"}] * 3, ["a"] * 3))


def test_process_crash_fails_only_that_episode(process_env):
    results = process_env.evaluate([{"answer": "a"}] * 3, ["a", "CRASH", "a"])
    assert [r.reward for r in results] == [1.0, 0.0, 1.0]
    assert results[1].details["error"] == "the worker process died (exit code 3)"
    assert process_env.evaluate([{"answer": "a"}], ["a"])[0].success


def test_process_exception_is_a_failed_episode(process_env):
    results = process_env.evaluate([{"answer": "a"}] * 2, ["FAIL", "a"])
    assert results[0].details["error"] == "RuntimeError: fake failure"
    assert results[1].success


def test_close_stops_workers():
    env = FakeEnvironment(concurrency="process", max_workers=1)
    pid = env.evaluate([{"answer": "a"}], ["a"])[0].details["pid"]
    env.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_unpicklable_process_environment_is_a_clear_error():
    env = FakeEnvironment(concurrency="process")
    env.hook = lambda: None  # type: ignore[attr-defined]
    with pytest.raises(EnvironmentSetupError, match="must be picklable"):
        env.evaluate([{"answer": "a"}], ["a"])

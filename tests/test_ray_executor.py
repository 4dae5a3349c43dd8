"""Episodes on a Ray cluster (`executor="ray"`): a real local cluster of separate processes (a head node and a
worker node, started by `sdpo_envs.testing.local_ray_cluster`) scores what the local engine scores, in order,
with backpressure, and a worker that dies is retried once, then recorded as a failed episode."""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import sys
import time

import pytest

import sdpo_envs
from sdpo_core import SDPOConfig, SDPOTrainer
from sdpo_envs import EnvironmentSetupError, Feedback, InvalidResultError, make
from sdpo_envs.testing import FakeEnvironment, local_ray_cluster, registered_plugin

ray = pytest.importorskip("ray", reason='the Ray executor needs Ray: pip install "sdpo-gym[ray]"')
from sdpo_envs.ray_executor import RayExecutor  # noqa: E402 - after the skip when Ray is missing

TASKS = [{"prompt": f"q{i}", "answer": str(i)} for i in range(8)]
COMPLETIONS = [f"it is {i if i % 3 else i + 1}" for i in range(8)]  # every third one wrong


@pytest.fixture(scope="module")
def cluster():
    """The address of a local two-node cluster, this process connected to it for the module's tests."""
    # the test environments below are defined here, in a module the workers cannot import: ship them by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with local_ray_cluster(worker_nodes=1, cpus_per_node=1) as address:
        try:
            yield address
        finally:
            ray.shutdown()


def on_ray(env, address, **options):
    env.executor = RayExecutor(address, **options)
    return env


class CrashOnce(FakeEnvironment):
    """Kills the process scoring an episode the first time it sees the task's marker file missing."""

    def score(self, task, completion):
        if not os.path.exists(task["marker"]):
            open(task["marker"], "w").close()
            os._exit(9)
        return super().score(task, completion)


class Timed(FakeEnvironment):
    """Records when each episode ran, to see how many ran at once."""

    def score(self, task, completion):
        began = time.time()
        time.sleep(0.5)
        return Feedback(1.0, success=True, details={"began": began, "ended": time.time()})


class Copies(FakeEnvironment):
    """Says which loaded copy of the environment scored an episode."""

    def score(self, task, completion):
        return Feedback(1.0, success=True, details={"pid": os.getpid(), "copy": id(self)})


class NotFeedback(FakeEnvironment):
    def score(self, task, completion):
        return {"reward": 1.0}


class Unloadable(FakeEnvironment):
    """Pickles fine here; loading it on a worker imports a module no worker has."""

    def __reduce__(self):
        return importlib.import_module, ("sdpo_plugin_not_installed_on_workers",)


class _Plugin:
    @staticmethod
    @sdpo_envs.hookimpl
    def register_environments(register):
        register("fake", FakeEnvironment)


# ---------------------------------------------------------------------------------- what runs where
@pytest.mark.slow
def test_episodes_run_on_ray_workers_and_score_as_they_do_here(cluster):
    local = FakeEnvironment().evaluate(TASKS, COMPLETIONS)
    env = on_ray(FakeEnvironment(), cluster)
    remote = env.evaluate(TASKS, COMPLETIONS)
    assert [(f.reward, f.success, f.text) for f in remote] == [(f.reward, f.success, f.text) for f in local]
    assert [f.details["answer"] for f in remote] == [t["answer"] for t in TASKS]  # in order
    assert os.getpid() not in {f.details["pid"] for f in remote}
    assert env.error_count == 0


@pytest.mark.slow
def test_a_worker_keeps_one_loaded_copy_of_the_environment_across_calls_and_failures(cluster):
    """As the local process pool does: a worker's sandboxes stay warm from one step to the next."""
    env = on_ray(Copies(), cluster)
    results = env.evaluate(TASKS, COMPLETIONS)
    env._note_failure()  # what a failed episode does to the environment here
    results += env.evaluate(TASKS, COMPLETIONS)
    copies = {(f.details["pid"], f.details["copy"]) for f in results}
    assert len(copies) == len({pid for pid, _ in copies})


@pytest.mark.slow
def test_at_most_max_in_flight_episodes_run_at_once(cluster):
    env = on_ray(Timed(), cluster, max_in_flight=1)
    spans = sorted((f.details["began"], f.details["ended"]) for f in env.evaluate(TASKS[:4], COMPLETIONS[:4]))
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))


@pytest.mark.slow
def test_a_worker_that_dies_is_retried_once(cluster, tmp_path):
    env = on_ray(CrashOnce(), cluster)
    tasks = [{**TASKS[4], "marker": str(tmp_path / "died-once")}, {**TASKS[5], "marker": str(tmp_path / "x")}]
    first, second = env.evaluate(tasks, ["4", "5"])
    assert (first.reward, first.failed, second.reward) == (1.0, False, 1.0)
    assert env.error_count == 0


@pytest.mark.slow
def test_a_worker_that_keeps_dying_is_a_failed_episode_and_the_others_go_on(cluster):
    env = on_ray(FakeEnvironment(error_reward=-1.0), cluster)  # CRASH kills a worker process (os._exit)
    results = env.evaluate(TASKS[:3], ["0", "CRASH", "2"])
    assert [f.reward for f in results] == [1.0, -1.0, 1.0]
    assert results[1].details["crashed"] is True
    assert "the Ray worker scoring this episode died (WorkerCrashedError; run 2 times)" in results[1].details["error"]
    assert env.error_count == 1


@pytest.mark.slow
def test_an_episode_past_its_timeout_fails_and_the_others_go_on(cluster):
    env = on_ray(FakeEnvironment(episode_timeout=1.0), cluster)
    started = time.monotonic()
    slow, fast = env.evaluate([{**TASKS[0], "delay": 60}, TASKS[1]], ["0", "1"])
    assert time.monotonic() - started < 30
    assert slow.failed
    assert slow.details["timed_out"]
    assert "timed out after 1 s" in slow.details["error"]
    assert fast.reward == 1.0


@pytest.mark.slow
def test_a_score_that_raises_is_a_failed_episode_counted_here(cluster):
    env = on_ray(FakeEnvironment(), cluster)
    broken, fine = env.evaluate(TASKS[:2], ["FAIL", "1"])
    assert broken.details["error"] == "RuntimeError: fake failure"
    assert fine.reward == 1.0
    assert env.error_count == 1


@pytest.mark.slow
def test_contract_breaks_and_unloadable_environments_raise(cluster):
    with pytest.raises(InvalidResultError, match="returned dict, expected Feedback"):
        on_ray(NotFeedback(), cluster).evaluate(TASKS[:2], COMPLETIONS[:2])
    with pytest.raises(EnvironmentSetupError, match="a Ray worker could not load the environment"):
        on_ray(Unloadable(), cluster).evaluate(TASKS[:1], COMPLETIONS[:1])


@pytest.mark.slow
def test_make_runs_a_registered_environment_on_the_cluster(cluster):
    with registered_plugin(_Plugin(), name="ray-test"):
        env = make("fake", executor="ray", ray_address=cluster)
        assert isinstance(env.executor, RayExecutor)
        assert env.evaluate(TASKS[:2], ["0", "1"])[1].details["pid"] != os.getpid()


@pytest.mark.slow
def test_the_trainer_takes_a_step_with_episodes_scored_on_ray(cluster, model, tokenizer, chat_dataset, make_args):
    env = on_ray(FakeEnvironment(), cluster)
    trainer = SDPOTrainer(model=model, reward_funcs=[env], args=make_args(max_steps=1), train_dataset=chat_dataset,
                          processing_class=tokenizer, sdpo_config=SDPOConfig())
    trainer.train()
    assert len(env.last_results) == 4
    assert os.getpid() not in {f.details["pid"] for f in env.last_results}
    assert trainer.state.global_step == 1
    assert "loss" in trainer.state.log_history[0]


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_a_cluster_that_does_not_answer_is_a_clear_error_naming_it(address):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    address = address.format(port=port)
    started = time.monotonic()
    with pytest.raises(EnvironmentSetupError, match=f"no Ray cluster answers at '{address}'"):
        RayExecutor(address, connect_timeout=2.0)
    assert time.monotonic() - started < 10


def test_make_rejects_contradicting_executor_options():
    with registered_plugin(_Plugin(), name="ray-test"):
        with pytest.raises(ValueError, match="ray_address is for executor='ray', but executor=None"):
            make("fake", ray_address="127.0.0.1:6379")
        with pytest.raises(ValueError, match="executor must be 'local', 'ray' or an object with run"):
            make("fake", executor="dask")
        assert make("fake", executor="local").executor is None


def test_an_executor_is_not_shipped_with_the_environment():
    class Here:
        def run(self, env, tasks, texts, workers, timeout):
            return [Feedback(0.5) for _ in tasks]

        def close(self):
            pass

    env = FakeEnvironment()
    env.executor = Here()
    assert [f.reward for f in env.evaluate(TASKS[:2], ["0", "1"])] == [0.5, 0.5]
    assert pickle.loads(pickle.dumps(env)).executor is None

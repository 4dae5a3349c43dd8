"""Multi-task routing by the `env` column, and environments named by config/CLI specs."""

from __future__ import annotations

import types

import pytest

from sdpo_envs import (
    EnvironmentNotFoundError,
    Feedback,
    MultiEnvironment,
    hookimpl,
    make_router,
    resolve_environment,
)
from sdpo_envs.testing import FakeEnvironment, registered_plugin


class ConstantEnv(FakeEnvironment):
    def __init__(self, reward: float = 0.5):
        super().__init__()
        self.reward = reward

    def score(self, task, completion):
        return Feedback(reward=self.reward, text=f"const {self.reward}")


def test_router_sends_each_row_to_its_environment():
    router = MultiEnvironment({"fake": FakeEnvironment(), "const": ConstantEnv(0.25)})
    tasks = [{"env": "fake", "answer": "a"}, {"env": "const"}, {"env": "fake", "answer": "b"}, {"env": "const"}]
    results = router.evaluate(tasks, ["a", "x", "x", "y"])
    assert [r.reward for r in results] == [1.0, 0.25, 0.0, 0.25]
    rewards = router(prompts=["p"] * 4, completions=["a", "x", "x", "y"], env=[t["env"] for t in tasks],
                     answer=[t.get("answer") for t in tasks], completion_ids=[[1], [2], [3], [4]])
    assert rewards == [1.0, 0.25, 0.0, 0.25]
    assert router.last_feedback[1] == "const 0.25"


def test_router_unknown_or_missing_env_is_a_clear_error():
    router = MultiEnvironment({"fake": FakeEnvironment(), "const": ConstantEnv()})
    with pytest.raises(EnvironmentNotFoundError, match=r"unknown environment 'mth' in column 'env' \(row 1\); "
                                                       r"known environments: const, fake"):
        router.evaluate([{"env": "fake"}, {"env": "mth"}], ["a", "b"])
    with pytest.raises(EnvironmentNotFoundError, match="has no 'env' column and there is no default"):
        router.evaluate([{}], ["a"])
    defaulted = MultiEnvironment({"const": ConstantEnv(0.75)}, column="task_type", default="const")
    assert defaulted.evaluate([{}], ["a"])[0].reward == 0.75


def test_router_counts_sub_environment_errors():
    router = MultiEnvironment({"fake": FakeEnvironment(), "const": ConstantEnv()})
    results = router.evaluate([{"env": "fake"}, {"env": "const"}], ["FAIL", "x"])
    assert results[0].failed
    assert router.error_count == 1


def test_router_validates_its_arguments():
    with pytest.raises(ValueError, match="at least one"):
        MultiEnvironment({})
    with pytest.raises(TypeError, match="not an Environment"):
        MultiEnvironment({"x": object()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="default 'y'"):
        MultiEnvironment({"x": FakeEnvironment()}, default="y")


@pytest.fixture
def const_plugin():
    plugin = types.SimpleNamespace()

    @hookimpl
    def register_environments(register):
        register("const", ConstantEnv)
        register("fake", FakeEnvironment)

    plugin.register_environments = register_environments
    with registered_plugin(plugin, name="const-plugin"):
        yield


@pytest.mark.parametrize("spec", ["const", 'const:{"reward": 0.5}', {"name": "const", "reward": 0.5}])
def test_resolve_environment_specs(const_plugin, spec):
    env = resolve_environment(spec)
    assert isinstance(env, ConstantEnv)
    assert env.reward == 0.5
    assert env.name == "const"


def test_resolve_environment_passes_instances_and_rejects_bad_specs(const_plugin):
    env = ConstantEnv()
    assert resolve_environment(env) is env
    with pytest.raises(ValueError, match="not JSON"):
        resolve_environment("const:{reward: 1}")
    with pytest.raises(ValueError, match="must be a JSON object"):
        resolve_environment("const:[1]")
    with pytest.raises(ValueError, match="needs a 'name' key"):
        resolve_environment({"reward": 1})
    with pytest.raises(TypeError, match="got int"):
        resolve_environment(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'rewrd'.*its parameters: reward"):
        resolve_environment('const:{"rewrd": 1}')


def test_make_router_from_specs(const_plugin):
    router = make_router({"a": 'const:{"reward": 0.1}', "b": {"name": "fake"}})
    assert [r.reward for r in router.evaluate([{"env": "a"}, {"env": "b", "answer": "x"}], ["x", "x"])] == [0.1, 1.0]

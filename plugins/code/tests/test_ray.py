"""The code environment on a Ray cluster (`executor="ray"`): each worker runs the bwrap sandbox itself, and
the verdicts equal those of the same environment run here."""

from __future__ import annotations

import pytest
from sdpo_code import CodeEnvironment

from sdpo_envs.testing import local_ray_cluster

ray = pytest.importorskip("ray", reason='the Ray executor needs Ray: pip install "sdpo-gym[ray]"')
from sdpo_envs.ray_executor import RayExecutor  # noqa: E402 - after the skip when Ray is missing


@pytest.mark.slow
def test_ray_verdicts_equal_local_ones_on_the_bundled_problems(backend_by_name, verdict_cases):
    backend_by_name("bwrap")  # skips where bwrap cannot run
    rows, completions = verdict_cases
    here = CodeEnvironment(backend="bwrap", memory_mb=256).evaluate(rows, completions)
    with local_ray_cluster(worker_nodes=1, cpus_per_node=1) as address:
        try:
            env = CodeEnvironment(backend="bwrap", memory_mb=256)
            env.executor = RayExecutor(address)
            on_ray = env.evaluate(rows, completions)
        finally:
            ray.shutdown()
    assert [(f.details["verdict"], f.reward, f.text) for f in on_ray] == \
        [(f.details["verdict"], f.reward, f.text) for f in here]
    assert {f.details["verdict"] for f in here} >= {"Accepted", "Runtime Error", "Time Limit Exceeded",
                                                    "Memory Limit Exceeded", "Output Limit Exceeded", "Syntax Error"}
    assert env.error_count == 0

"""One `Limits` value, from the environment's arguments to the rlimits the harness applies."""

from __future__ import annotations

import pytest
from sdpo_code import CodeEnvironment, Limits
from sdpo_code.runner import build_request
from sdpo_code.tasks import parse_task

import sdpo_envs

ADD = {"prompt": "add", "task_id": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}


def py(code: str) -> str:
    return f"```python\n{code}\n```\n"


def test_named_arguments_override_single_fields_of_limits(backend_by_name):
    env = CodeEnvironment(backend=backend_by_name("bwrap"), limits={"memory_mb": 512, "nofile": 32}, nproc=8,
                          time_limit=2.0)
    assert env.limits == Limits(memory_mb=512, nofile=32, nproc=8, time_limit=2.0)
    assert CodeEnvironment(backend=backend_by_name("bwrap")).limits == Limits()


def test_the_request_carries_the_environment_limits_to_the_harness():
    limits = Limits(time_limit=2.0, wall_factor=2.0, memory_mb=300, output_bytes=1000, nproc=5, nofile=20,
                    task_time_limit=9.0)
    request = build_request(parse_task(ADD), "print(3)", limits, stop_early=True)
    assert (request.cpu_limits, request.wall_limits, request.limits, request.total_wall_limit) == \
        ((2.0,), (5.0,), limits, 9.0)
    payload = request.payload()
    body = payload[payload.index(b"\n") + 1:].decode()
    for key, value in (("memory_bytes", 300 << 20), ("output_bytes", 1000), ("nproc", 5), ("nofile", 20)):
        assert f'"{key}": {value},' in body


@pytest.mark.parametrize("bad", [{"nofile": 0}, {"nproc": -1}, {"memory_mb": 1.5}, {"wall_factor": 0.5},
                                 {"time_limit": True}, {"task_time_limit": 0}, {"nofile": 8}])
def test_bad_limits_are_errors_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Limits(**bad)


def test_unknown_limit_fields_are_named():
    with pytest.raises(ValueError, match="'cpu'"):
        Limits.coerce({"cpu": 1})


def test_nofile_and_nproc_reach_the_program(code_plugin, sandbox):
    """A program that opens more files than `nofile` allows, or starts more threads than `nproc`, fails; the
    same program is accepted under the defaults."""
    opener = py("import os\nfds = [os.open('/dev/null', os.O_RDONLY) for _ in range(40)]\nprint(3)")
    threads = py("import threading, time\n"
                 "ts = [threading.Thread(target=time.sleep, args=(0.5,)) for _ in range(20)]\n"
                 "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(3)")
    tight = sdpo_envs.make("code", backend=sandbox, limits={"nofile": 24}, nproc=10)
    loose = sdpo_envs.make("code", backend=sandbox)
    assert [fb.details["verdict"] for fb in tight.evaluate([ADD, ADD], [opener, threads])] == \
        ["Runtime Error", "Runtime Error"]
    assert [fb.reward for fb in loose.evaluate([ADD, ADD], [opener, threads])] == [1.0, 1.0]

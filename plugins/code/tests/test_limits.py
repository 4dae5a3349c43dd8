"""One `Limits` value: made by the environment, carried by the request to the harness, and enforced there."""

from __future__ import annotations

import json

import pytest
from sdpo_code import Limits
from sdpo_code.runner import build_request
from sdpo_code.tasks import parse_task

import sdpo_envs

ADD = {"prompt": "add", "task_id": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}
OPENS_40_FILES = "import os\nfds = [os.open('/dev/null', os.O_RDONLY) for _ in range(40)]\nprint(3)"


def py(code: str) -> str:
    return f"```python\n{code}\n```\n"


def harness_document(payload: bytes) -> dict:
    header, body = payload.split(b"\n", 1)
    assert int(header) == len(body)
    return json.loads(body)


def test_the_environments_limits_reach_the_harness_unchanged(code_plugin, backend_by_name):
    env = sdpo_envs.make("code", backend=backend_by_name("process"), memory_mb=128, nproc=7, nofile=9,
                         output_limit_bytes=4096, time_limit=0.5, wall_factor=2.0)
    request = build_request(parse_task(ADD), "print(3)", env.limits, stop_early=False)
    assert request.limits is env.limits
    assert (request.cpu_limits, request.wall_limits) == ((0.5,), (0.5 * 2.0 + 1.0,))
    document = harness_document(request.payload())
    assert (document["memory_bytes"], document["nproc"], document["nofile"], document["output_bytes"]) == (
        128 << 20, 7, 9, 4096)


def test_a_limits_object_is_the_base_and_keywords_override_its_fields(code_plugin, backend_by_name):
    env = sdpo_envs.make("code", backend=backend_by_name("process"), limits=Limits(memory_mb=256, nofile=32),
                         nofile=16)
    assert env.limits == Limits(memory_mb=256, nofile=16)
    assert sdpo_envs.make("code", backend=backend_by_name("process")).limits == Limits()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"nproc": 0}, "limits: nproc must be positive, got 0"),
    ({"nofile": -1}, "limits: nofile must be positive, got -1"),
    ({"time_limit": 0.0}, "limits: time_limit must be positive, got 0.0"),
    ({"wall_factor": 0.5}, "limits: wall_factor must be at least 1, got 0.5"),
    ({"task_time_limit": -3.0}, "limits: task_time_limit must be positive or None, got -3.0"),
])
def test_a_contradictory_limit_is_an_error_naming_the_field(code_plugin, backend_by_name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sdpo_envs.make("code", backend=backend_by_name("process"), **kwargs)
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)


def test_nofile_set_on_the_environment_is_enforced_in_the_sandbox(code_plugin, sandbox):
    roomy = sdpo_envs.make("code", backend=sandbox, nofile=64)
    tight = sdpo_envs.make("code", backend=sandbox, nofile=16)
    assert roomy.score(ADD, py(OPENS_40_FILES)).reward == 1.0
    feedback = tight.score(ADD, py(OPENS_40_FILES))
    assert feedback.reward == 0.0
    assert "Too many open files" in feedback.text

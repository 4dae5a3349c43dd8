"""Backend selection and registration: the hook, ``auto``, clear errors instead of silent downgrades."""

from __future__ import annotations

import logging

import pytest
import sdpo_code
from sdpo_code.sandbox import SandboxUnavailable, get_sandbox
from sdpo_code.sandbox.base import ExecutionRequest

import sdpo_envs


def test_hook_registers_builtin_backends_and_the_environment(code_plugin):
    names = {f.name for f in sdpo_envs.list_sandboxes()}
    assert {"bwrap", "process", "docker"} <= names
    assert "code" in {f.name for f in sdpo_envs.list_environments()}


def test_backends_are_looked_up_through_the_registry(code_plugin):
    class Fake:
        name, isolation = "fake", "none"

        def run(self, request: ExecutionRequest):
            raise AssertionError("not called")

    class FakePlugin:
        @sdpo_envs.hookimpl
        def register_sandboxes(self, register):
            register("fake", lambda **kw: Fake(), description="a test backend")

    from sdpo_envs.testing import registered_plugin

    with registered_plugin(FakePlugin(), name="fake-sandbox"):
        assert get_sandbox("fake").name == "fake"
    with pytest.raises(ValueError, match="unknown sandbox backend 'fake'"):
        get_sandbox("fake")


def test_builtins_work_without_the_plugin_manager():
    assert sdpo_code.available_sandboxes()[:3] == ["bwrap", "docker", "process"]


def test_auto_picks_bwrap_and_logs_it(caplog, backend_by_name):
    backend_by_name("bwrap")  # skips where bwrap cannot work
    with caplog.at_level(logging.INFO, logger="sdpo_code"):
        env = sdpo_code.CodeEnvironment(backend="auto")
    assert env.sandbox.name == "bwrap"
    assert "chose 'bwrap'" in caplog.text
    assert "sandbox backend 'bwrap'" in caplog.text  # the backend and its isolation, once per environment


def test_auto_without_bwrap_drops_bwrap_options_with_a_warning(caplog, monkeypatch):
    """`reuse` means nothing to the process backend: falling back logs it as ignored instead of crashing."""
    import sdpo_code.sandbox.bwrap

    monkeypatch.setattr(sdpo_code.sandbox.bwrap, "find_bwrap", lambda *args, **kwargs: None)
    with caplog.at_level(logging.INFO, logger="sdpo_code"):
        sandbox = get_sandbox("auto", reuse=False, drop_privileges=False)
    assert sandbox.name == "process"
    assert "no option 'reuse'; ignored" in caplog.text
    assert not sandbox.switch_uid  # the options it does take still reach it


def test_missing_bwrap_binary_is_a_clear_error():
    with pytest.raises(SandboxUnavailable, match=r"cannot create a sandbox|no bwrap"):
        get_sandbox("bwrap", bwrap="/nonexistent/bwrap")


def test_docker_without_engine_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(SandboxUnavailable, match="no Docker engine answers"):
        get_sandbox("docker")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="available: bwrap, docker, process"):
        get_sandbox("vm")


def test_explicit_interpreter_must_work():
    with pytest.raises(RuntimeError, match="cannot be run"):
        get_sandbox("process", python="/nonexistent/python3")


@pytest.fixture(scope="module")
def docker_sandbox():
    try:
        return get_sandbox("docker")
    except SandboxUnavailable as exc:
        pytest.skip(f"docker: {exc}")


def test_docker_verdicts(docker_sandbox):
    env = sdpo_code.CodeEnvironment(backend=docker_sandbox, time_limit=1.0)
    task = {"prompt": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}
    good = env.score(task, "```python\na, b = map(int, input().split())\nprint(a + b)\n```")
    bad = env.score(task, "```python\nwhile True:\n    pass\n```")
    assert good.details["verdict"] == "Accepted"
    assert bad.details["verdict"] == "Time Limit Exceeded"

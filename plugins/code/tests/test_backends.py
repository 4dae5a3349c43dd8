"""Backend selection and registration: the hook, ``auto``, clear errors instead of silent downgrades."""

from __future__ import annotations

import logging
import os

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


@pytest.mark.parametrize("why", ["no binary", "unusable binary"])
def test_auto_never_falls_back_to_the_process_backend(monkeypatch, why):
    """Without a working bwrap, `auto` is an error that says how to opt in to `process` and what that backend
    does not isolate, never a silent switch to it."""
    import sdpo_code.sandbox.bwrap

    if why == "no binary":
        monkeypatch.setattr(sdpo_code.sandbox.bwrap, "find_bwrap", lambda *args, **kwargs: None)
    else:
        monkeypatch.setattr(sdpo_code.sandbox.bwrap, "find_bwrap", lambda *args, **kwargs: "/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable) as error:
        get_sandbox("auto", reuse=False)
    message = str(error.value)
    assert "backend='process'" in message
    assert "does NOT isolate: unix-domain sockets" in message
    assert "sdpo sandbox doctor" in message


def test_the_process_backend_warns_what_it_does_not_isolate(caplog):
    with caplog.at_level(logging.WARNING, logger="sdpo_code"):
        sandbox = get_sandbox("process")
    assert "does NOT isolate: " in caplog.text
    assert "unix-domain sockets" in caplog.text
    assert sandbox.not_isolated[-4:] == sandbox.ALWAYS_NOT_ISOLATED


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


@pytest.fixture
def docker_sandbox(backend_by_name):
    return backend_by_name("docker")  # on the session's private engine; skips with the reason without one


def test_docker_verdicts(docker_sandbox):
    env = sdpo_code.CodeEnvironment(backend=docker_sandbox, time_limit=1.0)
    task = {"prompt": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}
    good = env.score(task, "```python\na, b = map(int, input().split())\nprint(a + b)\n```")
    bad = env.score(task, "```python\nwhile True:\n    pass\n```")
    assert good.details["verdict"] == "Accepted"
    assert bad.details["verdict"] == "Time Limit Exceeded"


def test_sandbox_doctor_probes_every_backend_in_a_real_subprocess(backend_by_name):
    """`sdpo sandbox doctor` through the installed entry points: each backend says whether it works here and
    what it does and does not isolate; the process backend names what it leaves open."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "SDPO_LOAD_PLUGINS": "sdpo-code", "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    out = subprocess.run([sys.executable, "-m", "sdpo_core.app.cli", "sandbox", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120, env=env)
    reports = {r["name"]: r for r in json.loads(out.stdout)}
    assert {"bwrap", "process", "docker"} <= set(reports)
    docker = reports["docker"]
    assert docker["works"] is False
    assert "no Docker engine answers" in docker["detail"]
    assert docker["not_isolated"]
    process = reports["process"]
    assert any("unix-domain sockets" in item for item in process["not_isolated"])
    assert "does NOT isolate" in out.stderr  # and the log says so when it is built
    backend_by_name("bwrap")  # the rest needs a working bwrap
    assert reports["bwrap"]["works"] is True, reports["bwrap"]
    assert any("read-only" in item for item in reports["bwrap"]["isolates"])
    assert out.returncode == 0


def test_bwrap_hides_every_package_directory_it_would_show(tmp_path):
    """`package_dirs`: the site-/dist-packages of every tree the sandbox shows (the system's and the
    interpreter's, any environment inside the latter included), none of a venv it does not show;
    `interpreter_mounts` shows of a venv only its pyvenv.cfg and executable."""
    from sdpo_code.sandbox._system import Interpreter
    from sdpo_code.sandbox.bwrap import interpreter_mounts, package_dirs

    base, venv, inner = tmp_path / "base", tmp_path / "venv", tmp_path / "base" / "envs" / "inner"
    shown = [base / "lib/python3.11/site-packages", base / "lib/python3/dist-packages",
             base / "lib64/python3.11/site-packages", inner / "lib/python3.12/site-packages"]
    hidden_elsewhere = [venv / "lib/python3.11/site-packages"]
    for path in [*shown, *hidden_elsewhere]:
        path.mkdir(parents=True)
    python = Interpreter(path=str(venv / "bin/python"), version=(3, 11, 0), prefixes=(str(base),), venv=str(venv))
    found = package_dirs(python)
    assert {p for p in found if p.startswith(str(tmp_path))} == {str(p) for p in shown}
    assert all(p.startswith("/usr/") for p in found if not p.startswith(str(tmp_path)))
    assert interpreter_mounts(python) == ["--ro-bind", str(base), str(base),
                                          "--ro-bind", str(venv / "pyvenv.cfg"), str(venv / "pyvenv.cfg"),
                                          "--ro-bind", str(venv / "bin/python"), str(venv / "bin/python")]
    in_base = Interpreter(path=str(inner / "bin/python"), version=(3, 12, 0), prefixes=(str(base),),
                          venv=str(inner))
    assert str(inner / "lib/python3.12/site-packages") in package_dirs(in_base)  # visible through base: hidden

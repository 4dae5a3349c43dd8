"""`sdpo envs list/show/plugins` in process, with a plugin registered by the test."""

from __future__ import annotations

import json
import types

import pytest

from sdpo_core.app.cli import build_parser, main
from sdpo_envs import hookimpl
from sdpo_envs.testing import FakeEnvironment, registered_plugin


@pytest.fixture
def fake_plugin():
    @hookimpl
    def register_environments(register):
        register("fake", FakeEnvironment)

    with registered_plugin(types.SimpleNamespace(register_environments=register_environments), name="fake-plugin"):
        yield


def test_envs_list(fake_plugin, capsys):
    assert main(["envs", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "DESCRIPTION", "DISTRIBUTION", "VERSION"]
    assert "fake" in out
    assert "A fake environment for tests" in out
    assert "(plugin fake-plugin)" in out


def test_envs_list_json(fake_plugin, capsys):
    assert main(["envs", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"name": "fake", "description": FakeEnvironment.description, "plugin": "fake-plugin", "dist": None,
            "version": None} in data["environments"]


def test_envs_show(fake_plugin, capsys):
    assert main(["envs", "show", "fake"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fake: A fake environment for tests")
    assert "  delay: float  (default 0.0)" in out
    assert "seconds each episode sleeps" in out
    assert "sdpo_envs.testing:FakeEnvironment" in out


def test_envs_show_unknown(fake_plugin, capsys):
    assert main(["envs", "show", "nope"]) == 1
    assert "sdpo: unknown environment 'nope'; registered: fake" in capsys.readouterr().err


def test_envs_plugins(fake_plugin, capsys):
    assert main(["envs", "plugins"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("fake-plugin"))
    assert "register_environments" in line
    assert line.endswith("ok")
    assert main(["envs", "plugins", "--json"]) == 0
    assert {"name": "fake-plugin", "dist": None, "version": None, "hooks": ["register_environments"],
            "error": None} in json.loads(capsys.readouterr().out)


def test_parser_is_built_from_small_functions():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert parser.parse_args(["envs", "show", "x"]).name == "x"


class _Described:
    """A sandbox factory with a describe() probe that answers `info`."""

    def __init__(self, info):
        self.info = info

    def __call__(self, **options):
        raise AssertionError("doctor must not build through the factory itself")

    def describe(self):
        if isinstance(self.info, Exception):
            raise self.info
        return self.info


@pytest.fixture
def sandbox_plugin():
    @hookimpl
    def register_sandboxes(register):
        register("good", _Described({"works": True, "detail": "ran", "isolates": ["the network"],
                                     "not_isolated": ["the kernel"]}), description="A working backend.")
        register("broken", _Described({"works": False, "detail": "no binary"}))
        register("raising", _Described(OSError("no socket")))
        register("garbled", _Described({"works": "yes"}))
        register("silent", lambda **options: None)

    with registered_plugin(types.SimpleNamespace(register_sandboxes=register_sandboxes), name="sandbox-plugin"):
        yield


def test_sandbox_doctor_reports_each_backend(sandbox_plugin, capsys):
    assert main(["sandbox", "doctor"]) == 0  # one backend works
    out = capsys.readouterr().out
    assert "good: works here  (plugin 'sandbox-plugin')\n  A working backend.\n  ran\n" in out
    assert "  isolates:\n    - the network\n  NOT isolated:\n    - the kernel\n" in out
    assert "broken: does NOT work here" in out
    assert "raising: does NOT work here  (plugin 'sandbox-plugin')" in out
    assert "describe() raised OSError: no socket" in out
    assert "garbled: does NOT work here" in out
    assert "describe() answered {'works': 'yes'}" in out
    assert "silent: unknown (no probe)" in out


def test_sandbox_doctor_json_and_exit_code_when_nothing_works(capsys):
    @hookimpl
    def register_sandboxes(register):
        register("broken", _Described({"works": False, "detail": "no binary", "not_isolated": ["all"]}))

    with registered_plugin(types.SimpleNamespace(register_sandboxes=register_sandboxes), name="only-broken"):
        assert main(["sandbox", "doctor", "--json"]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert report == {"name": "broken", "source": "plugin 'only-broken'", "description": report["description"],
                      "works": False, "detail": "no binary", "isolates": [], "not_isolated": ["all"]}

"""Every hook is documented (a heading with its exact signature) and tested (a `test_hook_<name>`)."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest

from sdpo_envs import (
    Feedback,
    hookimpl,
    hookspecs,
    list_sandboxes,
    make,
    make_sandbox,
)
from sdpo_envs.plugins import pm
from sdpo_envs.testing import FakeEnvironment, registered_plugin

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, "sdpo_spec"))


def signature_text(function) -> str:
    """``name(arg: Type, ...) -> Return``, from the (string) annotations as written in hookspecs.py."""
    params = ", ".join(f"{p.name}: {p.annotation}" for p in inspect.signature(function).parameters.values())
    return f"{function.__name__}({params}) -> {inspect.signature(function).return_annotation}"


def test_the_hooks_are_the_designed_three():
    assert HOOKS == ["format_feedback", "register_environments", "register_sandboxes"]
    assert set(pm.hook.__dict__) >= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    headings = [line for line in (ROOT / "docs/plugins/hooks.md").read_text().splitlines() if line.startswith("#")]
    expected = signature_text(getattr(hookspecs, hook))
    assert any(expected in heading for heading in headings), f"docs/plugins/hooks.md needs a heading with {expected}"
    spec = getattr(hookspecs, hook)
    assert spec.__doc__.count(":param") == len(inspect.signature(spec).parameters)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_tested(hook):
    sources = [p.read_text() for p in [*ROOT.glob("tests/test_*.py"), *ROOT.glob("plugins/*/tests/test_*.py")]]
    assert any(re.search(rf"^def test_hook_{hook}\(", s, re.MULTILINE) for s in sources), f"no test_hook_{hook}"


def test_firstresult_is_documented():
    assert "Stops at the first non-None result" in " ".join(hookspecs.format_feedback.__doc__.split())
    assert hookspecs.format_feedback.sdpo_spec["firstresult"] is True


# ------------------------------------------------------------------------------------------ one test per hook
def test_hook_register_environments():
    plugin = types.SimpleNamespace()

    @hookimpl
    def register_environments(register):
        register("fake-env", FakeEnvironment, description="Fake.")

    plugin.register_environments = register_environments
    with registered_plugin(plugin, name="envs-plugin"):
        env = make("fake-env", delay=0.0)
        assert isinstance(env, FakeEnvironment)
        assert env.evaluate([{"answer": "1"}], ["1"])[0].success


class Sandbox:
    """A pretend sandbox backend."""

    def __init__(self, memory_mb: int = 256) -> None:
        self.memory_mb = memory_mb


def test_hook_register_sandboxes():
    plugin = types.SimpleNamespace()

    @hookimpl
    def register_sandboxes(register):
        register("pretend", Sandbox)

    plugin.register_sandboxes = register_sandboxes
    with registered_plugin(plugin, name="sandbox-plugin"):
        (factory,) = [f for f in list_sandboxes() if f.name == "pretend"]
        assert (factory.kind, factory.description) == ("sandbox", "A pretend sandbox backend.")
        assert make_sandbox("pretend", memory_mb=64).memory_mb == 64
        with pytest.raises(LookupError, match="unknown sandbox 'nope'"):
            make_sandbox("nope")


class Renderer:
    """Two format_feedback plugins and a plugin that raises: first non-None result wins, errors are contained."""

    def __init__(self, text, raises=False):
        self.text, self.raises, self.calls = text, raises, []

    @hookimpl
    def format_feedback(self, env_name, task, result):
        self.calls.append((env_name, dict(task), result.feedback.text, result.info["completion"]))
        if self.raises:
            raise RuntimeError("renderer bug")
        return None if self.text is None else f"{self.text}: {result.feedback.text}"


def test_hook_format_feedback(caplog):
    envs = types.SimpleNamespace(register_environments=hookimpl(lambda register: register("fmt", FakeEnvironment)))
    first, abstains = Renderer("FIRST"), Renderer(None)
    with registered_plugin(envs, name="fmt-envs"), registered_plugin(first, name="first"), \
            registered_plugin(abstains, name="abstains"):
        env = make("fmt")
        results = env.evaluate([{"answer": "7"}, {"answer": "8"}], ["7", "x"])
        # LIFO: "abstains" (registered last) is asked first, returns None; "first" answers
        assert [r.text for r in results] == ["FIRST: ", "FIRST: The completion does not contain the answer "
                                             "(1 characters)."]
        assert abstains.calls[1] == ("fmt", {"answer": "8"}, "The completion does not contain the answer "
                                     "(1 characters).", "x")
        env.reset({"prompt": "p", "answer": "7"})
        assert env.step("no").feedback.text.startswith("FIRST: ")
        # instances not built by make() are left alone
        assert FakeEnvironment().evaluate([{"answer": "7"}], ["x"])[0].text.startswith("The completion")
        with registered_plugin(Renderer("X", raises=True), name="raises"):
            kept = make("fmt").evaluate([{"answer": "7"}], ["x"])[0]
        assert kept.text.startswith("The completion")
        assert "renderer bug" in caplog.text
    # without any implementation, make() installs no formatter
    with registered_plugin(envs, name="fmt-envs"):
        assert make("fmt").feedback_formatter is None
    assert isinstance(Feedback(reward=0.0), Feedback)

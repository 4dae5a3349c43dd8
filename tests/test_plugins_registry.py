"""Loading plugins from entry points in isolation, env-var allow/block lists, and the environment registry."""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import pytest

from sdpo_envs import (
    EnvironmentNotFoundError,
    PluginLoadWarning,
    get_factory,
    get_plugins,
    hookimpl,
    list_environments,
    make,
)
from sdpo_envs import plugins as loader
from sdpo_envs.testing import FakeEnvironment, registered_plugin


@dataclass
class FakeDist:
    name: str
    version: str = "1.0"


class FakeEntryPoint:
    """Enough of `importlib.metadata.EntryPoint` for the loader."""

    def __init__(self, name, module=None, dist=None, error=None):
        self.name = name
        self.value = f"sdpo_{name}"
        self.dist = FakeDist(dist or f"sdpo-{name}")
        self._module = module
        self._error = error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._module


def plugin_module(name, **hooks):
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def registering(*names, factory=FakeEnvironment):
    def register_environments(register):
        for name in names:
            register(name, factory)

    return register_environments


@pytest.fixture
def entry_points(monkeypatch):
    """A controllable list of installed entry points; every variable unset, the loader reset around the test."""
    eps: list[FakeEntryPoint] = []
    monkeypatch.setattr(loader, "_entry_points", lambda: eps)
    for var in ("SDPO_LOAD_PLUGINS", "SDPO_BLOCK_PLUGINS", "SDPO_DISABLE_PLUGINS", "SDPO_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    loader.reset_plugins()
    yield eps
    loader.reset_plugins()


def test_loading_is_lazy_and_once(entry_points):
    calls = []
    entry_points.append(FakeEntryPoint("a", plugin_module("sdpo_a", register_environments=lambda register: (
        calls.append(1), register("a-env", FakeEnvironment)))))
    assert not loader._state["loaded"]
    assert [f.name for f in list_environments()] == ["a-env"]
    list_environments()
    make("a-env")
    assert len(calls) == 1  # cached until the set of plugins changes
    (factory,) = list_environments()
    assert (factory.dist, factory.version, factory.plugin) == ("sdpo-a", "1.0", "a")


def test_broken_import_is_reported_and_others_load(entry_points):
    entry_points.append(FakeEntryPoint("broken", error=ImportError("no module named 'missing_dep'")))
    entry_points.append(FakeEntryPoint("good", plugin_module("sdpo_good", register_environments=registering("g"))))
    with pytest.warns(PluginLoadWarning, match=r"plugin 'broken' \(distribution sdpo-broken 1.0\) was not loaded: "
                                               r"import of 'sdpo_broken' failed: ImportError: no module named"):
        assert [f.name for f in list_environments()] == ["g"]
    infos = {p["name"]: p for p in get_plugins()}
    assert infos["broken"]["error"].startswith("import of 'sdpo_broken' failed")
    assert infos["broken"]["dist"] == "sdpo-broken"
    assert infos["good"] == {"name": "good", "dist": "sdpo-good", "version": "1.0",
                             "hooks": ["register_environments"], "error": None}
    with pytest.raises(EnvironmentNotFoundError, match=r"unknown environment 'x'; registered: g; plugins with "
                                                       r"errors: plugin 'broken'"):
        make("x")


def test_hook_that_raises_loses_only_its_registrations(entry_points):
    def explode(register):
        register("half", FakeEnvironment)
        raise RuntimeError("plugin bug")

    entry_points.append(FakeEntryPoint("bad", plugin_module("sdpo_bad", register_environments=explode)))
    entry_points.append(FakeEntryPoint("good", plugin_module("sdpo_good", register_environments=registering("g"))))
    with pytest.warns(PluginLoadWarning, match=r"plugin 'bad' \(distribution sdpo-bad 1.0\): register_environments "
                                               "raised RuntimeError: plugin bug"):
        assert [f.name for f in list_environments()] == ["g"]
    bad = next(p for p in get_plugins() if p["name"] == "bad")
    assert bad["error"] == "register_environments raised RuntimeError: plugin bug"


def test_invalid_registrations_are_hook_errors(entry_points):
    entry_points.append(FakeEntryPoint("colon", plugin_module("m1", register_environments=registering("a:b"))))
    entry_points.append(FakeEntryPoint("twice", plugin_module("m2", register_environments=registering("t", "t"))))
    entry_points.append(FakeEntryPoint("nofn", plugin_module("m3", register_environments=registering("n", factory=3))))
    with pytest.warns(PluginLoadWarning):
        assert list_environments() == []
    errors = {p["name"]: p["error"] for p in get_plugins()}
    assert "invalid name 'a:b'" in errors["colon"]
    assert "'t' is registered twice" in errors["twice"]
    assert "the factory must be callable" in errors["nofn"]


def test_duplicate_environment_names_raise_naming_both_distributions(entry_points):
    entry_points.append(FakeEntryPoint("one", plugin_module("m1", register_environments=registering("dup", "u1"))))
    entry_points.append(FakeEntryPoint("two", plugin_module("m2", register_environments=registering("dup", "u2"))))
    assert [(f.name, f.dist) for f in list_environments()] == [
        ("dup", "sdpo-one"), ("dup", "sdpo-two"), ("u1", "sdpo-one"), ("u2", "sdpo-two")]
    with pytest.raises(EnvironmentNotFoundError, match=r"environment 'dup' is registered by both distribution "
                                                       r"sdpo-one 1\.0 and distribution sdpo-two 1\.0"):
        make("dup")
    assert isinstance(make("u2"), FakeEnvironment)


def test_misspelt_hookimpl_is_rejected_by_check_pending(entry_points):
    entry_points.append(FakeEntryPoint("typo", plugin_module("sdpo_typo", register_enviroments=registering("t"))))
    entry_points.append(FakeEntryPoint("good", plugin_module("sdpo_good", register_environments=registering("g"))))
    with pytest.warns(PluginLoadWarning, match="unknown hook 'register_enviroments'"):
        assert [f.name for f in list_environments()] == ["g"]
    assert not loader.pm.has_plugin("typo")
    assert "unknown hook" in next(p for p in get_plugins() if p["name"] == "typo")["error"]


def test_plugin_without_hooks_is_warned_about(entry_points):
    module = types.ModuleType("sdpo_undecorated")
    module.register_environments = registering("u")  # forgot @hookimpl
    entry_points.append(FakeEntryPoint("undecorated", module))
    with pytest.warns(PluginLoadWarning, match="implements no sdpo hook"):
        assert list_environments() == []


def test_same_entry_point_name_twice(entry_points):
    entry_points.append(FakeEntryPoint("same", plugin_module("m1", register_environments=registering("a"))))
    entry_points.append(FakeEntryPoint("same", plugin_module("m2", register_environments=registering("b")),
                                       dist="sdpo-other"))
    with pytest.warns(PluginLoadWarning, match=r"distribution sdpo-other 1.0\) was not loaded: the name 'same' is "
                                               r"already taken by plugin 'same' \(distribution sdpo-same 1.0\)"):
        assert [f.name for f in list_environments()] == ["a"]


@pytest.fixture
def two_plugins(entry_points):
    entry_points.append(FakeEntryPoint("alpha", plugin_module("sdpo_alpha", register_environments=registering("a"))))
    entry_points.append(FakeEntryPoint("beta", plugin_module("sdpo_beta", register_environments=registering("b"))))
    return entry_points


def test_allowlist_loads_only_listed_distributions(two_plugins, monkeypatch):
    monkeypatch.setenv("SDPO_LOAD_PLUGINS", " sdpo_Alpha ")  # compared as normalized distribution names
    assert [f.name for f in list_environments()] == ["a"]
    with pytest.raises(EnvironmentNotFoundError, match=r"environment 'b' is provided by distribution sdpo-beta 1.0 "
                                                       r"\(plugin 'beta'\), which is not loaded: "
                                                       r"SDPO_LOAD_PLUGINS=' sdpo_Alpha ' does not include it"):
        make("b")
    assert [(s.name, s.variable) for s in loader.skipped_plugins()] == [("beta", "SDPO_LOAD_PLUGINS")]


def test_empty_allowlist_loads_nothing(two_plugins, monkeypatch):
    monkeypatch.setenv("SDPO_LOAD_PLUGINS", "")
    assert list_environments() == []
    with pytest.raises(EnvironmentNotFoundError, match="SDPO_LOAD_PLUGINS='' does not include it"):
        make("a")


@pytest.mark.parametrize("variable", ["SDPO_BLOCK_PLUGINS", "SDPO_DISABLE_PLUGINS"])
def test_blocklist(two_plugins, monkeypatch, variable):
    monkeypatch.setenv(variable, "sdpo-beta")
    assert [f.name for f in list_environments()] == ["a"]
    with pytest.raises(EnvironmentNotFoundError, match=f"{variable} blocks it; remove sdpo-beta from {variable}"):
        make("b")


def test_trace_logs_hook_calls(two_plugins, monkeypatch):
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    trace = logging.getLogger("sdpo_envs.trace")
    trace.addHandler(handler)
    trace.setLevel(logging.INFO)
    monkeypatch.setenv("SDPO_TRACE_PLUGINS", "1")
    try:
        list_environments()
    finally:
        trace.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("register_environments(register) -> plugins ['alpha']") for m in messages)
    assert any(m == "register_environments returned []" for m in messages)


def test_make_checks_arguments_and_result(two_plugins):
    with pytest.raises(TypeError, match=r"environment 'a' \(distribution sdpo-alpha 1.0\): got an unexpected "
                                        "keyword argument 'nope'; its parameters: answer_column, delay"):
        make("a", nope=1)
    env = make("a", delay=0.5)
    assert (env.name, env.delay, env.feedback_formatter) == ("a", 0.5, None)

    plugin = types.SimpleNamespace(register_environments=hookimpl(lambda register: register("bad", dict)))
    with registered_plugin(plugin, name="bad-factory"), \
            pytest.raises(TypeError, match=r"the factory returned dict, not an sdpo_envs\.Environment"):
        make("bad")


def test_registry_follows_register_and_unregister(entry_points):
    plugin = types.SimpleNamespace(register_environments=hookimpl(registering("temp")))
    assert list_environments() == []
    with registered_plugin(plugin, name="temp-plugin"):
        assert [f.name for f in list_environments()] == ["temp"]
        assert get_factory("temp").source == "plugin 'temp-plugin'"
    assert list_environments() == []


class Documented(FakeEnvironment):
    """A documented environment.

    More text.

    Args:
        answer_column (`str`, *optional*, defaults to `"answer"`):
            Where the answer is,
            over two lines.
        delay (`float`): Seconds (per episode).
    """


def sphinx_factory(size: int, mode: str = "fast", **options: object) -> FakeEnvironment:
    """Build a thing.

    :param size: how big
        it is.
    :param mode: how.
    """
    return FakeEnvironment()


def test_parameters_and_description_from_signature_and_docstring(entry_points):
    def register_environments(register):
        register("documented", Documented)
        register("sphinx", sphinx_factory, description="Explicit description.")

    with registered_plugin(types.SimpleNamespace(register_environments=hookimpl(register_environments)), "docs"):
        documented = get_factory("documented")
        assert documented.description == "A documented environment."
        params = {p.name: p for p in documented.parameters()}
        assert params["answer_column"].help == "Where the answer is, over two lines."
        assert params["answer_column"].default == "'answer'"
        assert params["delay"].help == "Seconds (per episode)."
        assert params["concurrency"].annotation == "Literal['thread', 'process']"
        sphinx = get_factory("sphinx")
        assert sphinx.description == "Explicit description."
        assert sphinx.factory_path.endswith("test_plugins_registry:sphinx_factory")
        [(size), (mode), (options)] = sphinx.parameters()
        assert (size.name, size.required, size.annotation, size.help) == ("size", True, "int", "how big it is.")
        assert (mode.default, mode.help) == ("'fast'", "how.")
        assert (options.name, options.required) == ("**options", False)

"""The plugin manager: entry-point group ``sdpo``, each entry point loaded in isolation.

Why not ``pm.load_setuptools_entrypoints``: it calls ``ep.load()`` unguarded, so one broken plugin
aborts the whole load. Here every entry point is imported, registered and checked on its own; a
failure is a `PluginLoadWarning` naming the plugin and its distribution, shows in `get_plugins()` and
``sdpo envs``, and every other plugin still loads. Loading is lazy (the first registry access), so
``import sdpo_envs`` stays cheap. Environment variables, read when loading, take distribution (or
entry-point) names:

- ``SDPO_LOAD_PLUGINS=a,b``: load only these; an empty string loads none (what the tests set);
- ``SDPO_BLOCK_PLUGINS=x,y`` (alias ``SDPO_DISABLE_PLUGINS``): never load these;
- ``SDPO_TRACE_PLUGINS=1``: log every hook call and its result to stderr.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import pluggy

from sdpo_envs import hookspecs

GROUP = "sdpo"
LOAD_VAR, BLOCK_VAR, BLOCK_ALIAS_VAR, TRACE_VAR = (
    "SDPO_LOAD_PLUGINS", "SDPO_BLOCK_PLUGINS", "SDPO_DISABLE_PLUGINS", "SDPO_TRACE_PLUGINS")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # no ':' -- resolve_environment splits on it

logger = logging.getLogger(__name__)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with a counter of (un)registrations, so registry caches know when to rebuild."""

    generation = 0

    def register(self, plugin: object, name: str | None = None) -> str | None:
        self.generation += 1
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any | None:
        self.generation += 1
        return super().unregister(plugin, name)

    def set_blocked(self, name: str) -> None:
        self.generation += 1
        super().set_blocked(name)


pm = PluginManager(GROUP)
pm.add_hookspecs(hookspecs)


class PluginLoadWarning(UserWarning):
    """A plugin failed to import, register, pass ``check_pending`` or run one of its hooks."""


class PluginInfo(TypedDict):
    """One row of `get_plugins()`; plain data, so a run can write it into its config."""

    name: str
    dist: str | None
    version: str | None
    hooks: list[str]
    error: str | None


@dataclass(frozen=True)
class SkippedPlugin:
    """An installed plugin that the allowlist or blocklist (``variable``) kept from loading."""

    name: str
    dist: str | None
    version: str | None
    variable: str
    entry_point: importlib.metadata.EntryPoint


@dataclass(frozen=True)
class Registration:
    """One ``register(name, factory, description)`` call made by a plugin's ``register_*`` hook."""

    name: str
    factory: Callable[..., Any]
    description: str | None
    plugin: str
    dist: str | None
    version: str | None


_lock = threading.RLock()
_state: dict[str, Any] = {"loaded": False, "untrace": None}
_sources: dict[str, tuple[str | None, str | None]] = {}  # entry-point plugin -> (distribution, version)
_failed: dict[str, PluginInfo] = {}  # plugins that never got registered
_hook_errors: dict[tuple[str, str], str] = {}  # (hook, plugin) -> error of its last call
_skipped: list[SkippedPlugin] = []
_cache: dict[str, tuple[int, list[Registration]]] = {}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (``SDPO_Foo.bar`` == ``sdpo-foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _listed(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    return None if value is None else {normalize(v.strip()) for v in value.split(",") if v.strip()}


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=GROUP)


def _warn(message: str) -> None:
    logger.debug(message)
    warnings.warn(message, PluginLoadWarning, stacklevel=3)


def plugin_source(name: str) -> tuple[str | None, str | None]:
    """The (distribution, version) a registered plugin came from; ``(None, None)`` if registered directly."""
    return _sources.get(name, (None, None))


def describe(name: str) -> str:
    """``plugin 'x' (distribution sdpo-x 1.0)``: how messages name a plugin."""
    dist, version = plugin_source(name)
    return f"plugin {name!r}" + (f" (distribution {dist} {version})" if dist else "")


def load_plugins() -> None:
    """Load every allowed ``sdpo`` entry point once; called by every registry access."""
    with _lock:
        if _state["loaded"]:
            return
        _state["loaded"] = True
        if os.environ.get(TRACE_VAR, "").strip() not in ("", "0"):
            _state["untrace"] = _enable_tracing()
        allow = _listed(LOAD_VAR)
        block = (_listed(BLOCK_VAR) or set()) | (_listed(BLOCK_ALIAS_VAR) or set())
        for ep in _entry_points():
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            keys = {normalize(ep.name)} | ({normalize(dist)} if dist else set())
            if allow is not None and not keys & allow:
                _skipped.append(SkippedPlugin(ep.name, dist, version, LOAD_VAR, ep))
            elif keys & block:
                variable = BLOCK_VAR if keys & (_listed(BLOCK_VAR) or set()) else BLOCK_ALIAS_VAR
                _skipped.append(SkippedPlugin(ep.name, dist, version, variable, ep))
            else:
                _load_one(ep, dist, version)


def _load_one(ep: importlib.metadata.EntryPoint, dist: str | None, version: str | None) -> None:
    where = f"plugin {ep.name!r} (distribution {dist} {version})"

    def fail(error: str) -> None:
        _failed[ep.name] = PluginInfo(name=ep.name, dist=dist, version=version, hooks=[], error=error)
        _warn(f"sdpo {where} was not loaded: {error}")

    try:
        module = ep.load()
    except (Exception, SystemExit) as exc:
        return fail(f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}")
    if pm.has_plugin(ep.name):
        return fail(f"the name {ep.name!r} is already taken by {describe(ep.name)}")
    try:
        pm.register(module, name=ep.name)
    except Exception as exc:  # PluginValidationError (bad hookimpl arguments) or a module registered twice
        return fail(f"{type(exc).__name__}: {exc}")
    try:
        pm.check_pending()  # a misspelt @hookimpl: "unknown hook 'register_enviroments'"
    except pluggy.PluginValidationError as exc:
        if exc.plugin is not module:
            raise
        pm.unregister(name=ep.name)
        return fail(str(exc))
    _sources[ep.name] = (dist, version)
    if not pm.get_hookcallers(module):
        _warn(f"sdpo {where} implements no sdpo hook (did you forget @sdpo_envs.hookimpl?)")


def _enable_tracing() -> Callable[[], None]:
    trace = logging.getLogger("sdpo_envs.trace")
    if not trace.handlers:  # the user asked for it: show it even if logging is not configured
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("sdpo trace: %(message)s"))
        trace.addHandler(handler)
        trace.setLevel(logging.INFO)
        trace.propagate = False

    def before(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, object]) -> None:
        trace.info("%s(%s) -> plugins %s", hook_name, ", ".join(kwargs), [i.plugin_name for i in impls])

    def after(outcome: pluggy.Result[object], hook_name: str, impls: Sequence[pluggy.HookImpl],
              kwargs: Mapping[str, object]) -> None:
        result = repr(outcome.exception) if outcome.exception is not None else repr(outcome.get_result())
        trace.info("%s returned %s", hook_name, result[:200])

    return pm.add_hookcall_monitoring(before, after)


def registrations(hook_name: str) -> list[Registration]:
    """Every ``register()`` call of the ``hook_name`` hook, plugin by plugin, in registration order.

    Each plugin's implementation is called on its own (a subset hook caller), so one that raises only
    loses its own registrations. Cached until the set of registered plugins changes.
    """
    load_plugins()
    with _lock:
        key = pm.generation
        cached = _cache.get(hook_name)
        if cached is not None and cached[0] == key:
            return cached[1]
        for stale in [k for k in _hook_errors if k[0] == hook_name]:
            del _hook_errors[stale]
        impls = getattr(pm.hook, hook_name).get_hookimpls()
        found: list[Registration] = []
        for impl in impls:
            found.extend(_call_register_hook(hook_name, impl, impls))
        _cache[hook_name] = (key, found)
        return found


def _call_register_hook(hook_name: str, impl: pluggy.HookImpl, impls: list[pluggy.HookImpl]) -> list[Registration]:
    name = impl.plugin_name
    dist, version = plugin_source(name)
    mine: list[Registration] = []

    def register(reg_name: str, factory: Callable[..., Any], *, description: str | None = None) -> None:
        if not isinstance(reg_name, str) or not NAME_PATTERN.fullmatch(reg_name):
            raise ValueError(f"invalid name {reg_name!r}: use letters, digits, '-', '_' and '.'")
        if not callable(factory):
            raise TypeError(f"{reg_name!r}: the factory must be callable, got {type(factory).__name__}")
        if description is not None and not isinstance(description, str):
            raise TypeError(f"{reg_name!r}: description must be a str")
        if any(r.name == reg_name for r in mine):
            raise ValueError(f"{reg_name!r} is registered twice")
        mine.append(Registration(reg_name, factory, description, name, dist, version))

    try:
        if all(isinstance(i.plugin, Hashable) for i in impls):  # through pluggy, so SDPO_TRACE_PLUGINS sees it
            others = [i.plugin for i in impls if i is not impl]
            pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        else:  # pluggy keeps the plugins to leave out in a set
            impl.function(*[{"register": register}[arg] for arg in impl.argnames])
    except Exception as exc:
        _hook_errors[(hook_name, name)] = f"{hook_name} raised {type(exc).__name__}: {exc}"
        _warn(f"sdpo {describe(name)}: {hook_name} raised {type(exc).__name__}: {exc}; "
              "its registrations were dropped")
        return []
    return mine


def get_plugins() -> list[PluginInfo]:
    """Name, distribution, version, implemented hooks and error of every plugin, loaded or failed."""
    for hook_name in ("register_environments", "register_sandboxes"):
        registrations(hook_name)  # so that hook errors are known
    infos = []
    for name, plugin in pm.list_name_plugin():
        dist, version = plugin_source(name)
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        errors = [error for (_, plugin_name), error in sorted(_hook_errors.items()) if plugin_name == name]
        infos.append(PluginInfo(name=name, dist=dist, version=version, hooks=hooks,
                                error="; ".join(errors) or None))
    infos.extend(_failed.values())
    return sorted(infos, key=lambda info: info["name"])


def skipped_plugins() -> list[SkippedPlugin]:
    """Installed plugins that ``SDPO_LOAD_PLUGINS`` or the blocklist kept from loading."""
    load_plugins()
    return list(_skipped)


def reset_plugins() -> None:
    """Forget the entry-point plugins (not directly registered ones); the next access reloads them.

    For tests and for programs that change the ``SDPO_*_PLUGINS`` variables at run time.
    """
    with _lock:
        for name in list(_sources):
            if pm.has_plugin(name):
                pm.unregister(name=name)
        if _state["untrace"] is not None:
            _state["untrace"]()
        _sources.clear()
        _failed.clear()
        _hook_errors.clear()
        _skipped.clear()
        _cache.clear()
        _state.update(loaded=False, untrace=None)

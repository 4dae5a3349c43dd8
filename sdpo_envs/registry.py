"""Environments and sandboxes by name: listing, building (`make`) and config specs.

Plugins register factories, not instances (`plugins.registrations`); nothing is built until `make`.
Errors say what to do: an unknown name lists the known ones, a name that two distributions register
names both, and a name whose plugin the allowlist or blocklist keeps out names the distribution and
the variable. Run configs and the CLI name environments as `resolve_environment` specs.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sdpo_envs.env import Environment
from sdpo_envs.executors import Executor
from sdpo_envs.plugins import (
    LOAD_VAR,
    SkippedPlugin,
    describe,
    get_plugins,
    normalize,
    pm,
    registrations,
    skipped_plugins,
)
from sdpo_envs.router import MultiEnvironment
from sdpo_envs.types import EnvironmentNotFoundError, StepResult, Task

Kind = Literal["environment", "sandbox"]
_HOOKS: dict[Kind, str] = {"environment": "register_environments", "sandbox": "register_sandboxes"}


@dataclass(frozen=True)
class Parameter:
    """One parameter of a factory, for ``sdpo envs show``."""

    name: str
    annotation: str
    default: str | None
    required: bool
    help: str


@dataclass(frozen=True)
class RegisteredFactory:
    """A registered environment (or sandbox) factory and where it comes from."""

    kind: Kind
    name: str
    factory: Callable[..., Any]
    description: str
    plugin: str
    dist: str | None
    version: str | None

    @property
    def source(self) -> str:
        """``distribution sdpo-x 1.0`` or, for a plugin registered directly, ``plugin 'x'``."""
        return f"distribution {self.dist} {self.version}" if self.dist else f"plugin {self.plugin!r}"

    @property
    def factory_path(self) -> str:
        """``module:qualname`` of the factory."""
        target = _unwrap(self.factory)
        return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', type(target).__name__)}"

    def parameters(self) -> list[Parameter]:
        """The factory's keyword parameters, documented from its signature and docstring."""
        try:
            signature = inspect.signature(self.factory)
        except (TypeError, ValueError):
            return []
        docs = _param_docs(self.factory)
        params = []
        for p in signature.parameters.values():
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            annotation = "" if p.annotation is inspect.Parameter.empty else (
                p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation))
            var = p.kind is inspect.Parameter.VAR_KEYWORD
            params.append(Parameter(
                name=f"**{p.name}" if var else p.name,
                annotation=annotation,
                default=None if p.default is inspect.Parameter.empty else repr(p.default),
                required=p.default is inspect.Parameter.empty and not var,
                help=docs.get(p.name, ""),
            ))
        return params

    def takes(self, name: str) -> bool:
        """Whether the factory has a parameter called `name` (not merely ``**kwargs``)."""
        try:
            parameter = inspect.signature(self.factory).parameters.get(name)
        except (TypeError, ValueError):
            return False
        return parameter is not None and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                 inspect.Parameter.VAR_KEYWORD)

    def build(self, **kwargs: Any) -> Any:
        """Call the factory; arguments it does not take fail with its parameter list."""
        try:
            inspect.signature(self.factory).bind(**kwargs)
        except TypeError as exc:
            names = ", ".join(p.name for p in self.parameters()) or "none"
            raise TypeError(f"{self.kind} {self.name!r} ({self.source}): {exc}; its parameters: {names}") from None
        except ValueError:  # no signature to check against (some builtins)
            pass
        return self.factory(**kwargs)


@dataclass(frozen=True)
class HookFeedbackFormatter:
    """Calls the ``format_feedback`` hook for an environment built by `make` (picklable, unlike a closure)."""

    env_name: str

    def __call__(self, task: Task, result: StepResult) -> str | None:
        text: str | None = pm.hook.format_feedback(env_name=self.env_name, task=task, result=result)
        return text


# ------------------------------------------------------------------------------------------ listing
def _factories(kind: Kind) -> list[RegisteredFactory]:
    return [
        RegisteredFactory(kind, r.name, r.factory, r.description or _summary(r.factory), r.plugin, r.dist, r.version)
        for r in registrations(_HOOKS[kind])
    ]


def list_environments() -> list[RegisteredFactory]:
    """Every registered environment, sorted by name; a name two plugins register appears twice."""
    return sorted(_factories("environment"), key=lambda f: (f.name, f.dist or "", f.plugin))


def list_sandboxes() -> list[RegisteredFactory]:
    """Every registered sandbox backend, sorted by name."""
    return sorted(_factories("sandbox"), key=lambda f: (f.name, f.dist or "", f.plugin))


def get_factory(name: str, kind: Kind = "environment") -> RegisteredFactory:
    """The factory registered as `name`, or an `EnvironmentNotFoundError` that says why there is none."""
    factories = _factories(kind)
    found = [f for f in factories if f.name == name]
    if len(found) == 1:
        return found[0]
    if found:
        owners = " and ".join(f.source for f in found)
        raise EnvironmentNotFoundError(
            f"{kind} {name!r} is registered by both {owners}; uninstall one, or block one with "
            "SDPO_BLOCK_PLUGINS=<distribution>")
    hidden = _hidden_provider(name, _HOOKS[kind])
    if hidden is not None:
        if hidden.variable == LOAD_VAR:
            why = (f"{LOAD_VAR}={os.environ.get(LOAD_VAR, '')!r} does not include it; add {hidden.dist or hidden.name}"
                   f" to {LOAD_VAR} or unset it")
        else:
            why = f"{hidden.variable} blocks it; remove {hidden.dist or hidden.name} from {hidden.variable}"
        raise EnvironmentNotFoundError(
            f"{kind} {name!r} is provided by distribution {hidden.dist} {hidden.version} (plugin {hidden.name!r}), "
            f"which is not loaded: {why}")
    known = ", ".join(sorted({f.name for f in factories})) or "none"
    message = f"unknown {kind} {name!r}; registered: {known}"
    broken = [p for p in get_plugins() if p["error"]]
    if broken:
        message += "; plugins with errors: " + "; ".join(f"{describe(p['name'])}: {p['error']}" for p in broken)
    raise EnvironmentNotFoundError(message)


def _hidden_provider(name: str, hook_name: str) -> SkippedPlugin | None:
    """Which skipped plugin would register `name`: import it aside (never register it) and ask."""
    skipped = skipped_plugins()
    for plugin in skipped:
        if name in _probe(plugin, hook_name):
            return plugin
    for plugin in skipped:  # it would not import: guess from the naming convention
        if normalize(name) in {normalize(plugin.name), normalize(plugin.dist or ""), normalize(f"sdpo-{plugin.name}")}:
            return plugin
    return None


def _probe(plugin: SkippedPlugin, hook_name: str) -> list[str]:
    names: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            impl = getattr(plugin.entry_point.load(), hook_name, None)
            if impl is not None and hasattr(impl, f"{pm.project_name}_impl"):
                impl(register=lambda n, *args, **kwargs: names.append(n))
    except Exception:
        pass
    return names


# ------------------------------------------------------------------------------------------ building
EPISODE_OPTIONS = ("max_turns", "turn_discount")
"""Keywords `make` understands for every environment (`Environment.configure_episodes`)."""
EXECUTOR_OPTIONS = ("executor", "ray_address")
"""Keywords `make` understands for every environment: where its episodes run (`resolve_executor`)."""


def resolve_executor(env_name: str, executor: Any = None, ray_address: str | None = None) -> Executor | None:
    """The executor `make(env_name, executor=..., ray_address=...)` asks for: `None` or `"local"` for this
    process, `"ray"` for a `RayExecutor` on `ray_address` (default `"auto"`), or an executor object as is."""
    if ray_address is not None and executor != "ray":
        raise ValueError(f"make({env_name!r}): ray_address is for executor='ray', but executor={executor!r}")
    if executor is None or executor == "local":
        return None
    if executor == "ray":
        from sdpo_envs.ray_executor import RayExecutor

        return RayExecutor(ray_address or "auto")
    if isinstance(executor, str) or not callable(getattr(executor, "run", None)):
        raise ValueError(f"make({env_name!r}): executor must be 'local', 'ray' or an object with "
                         f"run(env, tasks, texts, workers, timeout), got {executor!r}")
    chosen: Executor = executor
    return chosen


def make(env_name: str, /, **kwargs: Any) -> Environment:
    """Build the environment registered as `env_name` with `kwargs` (e.g. ``make("reward", fn=my_fn)``).

    ``max_turns`` and ``turn_discount`` configure its episodes (`Environment.configure_episodes`) unless
    the factory takes them itself; ``max_turns`` > 1 on an environment without `respond` raises
    `ValueError`. ``executor`` and ``ray_address`` say where its episodes run (`resolve_executor`; a Ray
    cluster that does not answer raises `EnvironmentSetupError` here). The result is also a TRL reward
    function. If any plugin implements ``format_feedback``, its results are re-rendered through that hook.
    """
    factory = get_factory(env_name, "environment")
    episode_options = {key: kwargs.pop(key) for key in EPISODE_OPTIONS if key in kwargs and not factory.takes(key)}
    executor_options = {key: kwargs.pop(key) for key in EXECUTOR_OPTIONS if key in kwargs and not factory.takes(key)}
    executor = resolve_executor(env_name, **executor_options)
    env = factory.build(**kwargs)
    if not isinstance(env, Environment):
        raise TypeError(f"environment {env_name!r} ({factory.source}): the factory returned "
                        f"{type(env).__name__}, not an sdpo_envs.Environment")
    if not env.name:
        env.name = env_name
    if episode_options:
        env.configure_episodes(**episode_options)
    if executor is not None:
        env.executor = executor
    if pm.hook.format_feedback.get_hookimpls():
        env.feedback_formatter = HookFeedbackFormatter(env_name)
    return env


def make_sandbox(name: str, /, **kwargs: Any) -> Any:
    """Build the sandbox backend registered as `name`; its interface is the consuming environment's."""
    return get_factory(name, "sandbox").build(**kwargs)


@dataclass(frozen=True)
class SandboxReport:
    """Whether a registered sandbox backend works on this machine, and what it isolates (``sdpo sandbox
    doctor``). `works` is `None` when the factory has no ``describe()`` probe."""

    name: str
    source: str
    description: str
    works: bool | None
    detail: str
    isolates: tuple[str, ...] = ()
    not_isolated: tuple[str, ...] = ()


def describe_sandbox(factory: RegisteredFactory) -> SandboxReport:
    """Ask a registered sandbox factory's optional ``describe()`` about this machine (see docs/plugins/hooks.md);
    a probe that raises or answers out of protocol is reported as not working, with why."""
    report = functools.partial(SandboxReport, factory.name, factory.source, factory.description)
    describe = getattr(factory.factory, "describe", None)
    if not callable(describe):
        return report(None, "no describe() probe: cannot tell")
    try:
        info = describe()
    except Exception as exc:
        return report(False, f"describe() raised {type(exc).__name__}: {exc}")
    if not _is_sandbox_description(info):
        return report(False, f"describe() answered {info!r}, not {{'works': bool, 'detail': str, 'isolates': [str], "
                             "'not_isolated': [str]}")
    return report(info["works"], info.get("detail", ""), tuple(info.get("isolates", ())),
                  tuple(info.get("not_isolated", ())))


def _is_sandbox_description(info: Any) -> bool:
    def strings(value: Any) -> bool:
        return isinstance(value, list | tuple) and all(isinstance(x, str) for x in value)

    return (isinstance(info, Mapping) and isinstance(info.get("works"), bool)
            and isinstance(info.get("detail", ""), str)
            and strings(info.get("isolates", ())) and strings(info.get("not_isolated", ())))


EnvironmentSpec = str | Mapping[str, Any] | Environment
"""A name, ``"name:{json kwargs}"``, ``{"name": ..., **kwargs}``, or an environment (passed through)."""


def resolve_environment(spec: EnvironmentSpec) -> Environment:
    """Build an environment from a config or command-line spec (see `EnvironmentSpec`)."""
    if isinstance(spec, Environment):
        return spec
    if isinstance(spec, str):
        name, sep, raw = spec.partition(":")
        kwargs: Any = {}
        if sep:
            try:
                kwargs = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"environment spec {spec!r}: the part after ':' is not JSON ({exc})") from None
            if not isinstance(kwargs, dict):
                raise ValueError(f"environment spec {spec!r}: the part after ':' must be a JSON object")
        return make(name.strip(), **kwargs)
    if isinstance(spec, Mapping):
        if not isinstance(spec.get("name"), str):
            raise ValueError(f"environment spec {dict(spec)!r} needs a 'name' key with the registered name")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return make(spec["name"], **kwargs)
    raise TypeError(f"an environment spec is a str, a mapping or an Environment, got {type(spec).__name__}")


def make_router(specs: Mapping[str, EnvironmentSpec], *, column: str = "env",
                default: str | None = None) -> MultiEnvironment:
    """A `MultiEnvironment` from ``{key: spec}``: rows pick an environment by their `column` value."""
    return MultiEnvironment({key: resolve_environment(spec) for key, spec in specs.items()}, column=column,
                            default=default)


# ------------------------------------------------------------------------------------------ docstrings
def _unwrap(factory: Any) -> Any:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


def _docstrings(factory: Any) -> list[str]:
    target = _unwrap(factory)
    if inspect.isclass(target):  # the class's own docstring (not an inherited one), then __init__'s
        docs = [target.__dict__.get("__doc__"), getattr(target.__init__, "__doc__", None)]
    else:
        docs = [getattr(target, "__doc__", None)]
    return [inspect.cleandoc(d) for d in docs if isinstance(d, str) and d.strip()]


def _summary(factory: Any) -> str:
    """A class's own `description` attribute, else the first paragraph of the factory's own docstring."""
    target = _unwrap(factory)
    described = vars(target).get("description") if inspect.isclass(target) else None
    if isinstance(described, str) and described.strip():
        return " ".join(described.split())
    docs = _docstrings(factory)
    return " ".join(docs[0].split("\n\n")[0].split()) if docs else ""


_SECTION = re.compile(r"(Args|Arguments|Parameters|Keyword Args|Keyword Arguments)\s*:")
_SPHINX = re.compile(r":param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)")
_GOOGLE = re.compile(r"\*{0,2}(\w+)\s*(?:\(.*?\))?\s*:\s*(.*)")


def _param_docs(factory: Any) -> dict[str, str]:
    """Parameter help from Google/TRL-style ``Args:`` sections and Sphinx ``:param x:`` fields."""
    docs: dict[str, str] = {}
    for doc in _docstrings(factory):
        current, current_indent, section_indent, entry_indent = None, 0, None, None
        for line in doc.splitlines():
            text, indent = line.strip(), len(line) - len(line.lstrip())
            if not text:
                continue
            sphinx = _SPHINX.fullmatch(text)
            if sphinx:
                current, current_indent, section_indent = sphinx[1], indent, None
                docs[current] = sphinx[2]
            elif _SECTION.fullmatch(text):
                current, section_indent, entry_indent = None, indent, None
            elif section_indent is not None and indent > section_indent:
                entry_indent = indent if entry_indent is None else entry_indent
                google = _GOOGLE.fullmatch(text) if indent == entry_indent else None
                if google:
                    current, current_indent = google[1], indent
                    docs[current] = google[2]
                elif current and indent > current_indent:
                    docs[current] = f"{docs[current]} {text}".strip()
            elif current and section_indent is None and indent > current_indent:
                docs[current] = f"{docs[current]} {text}".strip()
            else:
                current, section_indent = None, None
    return docs

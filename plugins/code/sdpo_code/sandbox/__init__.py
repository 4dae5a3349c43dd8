"""Sandbox backends for the ``code`` environment, and how one is chosen by name.

Backends register through the ``register_sandboxes`` hook; sdpo-code registers its own (``bwrap``,
``process``, ``docker``) through that same hook. `get_sandbox` looks a name up in the project's registry
(`sdpo_envs.list_sandboxes` / `sdpo_envs.make_sandbox`), so a third-party backend is used like a built-in,
and falls back to the built-ins when the plugin is not loaded (tests, ``SDPO_LOAD_PLUGINS=""``).
``"auto"`` picks ``bwrap`` when its binary works here, else ``process``, and logs which. Asking for a
backend that cannot work here raises `SandboxUnavailable`: there is no silent downgrade.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from sdpo_code.sandbox.base import (
    ExecutionRequest,
    ExecutionResult,
    Sandbox,
    SandboxUnavailable,
)

logger = logging.getLogger(__name__)


def _bwrap(**options: Any) -> Sandbox:
    """Bubblewrap: every namespace, read-only system, tmpfs work dir, uid 65534 (the default where it works)."""
    from sdpo_code.sandbox.bwrap import BwrapSandbox

    return BwrapSandbox(**options)


def _process(**options: Any) -> Sandbox:
    """A subprocess with rlimits, a per-sandbox uid (root), namespaces and Landlock where available."""
    from sdpo_code.sandbox.process import ProcessSandbox

    return ProcessSandbox(**options)


def _docker(**options: Any) -> Sandbox:
    """A throw-away container per solution on a local or remote Docker engine (DOCKER_HOST)."""
    from sdpo_code.sandbox.docker import DockerSandbox

    return DockerSandbox(**options)


BUILTIN_SANDBOXES: dict[str, Callable[..., Sandbox]] = {"bwrap": _bwrap, "process": _process, "docker": _docker}


def register_builtin_sandboxes(register: Callable[..., None]) -> None:
    """What sdpo-code's ``register_sandboxes`` hook registers."""
    for name, factory in BUILTIN_SANDBOXES.items():
        register(name, factory, description=(factory.__doc__ or "").strip())


def _registered_names() -> set[str]:
    try:
        import sdpo_envs

        return {f.name for f in sdpo_envs.list_sandboxes()}
    except Exception as exc:  # no registry (an older sdpo-gym) or a broken plugin: use the built-ins
        logger.debug("sdpo-code: sandbox registry unavailable (%s); using built-in backends", exc)
        return set()


def available_sandboxes() -> list[str]:
    """Names of every backend that can be asked for (registered ones and the built-ins)."""
    return sorted(_registered_names() | set(BUILTIN_SANDBOXES))


def _options_for_process(options: dict[str, Any]) -> dict[str, Any]:
    """`options` without those the process backend does not take (``auto`` was given them for bwrap, such as
    ``reuse``), each dropped one logged: falling back must not turn a bwrap option into a crash."""
    from sdpo_code.sandbox.process import ProcessSandbox

    accepted = inspect.signature(ProcessSandbox).parameters
    dropped = sorted(set(options) - set(accepted))
    if dropped:
        logger.warning("sdpo-code: backend='auto' uses 'process', which has no option %s; ignored",
                       ", ".join(map(repr, dropped)))
    return {name: value for name, value in options.items() if name in accepted}


def get_sandbox(backend: str | Sandbox = "auto", **options: Any) -> Sandbox:
    """Build the backend named `backend` with `options`, or pass a ready `Sandbox` through.

    Raises `SandboxUnavailable` when the backend cannot work here and `ValueError` for an unknown name.
    """
    if not isinstance(backend, str):
        if not isinstance(backend, Sandbox):
            raise TypeError(f"backend must be a name or a Sandbox (with .name, .isolation, .run), got {backend!r}")
        return backend
    if backend == "auto":
        from sdpo_code.sandbox.bwrap import find_bwrap

        if find_bwrap() is not None:
            try:
                sandbox = get_sandbox("bwrap", **options)
            except SandboxUnavailable as exc:
                logger.warning("sdpo-code: backend='auto': bwrap is installed but unusable here (%s); "
                               "using the 'process' backend", exc)
            else:
                logger.info("sdpo-code: backend='auto' chose 'bwrap'")
                return sandbox
        else:
            logger.info("sdpo-code: backend='auto': no bwrap binary; using the 'process' backend")
        return get_sandbox("process", **_options_for_process(options))
    if backend in _registered_names():
        import sdpo_envs

        sandbox = sdpo_envs.make_sandbox(backend, **options)
    elif backend in BUILTIN_SANDBOXES:
        sandbox = BUILTIN_SANDBOXES[backend](**options)
    else:
        raise ValueError(f"unknown sandbox backend {backend!r}; available: {', '.join(available_sandboxes())}, "
                         "or 'auto'")
    if not isinstance(sandbox, Sandbox):
        raise TypeError(f"sandbox backend {backend!r} built {type(sandbox).__name__}, which lacks name/isolation/run")
    return sandbox


__all__ = [
    "BUILTIN_SANDBOXES",
    "ExecutionRequest",
    "ExecutionResult",
    "Sandbox",
    "SandboxUnavailable",
    "available_sandboxes",
    "get_sandbox",
    "register_builtin_sandboxes",
]

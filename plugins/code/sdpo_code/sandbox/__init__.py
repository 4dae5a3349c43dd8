"""Sandbox backends for the ``code`` environment, and how one is chosen by name.

Backends register through the ``register_sandboxes`` hook; sdpo-code registers its own (``bwrap``,
``process``, ``docker``) through that same hook. `get_sandbox` looks a name up in the project's registry
(`sdpo_envs.list_sandboxes` / `sdpo_envs.make_sandbox`), so a third-party backend is used like a built-in,
and falls back to the built-ins when the plugin is not loaded (tests, ``SDPO_LOAD_PLUGINS=""``).
``"auto"`` is ``bwrap`` when it works here and otherwise an error saying how to go on: it never falls back
to ``process``, which does not isolate enough for untrusted code and must be asked for by name. Asking for a
backend that cannot work here raises `SandboxUnavailable`: there is no silent downgrade.
"""

from __future__ import annotations

import importlib
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


class BuiltinBackend:
    """A built-in backend as registered: calling it builds one (its module is imported only then), and
    `describe` says whether it works on this machine and what it isolates (``sdpo sandbox doctor``)."""

    def __init__(self, name: str, module: str, cls: str, summary: str) -> None:
        self.name, self._module, self._cls = name, module, cls
        self.__doc__ = summary

    def _class(self) -> Any:
        return getattr(importlib.import_module(self._module), self._cls)

    def __call__(self, **options: Any) -> Sandbox:
        sandbox: Sandbox = self._class()(**options)
        return sandbox

    def describe(self) -> dict[str, Any]:
        """Build the backend with its defaults and run one tiny program in it."""
        return describe_sandbox(self, self._class())


class DockerBackend(BuiltinBackend):
    """The docker backend as registered, with the image it runs: ``sdpo sandbox build-image`` calls
    `build_image`."""

    def build_image(self, argv: list[str]) -> int:
        """Build the default image from this machine's Python (`sdpo_code.sandbox.docker_image`)."""
        from sdpo_code.sandbox.docker_image import main

        return main(argv)


BUILTIN_SANDBOXES: dict[str, BuiltinBackend] = {
    "bwrap": BuiltinBackend("bwrap", "sdpo_code.sandbox.bwrap", "BwrapSandbox",
                            "Bubblewrap: every namespace, read-only system, tmpfs work dir, uid 65534 (the default "
                            "where it works)."),
    "process": BuiltinBackend("process", "sdpo_code.sandbox.process", "ProcessSandbox",
                              "A subprocess with rlimits, a per-sandbox uid (root), namespaces and Landlock where "
                              "available; NOT a full sandbox: ask for it by name to opt in."),
    "docker": DockerBackend("docker", "sdpo_code.sandbox.docker", "DockerSandbox",
                             "A throw-away container per solution on a local or remote Docker engine "
                             "(DOCKER_HOST)."),
}


def register_builtin_sandboxes(register: Callable[..., None]) -> None:
    """What sdpo-code's ``register_sandboxes`` hook registers."""
    for name, factory in BUILTIN_SANDBOXES.items():
        register(name, factory, description=(factory.__doc__ or "").strip())


def describe_sandbox(build: Callable[[], Sandbox], cls: Any = None) -> dict[str, Any]:
    """Whether `build()` gives a sandbox that runs a program here, and what it isolates and does not.

    The answer follows the ``describe()`` protocol of sandbox factories (docs/plugins/hooks.md): ``works``,
    ``detail`` (how long the test program took, or why it did not run), ``isolates`` and ``not_isolated``
    (from the sandbox, or from its class `cls` when it cannot be built).
    """
    def claims(source: Any) -> dict[str, list[str]]:
        return {key: list(getattr(source, key, ()) or ()) for key in ("isolates", "not_isolated")}

    try:
        sandbox = build()
    except (SandboxUnavailable, RuntimeError, OSError) as exc:
        return {"works": False, "detail": str(exc), **claims(cls)}
    try:
        result = sandbox.run(ExecutionRequest(mode="stdin", code="print(input()[::-1])", inputs=("krow\n",),
                                              cpu_limits=(5.0,), wall_limits=(20.0,)))
    finally:
        close = getattr(sandbox, "close", None)
        if callable(close):
            close()
    printed = result.results.get(0, {}).get("stdout")
    works = result.done and printed == "work\n"
    detail = f"a test program ran in {result.seconds:.2f} s" if works else (
        f"a test program did not run: {result.harness_error or f'printed {printed!r}, exit {result.exit}'}")
    return {"works": works, "detail": detail, **claims(sandbox)}


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


def _opt_in() -> str:
    """How to go on without bwrap, naming what the process backend does not isolate."""
    from sdpo_code.sandbox.process import ProcessSandbox

    return ("Install bubblewrap (Debian's 'bubblewrap', or pip install 'sdpo-code[bwrap]'), use another isolating "
            "backend such as backend='docker', or opt in to running untrusted code without a full sandbox with "
            "backend='process', which does NOT isolate: " + "; ".join(ProcessSandbox.ALWAYS_NOT_ISOLATED)
            + " (and more where the kernel lacks namespaces or Landlock). 'sdpo sandbox doctor' shows what works "
            "here")


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

        if find_bwrap() is None:
            raise SandboxUnavailable(f"backend='auto': no bwrap binary here. {_opt_in()}")
        try:
            sandbox = get_sandbox("bwrap", **options)
        except SandboxUnavailable as exc:
            raise SandboxUnavailable(f"backend='auto': {exc}. {_opt_in()}") from exc
        logger.info("sdpo-code: backend='auto' chose 'bwrap'")
        return sandbox
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
    "BuiltinBackend",
    "ExecutionRequest",
    "ExecutionResult",
    "Sandbox",
    "SandboxUnavailable",
    "available_sandboxes",
    "describe_sandbox",
    "get_sandbox",
    "register_builtin_sandboxes",
]

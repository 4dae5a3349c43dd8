"""The plugin hooks of sdpo-gym (pluggy project name ``sdpo``).

A plugin is a module named by an entry point in the ``sdpo`` group; it implements any of these hooks
with ``@sdpo_envs.hookimpl``. Hooks are called synchronously; arguments may be omitted by an
implementation (pluggy passes only those it names), so adding a keyword here is compatible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from sdpo_envs.types import StepResult, Task

hookspec = pluggy.HookspecMarker("sdpo")
hookimpl = pluggy.HookimplMarker("sdpo")


@hookspec
def register_environments(register: Callable[..., None]) -> None:
    """Register environment factories.

    Call ``register(name, factory, description=None)`` once per environment. ``factory(**kwargs)``
    builds an `Environment`; nothing is built until a user asks for ``name``. Names are global:
    registering a name that another plugin already registered is an error naming both plugins.

    :param register: the registration callback.
    """


@hookspec
def register_sandboxes(register: Callable[..., None]) -> None:
    """Register code-execution backends for environments that run untrusted code.

    Call ``register(name, factory, description=None)`` once per backend. ``factory(**kwargs)``
    builds a sandbox object with the interface the consuming environment documents (the ``code``
    environment's is ``sdpo_code.sandbox.Sandbox``).

    :param register: the registration callback.
    """


@hookspec(firstresult=True)
def format_feedback(env_name: str, task: Task, result: StepResult) -> str | None:
    """Re-render the feedback text the teacher will read.

    Return a string to replace ``result.feedback.text``, or ``None`` to leave it to the next plugin.
    Stops at the first non-None result.

    :param env_name: the registered name of the environment that produced ``result``.
    :param task: the task (dataset row) of the episode.
    :param result: the episode's result, with the environment's own feedback.
    """


__all__: list[Any] = ["format_feedback", "hookimpl", "hookspec", "register_environments", "register_sandboxes"]

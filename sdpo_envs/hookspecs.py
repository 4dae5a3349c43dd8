"""The plugin hooks of sdpo-gym (pluggy project name ``sdpo``).

A plugin is a module named by an entry point in the ``sdpo`` group (``[project.entry-points.sdpo]
myenv = "sdpo_myenv"``); it implements any of these hooks as module-level functions decorated with
``@sdpo_envs.hookimpl``. Hooks are called synchronously. An implementation may omit arguments (pluggy
passes only those it names), so adding a keyword here is compatible; renaming one is not.
Each hook is documented in ``docs/plugins/hooks.md`` and tested by a ``test_hook_<name>`` test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from sdpo_envs.types import StepResult, Task

hookspec = pluggy.HookspecMarker("sdpo")
hookimpl = pluggy.HookimplMarker("sdpo")


class Register(Protocol):
    """The callback the ``register_*`` hooks receive."""

    def __call__(self, name: str, factory: Callable[..., Any], *, description: str | None = None) -> None:
        """Register ``factory`` under ``name``; ``description`` defaults to the factory's docstring summary."""


@hookspec
def register_environments(register: Register) -> None:
    """Register environment factories.

    Call ``register(name, factory, description=None)`` once per environment. ``factory(**kwargs)``
    builds an ``Environment``; nothing is built until a user asks for ``name`` (``sdpo_envs.make``).
    ``sdpo envs show`` documents the parameters from the factory's signature and docstring. Names are
    global and may not contain ``:``; two plugins registering one name make it unusable, with an error
    naming both distributions.

    :param register: the registration callback.
    """


@hookspec
def register_sandboxes(register: Register) -> None:
    """Register code-execution backends for environments that run untrusted code.

    Call ``register(name, factory, description=None)`` once per backend. ``factory(**kwargs)``
    builds a sandbox object with the interface the consuming environment documents (the ``code``
    environment's); ``sdpo_envs.make_sandbox(name, **kwargs)`` builds one by name.

    :param register: the registration callback.
    """


@hookspec(firstresult=True)
def format_feedback(env_name: str, task: Task, result: StepResult) -> str | None:
    """Re-render the feedback text the teacher will read.

    Called for each episode of an environment built by ``sdpo_envs.make``. Return a string to
    replace ``result.feedback.text``, or ``None`` to leave it to the next plugin. Stops at the first
    non-None result. An implementation that raises is logged and the environment's text is kept.

    :param env_name: the registered name of the environment that produced ``result``.
    :param task: the task (dataset row) of the episode.
    :param result: the episode's result: the environment's own feedback, and the completion's text
        in ``result.info["completion"]``.
    """


__all__ = ["Register", "format_feedback", "hookimpl", "hookspec", "register_environments", "register_sandboxes"]

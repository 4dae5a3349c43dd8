"""sdpo-gym environments: structured feedback, the Gym-style base class, episodes, the plugin registry,
and the bridges to TRL (reward functions, and `environment_factory` for TRL's multi-turn rollouts).

Plugin authors depend on this package alone (it never imports torch). Plugins load lazily, on the
first registry access (`make`, `list_environments`, `get_plugins`, ...).
"""

from sdpo_envs.env import Environment, FeedbackFormatter
from sdpo_envs.episode import Episode, episode_reward
from sdpo_envs.feedback_channel import (
    check_reward,
    check_rewards,
    completion_text,
    read_feedback,
    reset_feedback,
    write_feedback,
)
from sdpo_envs.hookspecs import Register, hookimpl
from sdpo_envs.plugins import PluginInfo, PluginLoadWarning, get_plugins
from sdpo_envs.registry import (
    EnvironmentSpec,
    RegisteredFactory,
    SandboxReport,
    describe_sandbox,
    get_factory,
    list_environments,
    list_sandboxes,
    make,
    make_router,
    make_sandbox,
    resolve_environment,
)
from sdpo_envs.router import MultiEnvironment
from sdpo_envs.sync import run_sync
from sdpo_envs.trl_environment import TRLEnvironment, environment_factory
from sdpo_envs.types import (
    Completion,
    EnvironmentNotFoundError,
    EnvironmentSetupError,
    Feedback,
    InvalidResultError,
    Prompt,
    StepResult,
    Task,
    Turn,
)

__all__ = [
    "Completion",
    "Environment",
    "EnvironmentNotFoundError",
    "EnvironmentSetupError",
    "EnvironmentSpec",
    "Episode",
    "Feedback",
    "FeedbackFormatter",
    "InvalidResultError",
    "MultiEnvironment",
    "PluginInfo",
    "PluginLoadWarning",
    "Prompt",
    "Register",
    "RegisteredFactory",
    "SandboxReport",
    "StepResult",
    "TRLEnvironment",
    "Task",
    "Turn",
    "check_reward",
    "check_rewards",
    "completion_text",
    "describe_sandbox",
    "environment_factory",
    "episode_reward",
    "get_factory",
    "get_plugins",
    "hookimpl",
    "list_environments",
    "list_sandboxes",
    "make",
    "make_router",
    "make_sandbox",
    "read_feedback",
    "reset_feedback",
    "resolve_environment",
    "run_sync",
    "write_feedback",
]

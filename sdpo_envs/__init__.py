"""sdpo-gym environments: structured feedback, the Gym-style base class and the plugin registry."""

from sdpo_envs.env import Environment
from sdpo_envs.hookspecs import hookimpl
from sdpo_envs.types import Feedback, StepResult, Task

__all__ = ["Environment", "Feedback", "StepResult", "Task", "hookimpl"]

"""sdpo-code: the ``code`` environment (Python programs against LiveCodeBench-style and HumanEval tests) and
its sandbox backends, as an sdpo-gym plugin (entry point ``sdpo: code = "sdpo_code"``).

``sdpo_envs.make("code", backend="auto", ...)`` builds a `CodeEnvironment`; see its docstring for the keyword
arguments. Loaders: `load_bundled`, `load_file`, `load_rows`, `load_dataset_rows`, `load_humaneval`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdpo_code.env import CodeEnvironment
from sdpo_code.extract import extract_code
from sdpo_code.limits import Limits
from sdpo_code.sandbox import SandboxUnavailable, available_sandboxes, get_sandbox, register_builtin_sandboxes
from sdpo_code.tasks import (
    CodeTask,
    TaskFormatError,
    TestCase,
    load_bundled,
    load_dataset_rows,
    load_file,
    load_humaneval,
    load_rows,
    normalize_row,
    parse_task,
)
from sdpo_code.verdicts import Judgement, TestOutcome, Verdict
from sdpo_envs import hookimpl


@hookimpl
def register_environments(register: Callable[..., Any]) -> None:
    register("code", CodeEnvironment, description=CodeEnvironment.description)


@hookimpl
def register_sandboxes(register: Callable[..., Any]) -> None:
    register_builtin_sandboxes(register)


__all__ = [
    "CodeEnvironment",
    "CodeTask",
    "Judgement",
    "Limits",
    "SandboxUnavailable",
    "TaskFormatError",
    "TestCase",
    "TestOutcome",
    "Verdict",
    "available_sandboxes",
    "extract_code",
    "get_sandbox",
    "load_bundled",
    "load_dataset_rows",
    "load_file",
    "load_humaneval",
    "load_rows",
    "normalize_row",
    "parse_task",
    "register_environments",
    "register_sandboxes",
]

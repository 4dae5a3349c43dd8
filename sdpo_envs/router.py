"""Multi-task training: one reward function that sends each row to the environment its `env` column names.

TRL gives every reward function every row, so mixing math and code rows needs a router rather than
two reward functions that each score the other's rows as 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sdpo_envs.env import Environment
from sdpo_envs.types import Completion, EnvironmentNotFoundError, Feedback, Prompt, Task, Turn


class MultiEnvironment(Environment):
    """Routes each task to one of several environments by the value of its `column` (default ``env``).

    Args:
        environments (`Mapping[str, Environment]`): the environments by the value rows carry.
        column (`str`, *optional*, defaults to `"env"`): the dataset column naming each row's environment.
        default (`str`, *optional*): the environment of rows without the column.
    """

    def __init__(self, environments: Mapping[str, Environment], *, column: str = "env",
                 default: str | None = None) -> None:
        if not environments:
            raise ValueError("MultiEnvironment needs at least one environment")
        for key, env in environments.items():
            if not isinstance(env, Environment):
                raise TypeError(f"MultiEnvironment: {key!r} is a {type(env).__name__}, not an Environment")
        if default is not None and default not in environments:
            raise ValueError(f"MultiEnvironment: default {default!r} is not one of {sorted(environments)}")
        self.environments = dict(environments)
        self.column = column
        self.default = default

    def route(self, task: Task, row: int | None = None) -> str:
        """The key of `task`'s environment; an unknown or missing one raises, naming the known keys."""
        key = task.get(self.column, self.default)
        where = f" (row {row})" if row is not None else ""
        if key is None:
            raise EnvironmentNotFoundError(
                f"{self.label}: task{where} has no {self.column!r} column and there is no default; "
                f"known environments: {', '.join(sorted(self.environments))}")
        if key not in self.environments:
            raise EnvironmentNotFoundError(
                f"{self.label}: unknown environment {key!r} in column {self.column!r}{where}; "
                f"known environments: {', '.join(sorted(self.environments))}")
        return str(key)

    def prompt(self, task: Task) -> Prompt:
        return self.environments[self.route(task)].prompt(task)

    @property
    def multi_turn(self) -> bool:
        """Whether every routed environment can run multi-turn episodes."""
        return all(env.multi_turn for env in self.environments.values())

    def respond(self, task: Task, history: Sequence[Turn]) -> str | None:
        """The observation of the environment `task` routes to."""
        return self.environments[self.route(task)].respond(task, history)

    def score(self, task: Task, completion: str) -> Feedback:
        (feedback,) = self.environments[self.route(task)].evaluate([task], [completion])
        return feedback

    def evaluate(
        self,
        tasks: Sequence[Task],
        completions: Sequence[Completion],
        *,
        max_workers: int | None = None,
        timeout: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> list[Feedback]:
        """As `Environment.evaluate`; a row naming an unknown environment raises before anything is scored."""
        for row, task in enumerate(tasks):
            self.route(task, row)
        return super().evaluate(tasks, completions, max_workers=max_workers, timeout=timeout, extra=extra)

    def score_batch(
        self,
        tasks: Sequence[Task],
        completions: Sequence[Completion],
        *,
        extra: Mapping[str, Any],
        max_workers: int | None,
        timeout: float | None,
    ) -> list[Feedback]:
        """Group rows by environment and evaluate the groups concurrently."""
        groups: dict[str, list[int]] = {}
        for row, task in enumerate(tasks):
            groups.setdefault(self.route(task, row), []).append(row)
        n = len(tasks)

        def run(key: str) -> list[Feedback]:
            rows = groups[key]
            sliced = {k: [v[i] for i in rows] if isinstance(v, list) and len(v) == n else v for k, v in extra.items()}
            return self.environments[key].evaluate([tasks[i] for i in rows], [completions[i] for i in rows],
                                                   max_workers=max_workers, timeout=timeout, extra=sliced)

        before = sum(env.error_count for env in self.environments.values())
        if len(groups) == 1:
            outputs = {key: run(key) for key in groups}
        else:
            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="sdpo-router") as pool:
                outputs = dict(zip(groups, pool.map(run, groups), strict=True))
        self._note_failure(sum(env.error_count for env in self.environments.values()) - before)
        results: list[Feedback | None] = [None] * n
        for key, rows in groups.items():
            for row, feedback in zip(rows, outputs[key], strict=True):
                results[row] = feedback
        return [r for r in results if r is not None]

    def close(self) -> None:
        for env in self.environments.values():
            env.close()
        super().close()

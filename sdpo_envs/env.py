"""The Gym-style environment base class.

An environment turns a task (a dataset row) into a prompt and scores completions with structured
`Feedback`. Single-turn by default: `reset(task)` returns the prompt, `step(completion)` ends the
episode. `evaluate` scores many (task, completion) pairs concurrently; `score` is the one method a
subclass must write. Every `Environment` is also a TRL reward function (see `sdpo_envs.reward`).
"""

from __future__ import annotations

import abc
import logging
import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ClassVar, Literal

from sdpo_envs.reward import RewardFunctionMixin
from sdpo_envs.types import Feedback, StepResult, Task

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, Any]]
_POLL_SECONDS = 0.02


class Environment(RewardFunctionMixin, abc.ABC):
    """Base class of every sdpo-gym environment.

    Subclasses implement `score(task, completion) -> Feedback` and, when the prompt is not the
    task's `prompt` column, `prompt(task)`. Class attributes tune `evaluate`:

    - `concurrency`: `"thread"` (default; for I/O-bound scoring or scoring that runs its own
      subprocesses) or `"process"` (for CPU-bound scoring in pure Python, or libraries that need the
      main thread, e.g. `signal.alarm`). Process environments must be picklable.
    - `max_workers`: pool size, `None` for the number of CPUs.
    - `episode_timeout`: seconds one episode may run once started; `None` for no limit. A thread
      cannot be killed, so thread environments must bound their own work; the timeout only stops
      waiting. Process episodes past it are killed with their worker.
    - `error_reward`: reward of an episode whose `score` raises or times out (`None` abstains).
    """

    name: str = ""
    description: ClassVar[str] = ""
    concurrency: ClassVar[Literal["thread", "process"]] = "thread"
    max_workers: int | None = None
    episode_timeout: float | None = None
    error_reward: float | None = 0.0

    _task: Task | None = None

    # ----------------------------------------------------------------------- what subclasses write
    @abc.abstractmethod
    def score(self, task: Task, completion: str) -> Feedback:
        """Score one completion of `task`. Must not keep per-episode state on `self`."""

    def prompt(self, task: Task) -> Prompt:
        """The prompt for `task`: its `prompt` field unless overridden."""
        if "prompt" not in task:
            raise KeyError(f"{self._label()}: task has no 'prompt' field (fields: {sorted(task)})")
        return task["prompt"]

    # --------------------------------------------------------------------------------- Gym style
    def reset(self, task: Task) -> Prompt:
        """Start an episode on `task` and return its prompt."""
        self._task = task
        return self.prompt(task)

    def step(self, completion: str) -> StepResult:
        """Score `completion` against the task of the last `reset`; the episode ends."""
        if self._task is None:
            raise RuntimeError(f"{self._label()}: step() called before reset()")
        started = time.monotonic()
        feedback = self._safe_score(self._task, completion)
        return StepResult(feedback=feedback, done=True, info={"seconds": time.monotonic() - started})

    # ------------------------------------------------------------------------------------ batched
    def evaluate(
        self,
        tasks: Sequence[Task],
        completions: Sequence[str],
        *,
        max_workers: int | None = None,
        timeout: float | None = None,
    ) -> list[Feedback]:
        """Score `completions[i]` against `tasks[i]` concurrently, in order.

        An episode that raises or runs past `timeout` (default `episode_timeout`) gets a failed
        `Feedback` with `error_reward` and the reason in `details["error"]`; the others are unaffected.
        """
        if len(tasks) != len(completions):
            raise ValueError(f"{self._label()}: {len(tasks)} tasks but {len(completions)} completions")
        if not tasks:
            return []
        timeout = self.episode_timeout if timeout is None else timeout
        workers = max(1, min(len(tasks), max_workers or self.max_workers or multiprocessing.cpu_count()))
        if self.concurrency == "process":
            return _run_in_processes(self, list(tasks), list(completions), workers, timeout)
        if workers == 1 and timeout is None:
            return [self._safe_score(t, c) for t, c in zip(tasks, completions, strict=True)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"sdpo-env-{self._label()}") as pool:
            results = _collect(pool, self._safe_score, list(tasks), list(completions), timeout, self)
            pool.shutdown(wait=False, cancel_futures=True)
        return [r if r is not None else self.failed_feedback("episode was not run") for r in results]

    # ---------------------------------------------------------------------------------- internals
    def _label(self) -> str:
        return self.name or type(self).__name__

    def _safe_score(self, task: Task, completion: str) -> Feedback:
        try:
            feedback = self.score(task, completion)
        except Exception as exc:  # the environment's fault must not crash a training run
            logger.warning("%s: score() raised %s: %s", self._label(), type(exc).__name__, exc)
            return self.failed_feedback(f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=5))
        if not isinstance(feedback, Feedback):
            return self.failed_feedback(f"score() returned {type(feedback).__name__}, expected Feedback")
        return feedback

    def failed_feedback(self, reason: str, **details: Any) -> Feedback:
        """The `Feedback` of an episode the environment could not score."""
        return Feedback(reward=self.error_reward, text="", success=False, details={"error": reason, **details})


def _collect(
    pool: Executor,
    fn: Callable[[Task, str], Feedback],
    tasks: list[Task],
    completions: list[str],
    timeout: float | None,
    env: Environment,
) -> list[Feedback | None]:
    """Submit every episode and wait; episodes running longer than `timeout` are given up on."""
    futures: dict[Future[Feedback], int] = {pool.submit(fn, t, c): i for i, (t, c) in enumerate(zip(tasks, completions))}
    results: list[Feedback | None] = [None] * len(tasks)
    started: dict[Future[Feedback], float] = {}
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=_POLL_SECONDS if timeout is not None else None)
        for future in done:
            i = futures[future]
            try:
                results[i] = future.result()
            except BrokenProcessPool:
                raise
            except Exception as exc:
                results[i] = env.failed_feedback(f"{type(exc).__name__}: {exc}")
        if timeout is None:
            continue
        now = time.monotonic()
        for future in list(pending):
            if future.running():
                started.setdefault(future, now)
                if now - started[future] > timeout:
                    pending.discard(future)
                    results[futures[future]] = env.failed_feedback(
                        f"episode timed out after {timeout:g} s", timed_out=True
                    )
    return results


def _run_in_processes(
    env: Environment, tasks: list[Task], completions: list[str], workers: int, timeout: float | None
) -> list[Feedback]:
    """A fresh spawn-context pool per call; workers still running a timed-out episode are killed."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        results = _collect(pool, env._safe_score, tasks, completions, timeout, env)
    except BrokenProcessPool as exc:
        results = [env.failed_feedback(f"a worker process died: {exc}")] * len(tasks)
    finally:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            if process.is_alive() and timeout is not None:
                process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
    return [r if r is not None else env.failed_feedback("episode was not run") for r in results]

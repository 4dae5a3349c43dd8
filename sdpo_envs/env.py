"""The Gym-style environment base class: the contract plugin authors subclass.

An environment turns a task (a dataset row) into a prompt and scores completions with structured
`Feedback`. `score` is the one method a subclass must write; `prompt`, `respond` (multi-turn),
`dataset` and `close` are optional. `reset(task)` returns the prompt and `step(completion)` plays one
turn of an episode (`sdpo_envs.episode`; single-turn unless `max_turns` > 1). `evaluate` scores many
(task, completion) pairs concurrently (the engine is `sdpo_envs.executors`). Every `Environment` is
also a TRL reward function (see `sdpo_envs.feedback_channel`).

Failure policy: an episode whose `score` raises, times out or kills its worker process gets a failed
`Feedback` (`error_reward`, the reason in `details["error"]`) and is counted in `error_count`; the
batch goes on, because one odd completion must not stop a training run. A result that breaks the
contract (not a `Feedback`, a wrong count) raises `InvalidResultError`, and an environment that cannot
run at all (an unpicklable process environment) raises `EnvironmentSetupError`: those are bugs in code.
"""

from __future__ import annotations

import abc
import inspect
import logging
import os
import threading
import traceback
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, Literal

from sdpo_envs.episode import Episode, check_episode_options
from sdpo_envs.executors import Executor, WorkerPool, run_async, run_in_threads
from sdpo_envs.feedback_channel import RewardFunctionMixin, completion_text
from sdpo_envs.sync import run_sync
from sdpo_envs.types import (
    Completion,
    EnvironmentSetupError,
    Feedback,
    InvalidResultError,
    Prompt,
    StepResult,
    Task,
    Turn,
)

logger = logging.getLogger(__name__)

FeedbackFormatter = Callable[[Task, StepResult], str | None]
"""Re-renders feedback text for the teacher; `make` installs one that calls the `format_feedback` hook."""

_count_lock = threading.Lock()
_pool_lock = threading.Lock()
# Per-instance state that is not part of the environment's definition: never pickled to workers.
# The executor too (a worker that receives the environment runs its episodes itself), and the failure count (kept
# where `evaluate` was called; were it pickled, every failure would make workers reload the environment).
_TRANSIENT = ("_sdpo_pool", "_sdpo_episode", "last_feedback", "last_results", "executor", "error_count")


class Environment(RewardFunctionMixin, abc.ABC):
    """Base class of every sdpo-gym environment.

    Subclasses implement `score(task, completion) -> Feedback` (plain or `async def`) and, when the
    prompt is not the task's `prompt` column, `prompt(task)`. Batch scorers (one call for many
    completions) override `score_batch` instead. Attributes that tune `evaluate`, settable on the
    class or the instance:

    - `concurrency`: `"thread"` (default; for I/O-bound scoring or scoring that runs its own
      subprocesses) or `"process"` (CPU-bound pure Python, or libraries that need a main thread, e.g.
      `signal.alarm`). Process environments must be picklable and defined in an importable module;
      their worker processes persist across calls (`close()` stops them).
    - `max_workers`: pool size; `None` for the number of CPUs (processes) or CPUs + 4 (threads).
    - `episode_timeout`: seconds one episode may run once started; `None` for no limit. A thread
      cannot be killed, so a thread environment must bound its own work: past the timeout its thread
      (a daemon) is abandoned and replaced. A process episode past it is killed with its worker
      process, which is then replaced. Process workers are POSIX subprocesses (see `executors`).
    - `error_reward`: reward of an episode that could not be scored (`None` abstains).
    - `executor`: where episodes run instead of this process (`None`: here, as `concurrency` says); e.g.
      a `sdpo_envs.ray_executor.RayExecutor`, or `make(name, executor="ray", ray_address=...)`. It runs
      the default `score_batch`'s episodes (an overriding `score_batch` runs where it is called).

    Attributes of episodes (`reset`/`step`; see `sdpo_envs.episode`), set with `configure_episodes`
    or by `make(name, max_turns=..., turn_discount=...)`:

    - `max_turns`: attempts per episode (default 1). More than 1 needs `respond`.
    - `turn_discount`: in (0, 1], default 1: the episode's reward after turn t is the latest
      attempt's reward times `turn_discount ** (t - 1)`.
    - `respond_timeout`: seconds `respond` may take before the episode fails (`None`: no limit).
    """

    name: str = ""
    description: ClassVar[str] = ""
    concurrency: Literal["thread", "process"] = "thread"
    max_workers: int | None = None
    episode_timeout: float | None = None
    error_reward: float | None = 0.0
    executor: Executor | None = None
    error_count: int = 0
    """Episodes this environment could not score so far (raised, timed out or crashed)."""
    feedback_formatter: FeedbackFormatter | None = None
    max_turns: int = 1
    turn_discount: float = 1.0
    respond_timeout: float | None = 30.0
    dataset: ClassVar[Callable[..., Any] | None] = None
    """Optional method `dataset(self, **options)`: the environment's own problem set (a `datasets.Dataset`
    or a list of rows), which `sdpo train` and `sdpo eval` use when no `--dataset` is given. `None` here:
    the environment has none."""

    # ----------------------------------------------------------------------- what subclasses write
    @abc.abstractmethod
    def score(self, task: Task, completion: str) -> Feedback | Awaitable[Feedback]:
        """Score one completion of `task`. Must not keep per-episode state on `self`: calls run concurrently."""

    def prompt(self, task: Task) -> Prompt:
        """The prompt for `task`: its `prompt` field unless overridden."""
        if "prompt" not in task:
            raise KeyError(f"{self.label}: task has no 'prompt' field (fields: {sorted(task)})")
        prompt: Prompt = task["prompt"]
        return prompt

    def respond(self, task: Task, history: Sequence[Turn]) -> str | None:
        """Optional, for multi-turn episodes: what the model reads before its next attempt.

        Called after a failed attempt when turns remain, with every attempt so far (`history[-1]` is
        the latest, with its `Feedback`). Return the observation (usually built from the feedback
        text; never the label unless the user asked for it), or `None` to end the episode. An
        environment that does not override it runs single-turn episodes only.
        """
        raise NotImplementedError(f"{self.label} does not implement respond(): it is single-turn")

    def score_batch(
        self,
        tasks: Sequence[Task],
        completions: Sequence[Completion],
        *,
        extra: Mapping[str, Any],
        max_workers: int | None,
        timeout: float | None,
    ) -> list[Feedback]:
        """Score a batch; `evaluate` calls it. Override for scorers that want the whole batch at once.

        The default calls `score` once per episode, concurrently as `concurrency` says. An override
        receives completions as TRL passes them (text or messages) and `extra`, the trainer's per-batch
        keywords (`trainer_state`, `completion_ids`, `log_metric`, ...; empty outside a trainer). It
        may ignore `max_workers` and `timeout`; if it raises, every episode of the batch fails.
        """
        texts = [completion_text(c) for c in completions]
        if self.executor is not None:
            return self.executor.run(self, tasks, texts, max_workers or self.max_workers, timeout)
        workers = self._workers_for(len(tasks), max_workers)
        if self.concurrency == "process":
            return self._process_pool().run(self, tasks, texts, workers, timeout)
        if inspect.iscoroutinefunction(type(self).score):
            return run_sync(run_async(self, tasks, texts, max_workers or self.max_workers, timeout))
        if workers == 1 and timeout is None:
            return [self._score_one(t, c)[0] for t, c in zip(tasks, texts, strict=True)]
        return run_in_threads(self, tasks, texts, workers, timeout)

    # --------------------------------------------------------------------------------- Gym style
    @property
    def multi_turn(self) -> bool:
        """Whether this environment can run episodes of more than one turn (it overrides `respond`)."""
        return type(self).respond is not Environment.respond

    def configure_episodes(self, *, max_turns: int | None = None, turn_discount: float | None = None) -> None:
        """Set `max_turns` and `turn_discount` (those given); a bad value raises `ValueError` naming both
        the environment and the parameter, as does `max_turns` > 1 on an environment without `respond`."""
        max_turns = self.max_turns if max_turns is None else max_turns
        turn_discount = self.turn_discount if turn_discount is None else turn_discount
        check_episode_options(self.label, max_turns, turn_discount, self.multi_turn)
        self.max_turns, self.turn_discount = max_turns, float(turn_discount)

    def reset(self, task: Task) -> Prompt:
        """Start an episode on `task` and return its prompt."""
        episode = Episode(self, task)
        self._sdpo_episode = episode
        return episode.prompt

    def step(self, completion: Completion) -> StepResult:
        """Play one turn of the episode of the last `reset` (see `sdpo_envs.episode`).

        With `max_turns=1` every call scores a fresh attempt at that task and ends (the behaviour from
        before episodes existed); with more turns, a call after the episode ended raises `RuntimeError`.
        """
        episode: Episode | None = getattr(self, "_sdpo_episode", None)
        if episode is None:
            raise RuntimeError(f"{self.label}: step() called before reset()")
        if episode.done and episode.max_turns == 1:
            episode = self._sdpo_episode = Episode(self, episode.task)
        return episode.step(completion)

    # ------------------------------------------------------------------------------------ batched
    def evaluate(
        self,
        tasks: Sequence[Task],
        completions: Sequence[Completion],
        *,
        max_workers: int | None = None,
        timeout: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> list[Feedback]:
        """Score `completions[i]` against `tasks[i]`, concurrently, and return the feedback in order.

        Args:
            tasks (`Sequence[Task]`): one dataset row per episode.
            completions (`Sequence[Completion]`): the completion of each episode (text or messages).
            max_workers (`int`, *optional*): overrides the `max_workers` attribute for this call.
            timeout (`float`, *optional*): overrides `episode_timeout` for this call.
            extra (`Mapping[str, Any]`, *optional*): the trainer's per-batch keywords, for `score_batch`.
        """
        if len(tasks) != len(completions):
            raise ValueError(f"{self.label}: {len(tasks)} tasks but {len(completions)} completions")
        if not tasks:
            return []
        timeout = self.episode_timeout if timeout is None else timeout
        try:
            results = self.score_batch(tasks, completions, extra=extra or {}, max_workers=max_workers,
                                       timeout=timeout)
        except (InvalidResultError, EnvironmentSetupError):
            raise
        except Exception as exc:
            logger.debug("%s: score_batch raised", self.label, exc_info=True)
            reason = f"{type(exc).__name__}: {exc}"
            results = [self.failed_feedback(reason, traceback=traceback.format_exc(limit=5)) for _ in tasks]
        results = self._check_results(results, len(tasks))
        failed = [r for r in results if r.failed]
        if failed:
            logger.warning("%s: %d of %d episodes could not be scored (error_count=%d, error_reward=%s); first: %s",
                           self.label, len(failed), len(results), self.error_count, self.error_reward,
                           failed[0].details["error"])
        if self.feedback_formatter is not None:
            results = self._formatted(tasks, completions, results)
        return results

    # ------------------------------------------------------------------------------ failure helpers
    def failed_feedback(self, reason: str, **details: Any) -> Feedback:
        """The `Feedback` of an episode the environment could not score; counted in `error_count`."""
        self._note_failure()
        return Feedback(reward=self.error_reward, text="", success=False, details={"error": reason, **details})

    def _note_failure(self, count: int = 1) -> None:
        with _count_lock:
            self.error_count += count

    # ------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the worker processes of a process environment (they also stop when it is collected)."""
        pool: WorkerPool | None = self.__dict__.pop("_sdpo_pool", None)
        if pool is not None:
            pool.close()

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in _TRANSIENT:
            state.pop(key, None)
        return state

    # ---------------------------------------------------------------------------------- internals
    @property
    def label(self) -> str:
        """How messages name this environment: its `name`, else its class name."""
        class_name: str = type(self).__qualname__.rsplit(".", 1)[-1]  # __name__ is shadowed by the mixin for mypy
        return self.name or class_name

    def _workers_for(self, n: int, max_workers: int | None) -> int:
        default = (os.cpu_count() or 1) if self.concurrency == "process" else min(32, (os.cpu_count() or 1) + 4)
        return max(1, min(n, max_workers or self.max_workers or default))

    def _process_pool(self) -> WorkerPool:
        with _pool_lock:
            pool: WorkerPool | None = self.__dict__.get("_sdpo_pool")
            if pool is None:
                pool = self.__dict__["_sdpo_pool"] = WorkerPool()
                weakref.finalize(self, pool.close)
            return pool

    def _score_one(self, task: Task, completion: str) -> tuple[Feedback, bool]:
        """Score one episode: its feedback, and whether it failed. Runs in worker threads and processes."""
        try:
            result = run_sync(self.score(task, completion))
        except InvalidResultError:
            raise
        except Exception as exc:  # the environment's fault must not crash a training run
            logger.debug("%s: score() raised", self.label, exc_info=True)
            reason = f"{type(exc).__name__}: {exc}"
            return self.failed_feedback(reason, traceback=traceback.format_exc(limit=5)), True
        if not isinstance(result, Feedback):
            raise InvalidResultError(f"{self.label}.score() returned {type(result).__name__}, expected Feedback")
        return result, False

    def _check_results(self, results: Any, n: int) -> list[Feedback]:
        if not isinstance(results, list) or len(results) != n:
            got = f"{len(results)} results" if isinstance(results, Sequence) else type(results).__name__
            raise InvalidResultError(f"{self.label}.score_batch() returned {got} for {n} episodes")
        for row, result in enumerate(results):
            if not isinstance(result, Feedback):
                raise InvalidResultError(f"{self.label}.score_batch() returned {type(result).__name__} for row "
                                         f"{row}, expected Feedback")
        return results

    def _formatted(
        self, tasks: Sequence[Task], completions: Sequence[Completion], results: list[Feedback]
    ) -> list[Feedback]:
        formatter = self.feedback_formatter
        assert formatter is not None
        formatted = []
        for task, completion, feedback in zip(tasks, completions, results, strict=True):
            try:
                text = formatter(task, StepResult(feedback, info={"completion": completion_text(completion)}))
            except Exception as exc:  # a plugin's rendering bug must not lose the environment's own feedback
                logger.warning("%s: format_feedback raised %s: %s; kept the environment's text", self.label,
                               type(exc).__name__, exc)
                text = None
            if text is not None and not isinstance(text, str):
                logger.warning("%s: format_feedback returned %s, not str; ignored", self.label, type(text).__name__)
                text = None
            formatted.append(feedback if text is None else replace(feedback, text=text))
        return formatted

"""sdpo-reward: the ``reward`` environment, which turns any reward callable into an sdpo-gym environment.

Why: most users already have TRL reward functions. Wrapping one keeps it working unchanged under a
plain `GRPOTrainer` and gives SDPO structured feedback when the function has any to give. Three
shapes are understood, per row, and may be mixed:

- plain scores: ``fn(prompts, completions, **kw) -> list[float | None]``;
- the seed reference's protocol: a callable whose ``last_feedback`` list holds one text per row after
  the call (reset to ``None`` before it, so a stale list is never read);
- ``(score, feedback)`` pairs or `sdpo_envs.Feedback` objects in the returned list.

Sync and async callables both work. Uses the public `sdpo_envs` API only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdpo_envs import (
    Completion,
    Environment,
    Feedback,
    InvalidResultError,
    Register,
    Task,
    check_reward,
    hookimpl,
    read_feedback,
    reset_feedback,
    run_sync,
)

__all__ = ["RewardEnvironment", "callable_name", "import_callable", "register_environments"]


def callable_name(fn: Any) -> str:
    """The name TRL would give `fn` (partials unwrapped, instances by class)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def import_callable(path: str) -> Callable[..., Any]:
    """``"package.module:attr.sub"`` (or ``"package.module.attr"``) to the object it names."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"fn={path!r}: expected an import string 'module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"fn={path!r} could not be imported: {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise TypeError(f"fn={path!r} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


class RewardEnvironment(Environment):
    """Any reward callable as an environment: plain scores, ``last_feedback``, or (score, feedback) pairs.

    The callable is called once per batch, like a TRL reward function: ``fn(prompts=..., completions=...,
    **columns)`` plus, inside a trainer, TRL's own keywords (``completion_ids``, ``trainer_state``, ...).
    A callable without ``**kwargs`` gets only the keywords it names.

    Args:
        fn (`Callable` or `str`):
            The reward callable, or an import string ``"module:attr"`` (for configs and the CLI).
        reward_name (`str`, *optional*):
            The name TRL logs the reward under (``rewards/<name>/mean``); defaults to the callable's name.
        success_threshold (`float`, *optional*, defaults to `1.0`):
            A plain score at or above this counts as a success.
        error_reward (`float`, *optional*, defaults to `0.0`):
            The reward of rows the callable raised on (`None` abstains).
        isolate_errors (`bool`, *optional*, defaults to `True`):
            When a batch call raises, call again row by row, so that only the rows that raise fail.
    """

    def __init__(self, fn: Callable[..., Any] | str, *, reward_name: str | None = None,
                 success_threshold: float = 1.0, error_reward: float | None = 0.0,
                 isolate_errors: bool = True) -> None:
        self.fn: Callable[..., Any] = import_callable(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"fn must be a callable or an import string, got {type(fn).__name__}")
        self.fn_name = callable_name(self.fn)
        self.name = reward_name or self.fn_name
        self.success_threshold = success_threshold
        self.error_reward = error_reward
        self.isolate_errors = isolate_errors
        self._lock = threading.Lock()  # the last_feedback protocol is one shared slot per callable

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def score(self, task: Task, completion: str) -> Feedback:
        return self._call([task], [completion], {})[0]

    def score_batch(self, tasks: Sequence[Task], completions: Sequence[Completion], *, extra: Mapping[str, Any],
                    max_workers: int | None, timeout: float | None) -> list[Feedback]:
        """One call for the whole batch; if it raises, one call per row (see `isolate_errors`)."""
        try:
            return self._call(tasks, completions, extra)
        except InvalidResultError:
            raise
        except Exception:
            if not self.isolate_errors or len(tasks) == 1:
                raise  # evaluate() turns it into failed feedback for every row
        n = len(tasks)
        results = []
        for i in range(n):
            row_extra = {k: [v[i]] if isinstance(v, list) and len(v) == n else v for k, v in extra.items()}
            try:
                results.extend(self._call([tasks[i]], [completions[i]], row_extra))
            except InvalidResultError:
                raise
            except Exception as exc:
                results.append(self.failed_feedback(f"{type(exc).__name__}: {exc}"))
        return results

    # ------------------------------------------------------------------------------------ internals
    def _call(self, tasks: Sequence[Task], completions: Sequence[Completion],
              extra: Mapping[str, Any]) -> list[Feedback]:
        columns: dict[str, list[Any]] = {}
        for task in tasks:
            for key in task:
                if key != "prompt" and key not in columns:
                    columns[key] = [t.get(key) for t in tasks]
        kwargs = self._accepted({"prompts": [t.get("prompt") for t in tasks], "completions": list(completions),
                                 **columns, **extra})
        with self._lock:
            previous = reset_feedback(self.fn, self.fn_name)
            output = run_sync(self.fn(**kwargs))
            texts = read_feedback(self.fn, self.fn_name, len(tasks), previous)
        return self._to_feedback(output, texts, len(tasks))

    @functools.cached_property
    def _parameters(self) -> tuple[frozenset[str], bool]:
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            return frozenset(), True
        var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        return frozenset(p.name for p in params), var_keyword

    def _accepted(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        names, var_keyword = self._parameters
        return kwargs if var_keyword else {k: v for k, v in kwargs.items() if k in names}

    def _to_feedback(self, output: Any, texts: list[str] | None, n: int) -> list[Feedback]:
        if not isinstance(output, Sequence) or isinstance(output, (str, bytes)):
            raise InvalidResultError(f"reward function {self.fn_name!r} returned {type(output).__name__}, "
                                     "expected a list with one value per row")
        if len(output) != n:
            raise InvalidResultError(f"reward function {self.fn_name!r} returned {len(output)} values for {n} rows")
        results = []
        for row, value in enumerate(output):
            text = texts[row] if texts is not None else ""
            if isinstance(value, Feedback):
                results.append(value)
                continue
            if isinstance(value, tuple) and len(value) == 2:
                value, pair_text = value
                if pair_text is not None and not isinstance(pair_text, str):
                    raise InvalidResultError(f"reward function {self.fn_name!r}: the feedback of row {row} is "
                                             f"{type(pair_text).__name__}, expected str or None")
                text = pair_text or text
            reward = self._number(value, row)
            success = reward is not None and reward >= self.success_threshold
            results.append(Feedback(reward=reward, text=text, success=success))
        return results

    def _number(self, value: Any, row: int) -> float | None:
        """A finite float or `None` (sdpo_envs' rule: `inf` and NaN are errors, `None` abstains)."""
        if hasattr(value, "item") and not isinstance(value, numbers.Real):  # 0-d tensors and arrays
            with contextlib.suppress(TypeError, ValueError, RuntimeError):  # not a scalar: reported below
                value = value.item()
        return check_reward(value, name=self.fn_name, row=row)


@hookimpl
def register_environments(register: Register) -> None:
    """Register the ``reward`` environment."""
    register("reward", RewardEnvironment)

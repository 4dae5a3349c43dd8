"""What every sandbox backend takes and returns.

A backend runs the harness (``_harness.py``) on one solution and reports the harness's events unjudged:
comparing outputs happens in the trainer process (``sdpo_code.runner``), so expected outputs never enter a
sandbox. Backends differ only in how they isolate the process.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from sdpo_code.limits import Limits

Mode = Literal["stdin", "functional", "humaneval"]

HARNESS_SOURCE = (Path(__file__).with_name("_harness.py")).read_text(encoding="utf-8")
"""The harness, passed as ``python -I -c HARNESS_SOURCE`` so no file has to be placed in the sandbox."""


class SandboxUnavailable(RuntimeError):
    """The requested backend cannot work on this machine (no binary, no daemon, no permission)."""


@dataclass(frozen=True)
class ExecutionRequest:
    """One solution and the inputs of its tests, with limits.

    `inputs` are stdin strings (`mode="stdin"`), argument lists (`"functional"`), or one placeholder per
    `check` call (`"humaneval"`). Limits are per test: `cpu_limits` in CPU seconds (the real limit),
    `wall_limits` in wall seconds (a backstop for sleeping or blocked programs). HumanEval's `test_code` and
    `check_prefix` (the prompt, whose helpers the checks may call) run in the harness's judge, never in the
    process that runs `code`. `limits` gives the rest (memory, output, processes, files, the whole run's wall
    budget); its per-test CPU and wall fields are already in `cpu_limits` and `wall_limits`.
    """

    mode: Mode
    code: str
    inputs: tuple[Any, ...]
    cpu_limits: tuple[float, ...]
    wall_limits: tuple[float, ...]
    func_name: str | None = None
    prefix: str | None = None
    test_code: str | None = None
    entry_point: str | None = None
    check_prefix: str | None = None
    limits: Limits = field(default_factory=Limits)
    stop_on: tuple[str, ...] = ()
    startup_timeout: float = 20.0

    def __post_init__(self) -> None:
        n = len(self.inputs)
        if len(self.cpu_limits) != n or len(self.wall_limits) != n:
            raise ValueError(f"ExecutionRequest: {n} inputs but {len(self.cpu_limits)} cpu limits and "
                             f"{len(self.wall_limits)} wall limits")

    @property
    def total_wall_limit(self) -> float:
        """Whole-run wall budget: the per-test backstops plus start-up and slack."""
        if self.limits.task_time_limit is not None:
            return self.limits.task_time_limit
        return sum(self.wall_limits) + (self.wall_limits[0] if self.wall_limits else 0.0) + 10.0

    @property
    def cpu_hard(self) -> int:
        """The whole run's ``RLIMIT_CPU`` hard limit (SIGKILL): every test's limit plus slack."""
        budget = sum(self.cpu_limits) + (self.cpu_limits[0] if self.cpu_limits else 0) + 2 * len(self.inputs) + 5
        return int(budget) + 1

    def payload(self, **extra: Any) -> bytes:
        """The JSON document the harness reads on stdin, after a line with its length."""
        biggest_input = max((len(x.encode("utf-8", "surrogateescape")) for x in self.inputs if isinstance(x, str)),
                            default=0)
        doc = {
            "mode": self.mode,
            "code": self.code,
            "inputs": list(self.inputs),
            "cpu_limits": list(self.cpu_limits),
            "wall_limits": list(self.wall_limits),
            "func_name": self.func_name,
            "prefix": self.prefix,
            "test_code": self.test_code,
            "entry_point": self.entry_point,
            "check_prefix": self.check_prefix,
            "memory_bytes": self.limits.memory_bytes,
            "output_bytes": self.limits.output_bytes,
            "fsize_hard": max(biggest_input, self.limits.output_bytes) + 1,
            "cpu_hard": self.cpu_hard,
            "nproc": self.limits.nproc,
            "nofile": self.limits.nofile,
            "stop_on": list(self.stop_on),
            **extra,
        }
        body = json.dumps(doc).encode("utf-8", errors="surrogateescape")
        return b"%d\n" % len(body) + body


@dataclass(frozen=True)
class ExecutionResult:
    """The harness's events for one solution, as the trainer process saw them.

    Args:
        ready (`bool`): the harness started and applied its limits; after this point anything that goes
            wrong is the submitted program's doing, before it the sandbox's (a harness error).
        results (`Mapping[int, Mapping]`): the harness's per-test `result` events by test index (-1 is the
            module set-up of functional and HumanEval code).
        compile_error (`Mapping` or `None`): the `compile_error` event, if the code did not compile.
        started (`tuple[int, ...]`): indices the harness said it started, in order.
        exit (`Mapping` or `None`): the supervisor's report on the worker (exit `code` or `signal`, `cpu`).
        killed (`str` or `None`): why the trainer killed the sandbox (`"startup"`, `"task_wall"`, `"flood"`).
        harness_error (`str` or `None`): set when the sandbox itself failed: the reward must abstain.
        done (`bool`): the harness finished every test it meant to run.
        seconds (`float`): wall time of the whole execution, start-up included.
        startup_seconds (`float`): time until the harness said `ready`.
    """

    ready: bool
    results: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    compile_error: Mapping[str, Any] | None = None
    started: tuple[int, ...] = ()
    exit: Mapping[str, Any] | None = None
    killed: str | None = None
    harness_error: str | None = None
    done: bool = False
    seconds: float = 0.0
    startup_seconds: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Sandbox(Protocol):
    """A code-execution backend. Third parties add one through the ``register_sandboxes`` hook.

    `name` is the registered name; `isolation` a one-line statement of what it isolates (logged once per
    run). `run` must be thread-safe: the environment calls it from a pool of threads.
    """

    name: str
    isolation: str

    def run(self, request: ExecutionRequest) -> ExecutionResult: ...

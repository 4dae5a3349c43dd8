"""The resource limits of one submission: their defaults and their checks, in one place.

`CodeEnvironment` holds one `Limits`; `sdpo_code.runner` turns it into per-test CPU and wall limits on the
`ExecutionRequest`, which carries the same value to the sandbox and the harness (rlimits there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Resource limits of one submission.

    Args:
        time_limit (`float`): CPU seconds per test when the task has no ``time_limit`` of its own.
        wall_factor (`float`) and wall_slack (`float`): per-test wall backstop =
            ``time_limit * wall_factor + wall_slack`` seconds (only sleeping or blocked programs reach it:
            CPU time is what is limited, so contention with other sandboxes does not cause timeouts).
        task_time_limit (`float` or `None`): wall seconds for the whole submission; `None` for the sum of
            the per-test backstops plus slack.
        memory_mb (`int`): address-space limit (``RLIMIT_AS``) in MiB.
        output_bytes (`int`): stdout bytes per test before Output Limit Exceeded (``RLIMIT_FSIZE`` too).
        nproc (`int`): processes and threads the program may have (``RLIMIT_NPROC``; docker's PIDs cap).
        nofile (`int`): open file descriptors per process (``RLIMIT_NOFILE``).
    """

    time_limit: float = 1.0
    wall_factor: float = 3.0
    wall_slack: float = 1.0
    task_time_limit: float | None = None
    memory_mb: int = 1024
    output_bytes: int = 8 << 20
    nproc: int = 64
    nofile: int = 64

    def __post_init__(self) -> None:
        for name in ("time_limit", "wall_factor", "memory_mb", "output_bytes", "nproc", "nofile"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Limits: {name} must be a positive number, got {value!r}")
        for name in ("memory_mb", "output_bytes", "nproc", "nofile"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"Limits: {name} must be an integer, got {getattr(self, name)!r}")
        if self.wall_factor < 1:
            raise ValueError(f"Limits: wall_factor must be at least 1, got {self.wall_factor!r}")
        if self.wall_slack < 0:
            raise ValueError(f"Limits: wall_slack must not be negative, got {self.wall_slack!r}")
        if self.task_time_limit is not None and self.task_time_limit <= 0:
            raise ValueError(f"Limits: task_time_limit must be positive, got {self.task_time_limit!r}")
        if self.nofile < 16:
            raise ValueError(f"Limits: nofile must be at least 16 (the interpreter needs a few), got {self.nofile}")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb << 20

    def replace(self, **changes: Any) -> Limits:
        """A copy with `changes` applied (checked like a new value)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def coerce(cls, value: Limits | Mapping[str, Any] | None) -> Limits:
        """`value` as `Limits`: a `Limits`, a mapping of its fields (as ``--env-kwargs`` JSON gives), or `None`
        for the defaults. An unknown field is an error naming it."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"Limits: unknown field(s) {unknown}; known: {sorted(known)}")
            return cls(**value)
        raise TypeError(f"limits must be a Limits or a mapping of its fields, got {type(value).__name__}")

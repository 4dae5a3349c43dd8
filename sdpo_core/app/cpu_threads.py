"""CPU threads for a run on a shared machine: use the cores other processes leave idle, and keep checking.

PyTorch's CPU kernels spin-wait for all their threads, so one oversubscribed core slows every kernel: on a
2-core VM a 2-thread generation ran about 5 times slower than a 1-thread one once another job took a core.
The load average cannot tell: it lags by minutes (after a busy minute an idle machine still shows ~2), and it
counts our own threads. So the busy cores of *other* processes are measured from two snapshots of
`/proc/stat` (all CPU time) and `/proc/self/stat` (ours), and the thread count follows them at every step.

Only on Linux CPUs, only when the user did not choose (`OMP_NUM_THREADS`), never on CUDA.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative clock ticks: busy and total over all CPUs, and this process's own (all its threads)."""

    busy: int
    total: int
    own: int


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(busy, total) ticks from the aggregate ``cpu`` line of `/proc/stat` (idle and iowait are not busy)."""
    line = next((ln for ln in text.splitlines() if ln.startswith("cpu ")), None)
    if line is None:
        raise ValueError("no aggregate 'cpu' line in /proc/stat")
    fields = [int(x) for x in line.split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def parse_self_stat(text: str) -> int:
    """utime + stime ticks of a process from its `/proc/<pid>/stat` (fields 14 and 15, after the command)."""
    rest = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(rest[11]) + int(rest[12])


def other_busy_cores(before: CpuTimes, after: CpuTimes, cores: int) -> float:
    """How many cores processes other than ours kept busy between two snapshots."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, cores * others / total)


def threads_for(cores: int, others_busy: float) -> int:
    """Threads that fit beside the other processes: the idle cores, at least one, at most `cores`."""
    return max(1, min(cores, round(cores - others_busy)))


def read_cpu_times(root: Path = Path("/proc")) -> CpuTimes | None:
    """A snapshot, or `None` where `/proc` does not have it (not Linux, a restricted container)."""
    try:
        busy, total = parse_proc_stat((root / "stat").read_text())
        own = parse_self_stat((root / "self" / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None
    return CpuTimes(busy, total, own)


def idle_cores(cores: int | None = None, window: float = 0.5) -> int | None:
    """How many of `cores` (default: all CPUs) other processes leave idle over the next `window` seconds."""
    cores = cores or os.cpu_count() or 1
    before = read_cpu_times()
    time.sleep(window)
    after = read_cpu_times()
    if before is None or after is None:
        return None
    return threads_for(cores, other_busy_cores(before, after, cores))


def user_chose_threads() -> bool:
    import torch

    return "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available()


class CpuThreadFitter:
    """Sets `torch.set_num_threads` to the cores others leave idle, measured since the previous `fit()`."""

    def __init__(self, cores: int | None = None) -> None:
        import torch

        self.cores = cores or torch.get_num_threads()
        self._last = read_cpu_times()

    @property
    def available(self) -> bool:
        return self._last is not None

    def fit(self) -> int | None:
        """Re-measure and set the thread count; returns it, or `None` when nothing could be measured."""
        import torch

        now = read_cpu_times()
        if now is None or self._last is None:
            return None
        threads = threads_for(self.cores, other_busy_cores(self._last, now, self.cores))
        self._last = now
        if threads != torch.get_num_threads():
            logger.info("CPU threads: %d -> %d (other processes' load changed)", torch.get_num_threads(), threads)
            torch.set_num_threads(threads)
        return threads

    def fit_now(self, window: float = 0.5) -> int | None:
        """Measure over a short `window` from now (used once at start, before any step has run)."""
        self._last = read_cpu_times()
        time.sleep(window)
        return self.fit()


class CpuThreadsCallback(TrainerCallback):
    """Re-fits the thread count before every optimizer step, from what other processes used during the last."""

    def __init__(self, fitter: CpuThreadFitter) -> None:
        self.fitter = fitter

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self.fitter.fit()


def start_fitting() -> CpuThreadFitter | None:
    """Fit the thread count now; the fitter to keep fitting with, or `None` when the user or CUDA decides."""
    if user_chose_threads():
        return None
    fitter = CpuThreadFitter()
    if not fitter.available:
        return None
    fitter.fit_now()
    return fitter

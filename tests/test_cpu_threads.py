"""Thread fitting on a shared CPU: other processes' busy cores from /proc snapshots, and the thread count."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from sdpo_core.app import cpu_threads
from sdpo_core.app.cpu_threads import (
    CpuThreadFitter,
    CpuTimes,
    other_busy_cores,
    parse_proc_stat,
    parse_self_stat,
    read_cpu_times,
    threads_for,
)

PROC_STAT = """cpu  100 5 20 1000 50 1 2 3 0 0
cpu0 50 2 10 500 25 1 1 2 0 0
cpu1 50 3 10 500 25 0 1 1 0 0
intr 12345
"""
# pid (comm) state ppid ... field 14 utime = 70, field 15 stime = 9; the command holds a space and a ')'
SELF_STAT = "4242 (python) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 70 9 0 0 20 0 3 0 100 0 0"


def test_parse_proc_stat_counts_idle_and_iowait_as_not_busy() -> None:
    busy, total = parse_proc_stat(PROC_STAT)
    assert busy == 100 + 5 + 20 + 1 + 2 + 3
    assert total == busy + 1000 + 50


def test_parse_proc_stat_without_aggregate_line_names_the_problem() -> None:
    with pytest.raises(ValueError, match="'cpu' line"):
        parse_proc_stat("cpu0 1 2 3 4\n")


def test_parse_self_stat_survives_a_command_with_parentheses_and_spaces() -> None:
    assert parse_self_stat(SELF_STAT) == 70 + 9


def test_other_busy_cores_subtracts_our_own_time() -> None:
    # 2 cores, 200 ticks elapsed in all; 150 busy, 100 of them ours -> others kept 0.5 cores busy.
    before, after = CpuTimes(busy=0, total=0, own=0), CpuTimes(busy=150, total=200, own=100)
    assert other_busy_cores(before, after, cores=2) == pytest.approx(0.5)
    # Our spin-waiting can make our share exceed the measured busy time by rounding: never negative.
    assert other_busy_cores(before, CpuTimes(busy=90, total=200, own=100), cores=2) == 0.0
    assert other_busy_cores(after, after, cores=2) == 0.0  # no time elapsed


@pytest.mark.parametrize(("others", "expected"), [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (1.9, 1), (6.0, 1)])
def test_threads_for_two_cores(others: float, expected: int) -> None:
    assert threads_for(2, others) == expected


def test_threads_for_never_exceeds_the_cores() -> None:
    assert threads_for(8, 0.0) == 8
    assert threads_for(8, 2.6) == 5


def test_read_cpu_times_from_a_proc_tree(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "stat").write_text(PROC_STAT)
    (tmp_path / "self" / "stat").write_text(SELF_STAT)
    assert read_cpu_times(tmp_path) == CpuTimes(busy=131, total=1181, own=79)
    assert read_cpu_times(tmp_path / "missing") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_real_snapshots_see_our_own_work() -> None:
    before = read_cpu_times()
    assert before is not None
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = read_cpu_times()
    assert after is not None
    assert after.own - before.own >= 10  # 0.3 CPU seconds at 100 ticks/s, give or take a tick
    assert after.busy - before.busy >= after.own - before.own - 5


def test_fitter_follows_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = iter([
        CpuTimes(0, 0, 0),
        CpuTimes(190, 200, 100),  # another process took 0.9 of a core: 1 thread
        CpuTimes(390, 400, 290),  # it stopped: both cores are ours again
    ])
    monkeypatch.setattr(cpu_threads, "read_cpu_times", lambda: next(snapshots))
    threads = torch.get_num_threads()
    try:
        fitter = CpuThreadFitter(cores=2)
        assert fitter.fit() == 1
        assert torch.get_num_threads() == 1
        assert fitter.fit() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_start_fitting_leaves_a_user_choice_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads.start_fitting() is None


def test_idle_cores_from_two_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = iter([CpuTimes(0, 0, 0), CpuTimes(100, 200, 0)])  # others kept 1 of 2 cores busy
    monkeypatch.setattr(cpu_threads, "read_cpu_times", lambda: next(snapshots))
    assert cpu_threads.idle_cores(cores=2, window=0.0) == 1
    monkeypatch.setattr(cpu_threads, "read_cpu_times", lambda: None)
    assert cpu_threads.idle_cores(cores=2, window=0.0) is None

"""Shared fixtures: the local sandbox backends (built once), the plugin registered directly, and a check
that a submission left nothing behind."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import sdpo_code
from sdpo_code.sandbox import Sandbox, SandboxUnavailable, get_sandbox
from sdpo_code.sandbox._system import UID_BASE, UID_SLOTS

from sdpo_envs.testing import registered_plugin

LOCAL_BACKENDS = ("bwrap", "bwrap-fresh", "process")
_OPTIONS = {"bwrap-fresh": ("bwrap", {"reuse": False})}  # a new sandbox per solution instead of a reused one
_built: dict[str, Sandbox | str] = {}


def local_sandbox(name: str) -> Sandbox:
    """The named local backend, built once per session; skips (with the reason) where it cannot work."""
    if name not in _built:
        backend, options = _OPTIONS.get(name, (name, {}))
        try:
            _built[name] = get_sandbox(backend, **options)
        except SandboxUnavailable as exc:
            _built[name] = str(exc)
    built = _built[name]
    if isinstance(built, str):
        pytest.skip(built)
    return built


@pytest.fixture(params=LOCAL_BACKENDS)
def sandbox(request: pytest.FixtureRequest) -> Sandbox:
    return local_sandbox(request.param)


@pytest.fixture
def code_plugin() -> Iterator[str]:
    """sdpo_code registered with the project's plugin manager for one test (installed plugins stay off)."""
    with registered_plugin(sdpo_code, name="sdpo-code-under-test") as name:
        yield name


def sandbox_processes() -> list[tuple[int, str]]:
    """Processes that belong to a sandbox of this test process: a sandbox uid (as root) or the harness in their
    command line, descending from us or orphaned (their ancestry leads to the host's init through sandbox
    processes only). Other test runs on the same machine have their own sandboxes: those are not ours.

    An idle reused bwrap sandbox is not a leftover: its bwrap and its PID 1 (the harness in ``--serve`` mode)
    wait for the next solution. Anything else in its namespace is.
    """
    candidates: dict[int, str] = {}
    parents: dict[int, int] = {}
    idle: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                status = f.read().splitlines()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            uid = next(int(line.split()[1]) for line in status if line.startswith(b"Uid:"))
            nspid = next(line.split()[1:] for line in status if line.startswith(b"NSpid:"))
            parents[int(entry)] = next(int(line.split()[1]) for line in status if line.startswith(b"PPid:"))
        except (OSError, StopIteration, ValueError):
            continue
        cmdline = b" ".join(argv).decode(errors="replace")
        if argv[-1:] == [b"--serve"] and (nspid[-1] == b"1" or argv[0].endswith(b"bwrap")):
            idle.add(int(entry))
        elif UID_BASE <= uid < UID_BASE + UID_SLOTS + 1 or "sdpo-code-harness" in cmdline:
            candidates[int(entry)] = cmdline[:80]
    return [(pid, cmdline) for pid, cmdline in candidates.items() if _ours(pid, parents, set(candidates) | idle)]


def _ours(pid: int, parents: dict[int, int], sandboxed: set[int]) -> bool:
    """Whether `pid` descends from this process, or is an orphan whose ancestors are all sandbox processes."""
    seen = set()
    while pid not in seen:
        seen.add(pid)
        parent = parents.get(pid, 0)
        if parent == os.getpid():
            return True
        if parent in (0, 1) or parent not in parents:
            return True  # reparented to the host's init (or its parent is already gone): an escaped orphan
        if parent not in sandboxed:
            return parent == os.getpid()
        pid = parent
    return True


def assert_no_leftovers(timeout: float = 3.0) -> None:
    """Nothing of any sandbox survives (kernel clean-up of a PID namespace can take a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        left = sandbox_processes()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"sandbox processes survived: {left}"


@pytest.fixture
def no_leftovers():
    """`no_leftovers()` asserts that no sandbox process survives."""
    return assert_no_leftovers


@pytest.fixture
def backend_by_name():
    """`backend_by_name(name)`: a local backend, skipping where it cannot work."""
    return local_sandbox

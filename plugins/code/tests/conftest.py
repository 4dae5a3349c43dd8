"""Shared fixtures: the local sandbox backends (built once), the plugin registered directly, and a check
that a submission left nothing behind."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import socket
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator

import pytest
import sdpo_code
from sdpo_code import load_bundled
from sdpo_code.sandbox import Sandbox, SandboxUnavailable, get_sandbox
from sdpo_code.sandbox._system import UID_BASE, UID_SLOTS

from sdpo_envs.testing import registered_plugin

LOCAL_BACKENDS = ("bwrap", "bwrap-fresh", "process", "docker")
_OPTIONS = {"bwrap-fresh": ("bwrap", {"reuse": False})}  # a new sandbox per solution instead of a reused one
_built: dict[str, Sandbox | str] = {}
_dockerd: list[subprocess.Popen[bytes]] = []


def private_docker_engine() -> str:
    """The address of a Docker engine for this test session: a private ``dockerd`` (its own socket and
    data-root, no network set-up, overlay2 storage or else vfs) with the sandbox image built into it, started
    on first use (the caller caches the answer) and stopped at the end of the session. Raises
    `SandboxUnavailable` with the reason where it cannot start."""
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        raise SandboxUnavailable("no private Docker engine: " + ("dockerd is not installed (Debian's docker.io)"
                                                                  if dockerd is None else "not root"))
    reasons = []
    for driver in ("overlay2", "vfs"):  # overlay2 starts a container ~5x faster; vfs works everywhere
        root = tempfile.mkdtemp(prefix="sdpo-dockerd-")
        sock = f"{root}/docker.sock"
        if _start_dockerd(dockerd, root, driver):
            break
        reasons.append(f"with {driver}, see {root}/dockerd.log")
    else:
        raise SandboxUnavailable("dockerd did not start (" + "; ".join(reasons) + ")")
    os.environ["SDPO_TEST_DOCKER_HOST"] = f"unix://{sock}"
    import docker
    from sdpo_code.sandbox.docker_image import build_image

    build_image(docker.DockerClient(base_url=f"unix://{sock}"))
    return f"unix://{sock}"


def _start_dockerd(dockerd: str, root: str, driver: str) -> bool:
    """Start dockerd in `root` with storage `driver`; whether its socket answers within a minute."""
    sock = f"{root}/docker.sock"
    log = open(f"{root}/dockerd.log", "wb")  # noqa: SIM115 - kept open for dockerd's lifetime
    proc = subprocess.Popen([dockerd, "--iptables=false", "--bridge=none", f"--storage-driver={driver}",
                             "--data-root", f"{root}/data", "--exec-root", f"{root}/exec",
                             "--pidfile", f"{root}/dockerd.pid", "-H", f"unix://{sock}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _dockerd.append(proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return True
        except OSError:
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    return False


def stop_private_docker_engine() -> None:
    for proc in _dockerd:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pytest_sessionfinish(session: pytest.Session) -> None:
    stop_private_docker_engine()


def local_sandbox(name: str) -> Sandbox:
    """The named backend (the local ones, and docker on a private engine), built once per session; skips
    (with the reason) where it cannot work."""
    if name not in _built:
        backend, options = _OPTIONS.get(name, (name, {}))
        try:
            if backend == "docker":
                options = {"base_url": private_docker_engine()}
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
    """Processes that belong to a sandbox of this test run: a sandbox uid (as root) or the harness in their
    command line, descending from this process or orphaned.

    An idle reused bwrap sandbox is not a leftover: its bwrap and its PID 1 (the harness in ``--serve`` mode)
    wait for the next solution. Anything else in its namespace is. Sandboxes of other test runs on the same
    machine (whose ancestry reaches a process outside any sandbox that is not this one) are theirs, not ours.
    """
    me = os.getpid()
    parents: dict[int, int] = {}
    sandboxed: set[int] = set()  # every sandbox process, idle served ones included
    candidates = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
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
        if not (UID_BASE <= uid < UID_BASE + UID_SLOTS + 1 or "sdpo-code-harness" in cmdline):
            continue
        sandboxed.add(int(entry))
        if not (argv[-1:] == [b"--serve"] and (nspid[-1] == b"1" or argv[0].endswith(b"bwrap"))):
            candidates.append((int(entry), cmdline[:80]))
    return [(pid, cmdline) for pid, cmdline in candidates if _ours_or_orphaned(pid, me, parents, sandboxed)]


def _ours_or_orphaned(pid: int, me: int, parents: dict[int, int], sandboxed: set[int]) -> bool:
    """Whether `pid`'s ancestors reach `me`, or reach PID 1 through sandbox processes only (an orphan: nobody
    else's either). An ancestor outside any sandbox that is not `me` is another test run: theirs."""
    seen = set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
        if pid == me:
            return True
        if pid not in sandboxed:
            return pid in (0, 1)
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


REFERENCE_SOLUTIONS = {  # a right program for each bundled problem
    "sdpo-001": "a, b = map(int, input().split())\nprint(a + b)",
    "sdpo-002": "print(input().strip()[::-1])",
    "sdpo-003": "input()\nprint(max(map(int, input().split())))",
    "sdpo-004": "print(sum(c in 'aeiou' for c in input()))",
    "sdpo-005": "n = int(input())\nprint('FizzBuzz' if n % 15 == 0 else 'Fizz' if n % 3 == 0 "
                "else 'Buzz' if n % 5 == 0 else n)",
    "sdpo-006": "input()\nprint(sum(map(int, input().split())))",
    "sdpo-007": "input()\nxs = list(map(int, input().split()))\nprint(min(xs), max(xs))",
    "sdpo-008": "class Solution:\n    def isPalindrome(self, s: str) -> bool:\n        return s == s[::-1]",
    "sdpo-009": "import math\nclass Solution:\n    def factorial(self, n: int) -> int:\n"
                "        return math.factorial(n)",
    "sdpo-010": "class Solution:\n    def evens(self, nums: List[int]) -> List[int]:\n"
                "        return [x for x in nums if x % 2 == 0]",
    "sdpo-011": "class Solution:\n    def fib(self, n: int) -> int:\n        a, b = 0, 1\n        for _ in range(n):\n"
                "            a, b = b, a + b\n        return a",
    "sdpo-012": "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
                "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                "                return [seen[target - x], i]\n            seen[x] = i",
}


@pytest.fixture
def reference_solutions() -> dict[str, str]:
    """A right program for each bundled problem, by task id."""
    return REFERENCE_SOLUTIONS


@pytest.fixture
def backend_by_name():
    """`backend_by_name(name)`: a local backend, skipping where it cannot work."""
    return local_sandbox


_PRIVATE = [{"input": "5 7\n", "output": "12\n", "testtype": "stdin"}]
LCB_STDIN = {  # a LiveCodeBench row as the dataset ships it: JSON strings, private tests encoded
    "question_content": "Print the sum of two integers.",
    "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
    "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(json.dumps(_PRIVATE)))).decode(),
    "metadata": "{}",
}

ATTEMPTS = ("{ok}", "{ok}\nimport sys\nsys.exit(1)", "while True:\n    pass", "raise ValueError('no')",
            "x = [0] * (1 << 40)", "print('x' * (9 << 20))", "def broken(:\n    pass")


@pytest.fixture
def verdict_cases(reference_solutions) -> tuple[list[dict], list[str]]:
    """Rows and completions that two ways of running the code environment must judge alike: every bundled
    problem with its right program, the first one and a LiveCodeBench row also with every way to fail."""
    solutions = reference_solutions
    bundled = load_bundled()
    rows = [*bundled, LCB_STDIN]
    programs = [solutions[r["task_id"]] for r in bundled] + [solutions["sdpo-001"]]
    for row in (bundled[0], LCB_STDIN):
        for attempt in ATTEMPTS[1:]:
            rows.append(row)
            programs.append(attempt.format(ok=solutions["sdpo-001"]))
    return rows, [f"```python\n{p}\n```" for p in programs]

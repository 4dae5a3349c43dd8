"""Host facts the local backends share: sandbox uids, the interpreter to run, and process clean-up.

Why a uid per concurrent sandbox (root only): ``RLIMIT_NPROC`` is not enforced for root and is counted per
uid, and ``kill(-1)`` from a uid reaches every process of that uid. With one uid per running sandbox, the
process cap is exact (a fork bomb cannot starve a neighbour) and clean-up is one atomic ``kill(-1)`` that
cannot hit anything else. uid 65534 (nobody) is shared with the rest of the host, so it is not used on the
host side; inside bwrap the program still sees uid 65534.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

UID_BASE = 1_879_000_000
"""First host uid handed to sandboxes (no account has it; far from /etc/subuid ranges)."""
UID_SLOTS = 256

LOADER_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives")
"""What of /etc programs need to start (the dynamic loader's cache and configuration, the time zone)."""
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", *LOADER_ETC_FILES, "/proc", "/dev")
"""What a program may read besides its interpreter and work dir, where the backend can restrict reads."""


def is_root() -> bool:
    return os.geteuid() == 0


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class UidLease:
    """A host uid reserved for one sandbox run (an flock held for its duration, across processes)."""

    uid: int
    fd: int


@contextlib.contextmanager
def lease_uid() -> Iterator[UidLease]:
    """Reserve a free sandbox uid; kill whatever runs under it on release."""
    lock_dir = Path(tempfile.gettempdir()) / "sdpo-code-uids"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    start = (os.getpid() * 7) % UID_SLOTS
    for k in range(UID_SLOTS):
        uid = UID_BASE + (start + k) % UID_SLOTS
        fd = os.open(lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        owner = os.getpid()
        try:
            kill_uid(uid)  # a previous holder that crashed may have left processes
            yield UidLease(uid, fd)
        finally:
            if os.getpid() == owner:  # not in a forked copy of this process: the processes are the owner's
                kill_uid(uid)
            os.close(fd)
        return
    raise RuntimeError(f"all {UID_SLOTS} sandbox uids are in use")


@contextlib.contextmanager
def sandbox_uid(switch: bool) -> Iterator[int | None]:
    """A leased uid for one sandbox run when `switch` (running as root), else `None` (run as ourselves)."""
    if not switch:
        yield None
        return
    with lease_uid() as lease:
        yield lease.uid


def as_user(uid: int | None) -> dict[str, Any]:
    """`subprocess` keyword arguments that run the child as `uid` (its own group, no supplementary groups);
    none for `None` (stay who we are)."""
    return {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}


def uid_processes(uid: int) -> list[int]:
    """PIDs whose real uid is `uid` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return pids


@functools.cache
def _kill_binary() -> str | None:
    return shutil.which("kill", path="/usr/bin:/bin")


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: one ``kill(-1)`` run as that uid (atomic against fork bombs)."""
    if not uid_processes(uid):
        return
    kill = _kill_binary()
    if kill is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([kill, "-s", "KILL", "--", "-1"], **as_user(uid), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False)
    for _ in range(50):
        pids = uid_processes(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)  # a killed process stays listed until its parent reaps it
    logger.warning("processes of sandbox uid %d survived clean-up: %s", uid, uid_processes(uid))


def start_session(argv: list[str], uid: int | None, cwd: str = "/",
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a sandbox process as `uid`: pipes for the protocol, stderr discarded, no inherited fds, and a
    session of its own, so that `kill_session` reaches everything it starts."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=cwd, env={} if env is None else env, start_new_session=True, close_fds=True,
                            **as_user(uid))


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children of any of its threads, recursively), as /proc lists them now."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for children in glob.glob(f"/proc/{parent}/task/*/children"):
            with contextlib.suppress(OSError, ValueError), open(children) as f:
                kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
    return found


def kill_session(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGKILL a sandbox started with ``start_new_session``: its process group and the process itself, then
    wait (up to `timeout`) until every process that was below it has ended.

    Why the wait: a bwrap sandbox's PID 1 is in a session of its own and dies only through its parent-death
    signal after bwrap is killed, and it ends last, once the kernel has killed and reaped everything in its PID
    namespace. Returning before that lets the next sandbox take the same uid while the old processes still
    count against its ``RLIMIT_NPROC``, and lets a caller see processes of a sandbox it has already closed.
    """
    watched = []
    for pid in descendants(proc.pid):
        with contextlib.suppress(OSError):
            watched.append(os.pidfd_open(pid))
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    deadline = time.monotonic() + timeout
    try:
        for fd in watched:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        for fd in watched:
            os.close(fd)


# ------------------------------------------------------------------------------------------- interpreter
# The harness's interpreter flags: isolated mode, and no `site` (it imports every .pth file's hooks, e.g. the
# editable-install finders, which took 30-40 ms of a ~55 ms sandbox start-up); the harness puts the
# interpreter's site-packages on sys.path itself and restores `exit`/`quit`.
HARNESS_FLAGS = ("-I", "-S")

@dataclass(frozen=True)
class Interpreter:
    """A Python the sandbox runs, with the directories it needs to read.

    `prefixes` are the installation's own trees (the standard library lives there); `venv` is the virtual
    environment the path belongs to, if any: the interpreter needs only its ``pyvenv.cfg`` and executable
    from it, not its site-packages (which hold the grader itself when sdpo-code is installed there).
    """

    path: str
    version: tuple[int, int, int]
    prefixes: tuple[str, ...]
    site_paths: tuple[str, ...] = ()  # its site-packages, put on sys.path by the harness (it runs with -S)
    venv: str | None = None

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


_PROBE = (
    "import sys, json, os; print(json.dumps({'v': list(sys.version_info[:3]), 'p': sorted({os.path.realpath(x) "
    "for x in (sys.base_prefix, sys.base_exec_prefix)}), 'venv': sys.prefix if sys.prefix != sys.base_prefix "
    "else None, 's': [x for x in sys.path if os.path.basename(x) in ('site-packages', 'dist-packages')]}))"
)


@functools.lru_cache(maxsize=16)
def probe_interpreter(path: str, uid: int | None) -> Interpreter | None:
    """Run `path` (as `uid`) once; `None` if it cannot start or is older than 3.10."""
    try:
        out = subprocess.run([path, "-I", "-c", _PROBE], capture_output=True, timeout=20, check=True, cwd="/",
                             env={"PATH": "/usr/bin:/bin"}, **as_user(uid))
        info = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    version = tuple(info["v"])
    if version < (3, 10, 0):
        return None
    real = os.path.realpath(path)
    prefixes = set(info["p"]) | {os.path.dirname(os.path.dirname(real))}
    return Interpreter(path=path, version=(version[0], version[1], version[2]), prefixes=tuple(sorted(prefixes)),
                       site_paths=tuple(info.get("s", ())), venv=info.get("venv"))


def find_interpreter(preferred: str | None, uid: int | None) -> Interpreter:
    """The interpreter to run sandboxed code with.

    An explicit `preferred` must work (as `uid`) or this raises: never a silent substitute. With `None`, the
    trainer's own interpreter is used when the sandbox user can run it; otherwise (e.g. it lives under a
    mode-700 /root) the system Python of the same minor version, then any system Python 3.10+, with a log line.
    """
    if preferred is not None:
        found = probe_interpreter(preferred, uid)
        if found is None:
            who = f"uid {uid}" if uid is not None else "this user"
            raise RuntimeError(f"interpreter {preferred!r} cannot be run by {who} (or is older than 3.10)")
        return found
    major, minor = sys.version_info[:2]
    candidates = [sys.executable, f"/usr/bin/python{major}.{minor}", "/usr/local/bin/python3", "/usr/bin/python3"]
    for path in candidates:
        if not os.path.exists(path):
            continue
        found = probe_interpreter(path, uid)
        if found is not None:
            if path != sys.executable:
                logger.info("sdpo-code: %s is not usable by the sandbox user (uid %s); running code with %s "
                            "(Python %s)", sys.executable, uid, path, found.version_text)
            return found
    raise RuntimeError(f"no Python 3.10+ usable by the sandbox user (uid {uid}); tried {candidates}. Pass "
                       "python=... or install a system python3")

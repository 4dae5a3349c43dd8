"""The ``process`` backend: a plain subprocess with kernel limits, for trusted code or machines without bwrap.

It is never chosen by ``auto``: asking for it by name is the opt-in, and building one logs what it does not
isolate (``sdpo sandbox doctor`` prints the same).

What it does:

- runs the harness in a new session (killed with ``killpg`` when the run ends or a wall backstop passes);
- rlimits AS, CPU, FSIZE, NOFILE, CORE=0 and, when the process is not root, NPROC;
- as root, runs as a dedicated unprivileged uid per sandbox (``_system.lease_uid``), so NPROC applies, the
  program cannot signal or read anything of root's, and every leftover process is killed with one
  ``kill(-1)`` as that uid;
- ``unshare --user --net --ipc --uts --pid --fork --kill-child`` when the kernel allows it: no network (not
  even the host's loopback), System V IPC of its own, and a PID namespace whose init is the harness
  supervisor, so nothing outlives it;
- Landlock when the kernel has it: writes only in the temporary work dir, reads only in system dirs (of /etc
  only what the loader needs), the interpreter and the work dir; no TCP; signals and abstract sockets scoped
  to the sandbox;
- a scrubbed environment and a fresh temporary work dir, removed afterwards.

What it does NOT isolate (use ``bwrap`` or ``docker`` for that):

- the host's file system namespace: a unix-domain socket the host listens on by path can be connected to
  (Landlock does not cover ``connect``), and the work dir is on the host's disk with no size cap;
- world-readable files in the directories it may read, the installed packages included (the grader's own,
  with its bundled tests, when it is installed in the interpreter's environment);
- without Landlock, the rest of the file system: anything world-readable can be read (the repo, /etc, home
  dirs with lax modes) and world-writable dirs (/tmp, /dev/shm) can be written;
- without user namespaces, the network (the program can connect anywhere the host can), System V IPC and
  the process tree (a daemon that calls ``setsid`` escapes ``killpg``; as root the uid clean-up still gets it);
- when the trainer is not root: another process of the same user can be signalled or killed, and NPROC is
  shared with the user's other processes;
- kernel attack surface: it is the host kernel with every system call available.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

from sdpo_code.sandbox import _system
from sdpo_code.sandbox._driver import drive_popen
from sdpo_code.sandbox.base import HARNESS_SOURCE, ExecutionRequest, ExecutionResult

logger = logging.getLogger(__name__)

_UNSHARE = ["--user", "--net", "--ipc", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc"]
_PROBE_UID = _system.UID_BASE + _system.UID_SLOTS


@functools.cache
def _unshare_works(as_uid: int | None) -> str | None:
    """The unshare binary when it can build user+net+pid namespaces here (as `as_uid`), else None."""
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        return None
    try:
        subprocess.run([unshare, *_UNSHARE, "/bin/true"], check=True, timeout=20, capture_output=True, cwd="/",
                       **_system.as_user(as_uid))
    except (OSError, subprocess.SubprocessError):
        return None
    return unshare


@functools.cache
def _landlock_abi() -> int:
    """Landlock ABI version of this kernel (0 when absent)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return max(0, int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))))
    except (OSError, AttributeError):
        return 0


class ProcessSandbox:
    """Runs each solution in a subprocess with rlimits; see the module docstring for what is isolated.

    Args:
        python (`str`, *optional*): interpreter for the submitted code; defaults to the trainer's own when the
            sandbox uid can run it, else the system Python (logged).
        drop_privileges (`bool`, *optional*, defaults to `True`): as root, run as a dedicated uid per
            sandbox. Ignored when not root.
        unshare (`bool` or `None`, *optional*): use user/net/pid namespaces; `None` (default) when they work,
            `True` requires them (an error otherwise), `False` never.
        landlock (`bool` or `None`, *optional*): same convention for Landlock file-system confinement.
    """

    name = "process"
    ALWAYS_NOT_ISOLATED = (
        "unix-domain sockets the host listens on by path (e.g. in /tmp)",
        "world-readable files in system directories (/usr, /dev, /proc), installed packages included",
        "the work dir's size (it is on the host's disk)",
        "the host kernel (every system call)",
    )
    """What this backend never isolates, whatever the machine offers."""

    def __init__(
        self,
        *,
        python: str | None = None,
        drop_privileges: bool = True,
        unshare: bool | None = None,
        landlock: bool | None = None,
    ) -> None:
        self.switch_uid = drop_privileges and _system.is_root()
        probe_uid = _PROBE_UID if self.switch_uid else None
        self.interpreter = _system.find_interpreter(python, probe_uid)
        self.unshare = _unshare_works(probe_uid) if unshare is not False else None
        if unshare and self.unshare is None:
            raise _system_error("unshare (user, net and pid namespaces) does not work on this machine")
        abi = _landlock_abi() if landlock is not False else 0
        if landlock and not abi:
            raise _system_error("Landlock is not available in this kernel")
        self.landlock = abi > 0
        isolates = ["a session of its own (killpg)", "rlimits AS, CPU, FSIZE, NOFILE, CORE"
                    + (", NPROC" if self.switch_uid else "")]
        if self.switch_uid:
            isolates.append("a dedicated host uid per sandbox")
        if self.unshare:
            isolates.append("no network, private PID, IPC and UTS namespaces")
        if self.landlock:
            isolates.append(f"Landlock ABI {abi}: writes only in its work dir, reads only system directories")
        self.isolates = tuple(isolates)
        self.not_isolated = (
            *(() if self.landlock else ("file-system reads and writes of world-accessible paths",)),
            *(() if self.unshare else ("the network and the process tree", "System V IPC")),
            *(() if self.switch_uid else ("signals to the trainer's other processes (same uid)",)),
            *self.ALWAYS_NOT_ISOLATED,
        )
        self.isolation = "; ".join(self.isolates) + ". NOT isolated: " + "; ".join(self.not_isolated)
        logger.warning("sdpo-code: the 'process' backend runs untrusted code without a sandbox of its own; it "
                       "does NOT isolate: %s. Use 'bwrap' for untrusted code", "; ".join(self.not_isolated))

    def __repr__(self) -> str:
        return f"ProcessSandbox(python={self.interpreter.path!r}, isolation={self.isolation!r})"

    def run(self, request: ExecutionRequest) -> ExecutionResult:
        with _system.sandbox_uid(self.switch_uid) as uid, _workdir(uid) as workdir:
            argv = [self.interpreter.path, *_system.HARNESS_FLAGS, "-c", HARNESS_SOURCE]
            if self.unshare:
                argv = [self.unshare, *_UNSHARE, *argv]
            extra: dict[str, Any] = {}
            if self.landlock:
                venv = [self.interpreter.venv] if self.interpreter.venv else []
                read = [*_system.SYSTEM_READ_PATHS, *self.interpreter.prefixes, *venv, workdir]
                extra["landlock"] = {"read": read, "write": [workdir], "required": True}
            nproc = request.limits.nproc
            if uid is None:  # NPROC counts all our processes: allow the current ones plus the budget
                nproc += len(_system.uid_processes(os.getuid()))
            payload = request.payload(nproc=nproc, site_paths=list(self.interpreter.site_paths), **extra)
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                   "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
            try:
                proc = _system.start_session(argv, uid, cwd=workdir, env=env)
            except OSError as exc:
                return ExecutionResult(ready=False, harness_error=f"could not start the sandbox: {exc}")
            return drive_popen(proc, request, payload)


@contextlib.contextmanager
def _workdir(uid: int | None) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="sdpo-code-")
    try:
        if uid is not None:
            os.chown(path, uid, uid)
        os.chmod(path, 0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _system_error(message: str) -> Exception:
    from sdpo_code.sandbox.base import SandboxUnavailable

    return SandboxUnavailable(f"process backend: {message}")

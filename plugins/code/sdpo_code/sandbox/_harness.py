# mypy: ignore-errors
# (a standalone script for whatever interpreter the sandbox has: kept untyped and stdlib-only on purpose)
"""The program that runs inside every sandbox (``python -I -S -c <this source>``: no `site`, see `_site_setup`).

Why a separate, stdlib-only script: it must run on whatever interpreter the sandbox has (a Docker image, the
system Python) and must not import sdpo_code. It is trusted code that shares a process with untrusted code, so
it never holds anything secret: expected outputs stay in the trainer, which compares.

Shape: the payload (code, test inputs, limits) arrives as one JSON document on stdin. A *supervisor* process
forks one *worker* that applies the limits, says ``ready``, then runs every test sequentially in-process (no
per-test process), each with its own CPU timer (``ITIMER_PROF``), wall timer (``ITIMER_REAL``) and
``RLIMIT_CPU`` backstop. stdin/stdout/stderr of each test are memfds dup2'ed onto fds 0/1/2, so ``print``,
``sys.stdout.buffer``, ``os.write(1, ...)`` and ``open(0)`` all work, and ``RLIMIT_FSIZE`` bounds the output.
The supervisor reaps, reports the worker's exit status and CPU time, and, as PID 1 of a PID namespace, takes
every leftover process down with it when it exits.

Protocol (stdout, one JSON object per line): ``ready``, ``start`` (test i), ``result`` (test i), ``done`` from
the worker; ``exit`` from the supervisor. Index -1 is the module set-up of functional/HumanEval code.
"""

import builtins
import contextlib
import ctypes
import functools
import gc
import io
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
import types

SOLUTION_FILE = "Solution.py"
PROMPT_FILE = "prompt.py"
TEST_FILE = "test.py"
MARKER = "sdpo-code-harness"
TOKEN_LINE_BYTES = 33  # serve mode: a request's token, 32 hex digits and a newline

# What a solution may use without importing it: the star imports of LiveCodeBench's grader, in its order (so
# `from builtins import *` undoes the shadowing by `math.pow` and `operator.abs`: `pow(a, e, m)` works), then
# the modules themselves. Verdicts then agree with LCB's on solutions that lean on them (`deepcopy`, `inf`...).
_STAR_IMPORTED = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                  "statistics", "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing")
_PRELUDE = "".join(f"from {name} import *\n" for name in _STAR_IMPORTED) + "import " + ", ".join(
    name for name in _STAR_IMPORTED if name not in ("builtins", "typing")) + "\n"
_STREAMS = ("stdin", "stdout", "stderr")  # `from sys import *` names bound per test, see `_module_namespace`
RECURSION_LIMIT = 50000  # LCB's


def _exit(code=None):
    raise SystemExit(code)


@functools.cache
def solution_builtins():
    """The builtins module solutions run with: the prelude's names (over Python's builtins exactly as its star
    imports leave them), and `quit` (`site` would add it; `exit` is `sys.exit` from the prelude).

    Made once per process (serve mode makes it before the first fork): a test's namespace then starts empty
    instead of executing the prelude (~60 us a test), and a worker touches, and so copies, only the pages of
    the names it uses."""
    module = types.ModuleType("builtins", builtins.__doc__)
    module.__dict__.update(vars(builtins))
    prelude = {}
    exec(compile(_PRELUDE, "<prelude>", "exec"), prelude)
    module.__dict__.update((name, value) for name, value in prelude.items()
                           if not name.startswith("__") and name not in _STREAMS)
    module.__dict__.setdefault("quit", _exit)
    return module


def _module_namespace():
    """A fresh ``__main__`` namespace for the solution, with the `stdin`, `stdout` and `stderr` that
    `from sys import *` gives bound to the current test's streams (not to those the prelude was made with)."""
    namespace = {"__name__": "__main__", "__builtins__": solution_builtins(), "__file__": SOLUTION_FILE}
    namespace.update((name, getattr(sys, name)) for name in _STREAMS)
    return namespace


_proto_fd = -1


_held = []  # protocol lines waiting to share the next write


def send(msg, hold=False):
    """Write one protocol line; a failure means the model closed our channel, so stop quietly.

    `hold` keeps the line for the next write: a test's result then travels with the next test's ``start``
    (or ``done``), one wake-up of the trainer instead of two. Only harness code runs in between."""
    _held.append((json.dumps(msg, ensure_ascii=True) + "\n").encode())
    if hold:
        return
    data = b"".join(_held)
    _held.clear()
    try:
        view = memoryview(data)
        while view:
            n = os.write(_proto_fd, view)
            view = view[n:]
    except OSError:
        os._exit(70)


class CpuLimit(BaseException):
    """Raised by the CPU timer; a BaseException so `except Exception` in model code does not swallow it."""


class WallLimit(BaseException):
    """Raised by the wall timer (a program sleeping or blocked past its limit)."""


_fired = {"cpu": False, "wall": False}


def _on_prof(signum, frame):
    _fired["cpu"] = True
    raise CpuLimit()


def _on_alarm(signum, frame):
    _fired["wall"] = True
    raise WallLimit()


# ------------------------------------------------------------------------------------------------ Landlock
_LL_FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
_LL_REFER = 1 << 13
_LL_TRUNCATE = 1 << 14
_LL_IOCTL_DEV = 1 << 15
_LL_EXEC, _LL_WRITE, _LL_READ_FILE, _LL_READ_DIR = 1, 2, 4, 8


def _landlock(read_paths, write_paths):
    """Confine reads and writes to the given trees (Linux Landlock); returns the ABI used or 0."""
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    handled = _LL_FS_ABI1
    if abi >= 2:
        handled |= _LL_REFER
    if abi >= 3:
        handled |= _LL_TRUNCATE
    if abi >= 5:
        handled |= _LL_IOCTL_DEV
    attr = (ctypes.c_uint64 * 3)(handled, 0, 0)
    size = 8
    if abi >= 4:
        attr[1] = 3  # deny TCP bind and connect: no rule allows any port
        size = 16
    if abi >= 6:
        attr[2] = 3  # abstract unix sockets and signals stay inside the sandbox
        size = 24
    ruleset = syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    file_rights = _LL_EXEC | _LL_WRITE | _LL_READ_FILE | (_LL_TRUNCATE if abi >= 3 else 0)
    read_rights = _LL_EXEC | _LL_READ_FILE | _LL_READ_DIR
    rules = [(p, read_rights) for p in read_paths] + [(p, handled) for p in write_paths]
    rules.append(("/dev", read_rights | _LL_WRITE | (_LL_IOCTL_DEV if abi >= 5 else 0)))
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            rights &= file_rights
        rule = PathBeneath(rights & handled, fd)
        syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return 0
    os.close(ruleset)
    return abi


# ----------------------------------------------------------------------------------------------- per test
def _memfd(name, data=b""):
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_capped(fd, cap):
    size = os.fstat(fd).st_size
    data = os.pread(fd, min(size, cap), 0)
    return data.decode("utf-8", errors="replace"), size


def _frames(summary, code_lines):
    """The submitted code's frames (not the harness's), innermost last, with its own line numbers."""
    out = []
    for fs in summary:
        if fs.filename == SOLUTION_FILE:
            line = code_lines[fs.lineno - 1].strip() if fs.lineno and 0 < fs.lineno <= len(code_lines) else ""
            out.append([fs.lineno, fs.name, line])
    return out


def _exc_info(exc, code_lines, test_lines):
    # lookup_lines=False: the lines come from the code we hold; linecache would stat every sys.path entry
    # looking for a file named Solution.py, for each frame of each failing test
    summary = traceback.StackSummary.extract(traceback.walk_tb(exc.__traceback__), lookup_lines=False)
    last = summary[-1] if summary else None
    in_test = last is not None and last.filename == TEST_FILE
    info = {"type": type(exc).__name__, "msg": _safe_str(exc), "frames": _frames(summary, code_lines),
            "in_test": in_test}
    if in_test and last.lineno and 0 < last.lineno <= len(test_lines):
        info["test_line"] = test_lines[last.lineno - 1].strip()
    return info


def _flush_stdout():
    """Flush what the program printed; a stdout it closed itself was flushed when closed."""
    with contextlib.suppress(ValueError):  # closed
        sys.stdout.flush()


def _safe_str(obj, cap=2000):
    try:
        text = str(obj)
    except BaseException:
        text = "<unprintable>"
    return text[:cap]


class Worker:
    """Runs the tests of one solution in this process."""

    def __init__(self, p):
        self.p = p
        self.code = p["code"]
        self.code_lines = self.code.splitlines()
        self.test_lines = (p.get("test_code") or "").splitlines()
        self.out_cap = int(p["output_bytes"])
        self.err_cap = int(p.get("debug_bytes", 4096))
        self.fsize_hard = int(p["fsize_hard"])
        self.devnull = os.open(os.devnull, os.O_RDWR)

    # ---------------------------------------------------------------- one timed step with captured fds
    def run(self, index, stdin_bytes, cpu_limit, wall_limit, body):
        send({"ev": "start", "i": index})
        _fired["cpu"] = _fired["wall"] = False
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_hard, self.fsize_hard))
        in_fd = _memfd("stdin", stdin_bytes)
        out_fd = _memfd("stdout")
        err_fd = _memfd("stderr")
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.out_cap + 1, self.fsize_hard))
        os.dup2(in_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(
            io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace"
        )
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = used.ru_utime + used.ru_stime
        soft = min(math.ceil(cpu0 + cpu_limit) + 1, self.cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, self.cpu_hard))
        status, value, exc_info, exit_code = "ok", None, None, None
        wall0 = time.monotonic()
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, wall_limit)
                signal.setitimer(signal.ITIMER_PROF, cpu_limit)
                value = body()
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
                signal.setitimer(signal.ITIMER_REAL, 0)
            _flush_stdout()
        except CpuLimit:
            status = "timeout"
        except WallLimit:
            status = "wall_timeout"
        except MemoryError:
            status = "memory"
        except SystemExit as exc:
            code = exc.code
            if code not in (None, 0):
                status, exit_code = "exit", code if isinstance(code, int) else 1
            with contextlib.suppress(BaseException):
                _flush_stdout()
        except BaseException as exc:
            status, exc_info = "exception", _exc_info(exc, self.code_lines, self.test_lines)
            if isinstance(exc, OSError) and exc.errno == 27:  # EFBIG: wrote past RLIMIT_FSIZE
                status = "output_limit"
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.setitimer(signal.ITIMER_REAL, 0)
        wall = time.monotonic() - wall0
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = used.ru_utime + used.ru_stime - cpu0
        if _fired["cpu"] or cpu > cpu_limit + 0.1:
            status = "timeout"
        elif _fired["wall"]:
            status = "wall_timeout"
        for fd in (0, 1, 2):
            os.dup2(self.devnull, fd)
        stdout, out_size = _read_capped(out_fd, self.out_cap)
        stderr, _ = _read_capped(err_fd, self.err_cap)
        for fd in (in_fd, out_fd, err_fd):
            os.close(fd)
        if out_size > self.out_cap and status in ("ok", "exception", "exit"):
            status = "output_limit"
        msg = {"ev": "result", "i": index, "status": status, "stdout": stdout, "stdout_bytes": out_size,
               "stderr": stderr, "cpu": round(cpu, 4), "wall": round(wall, 4)}
        if exc_info is not None:
            msg["exc"] = exc_info
        if exit_code is not None:
            msg["exit_code"] = exit_code
        if value is not None:
            msg.update(value)
        send(msg, hold=True)
        return status

    # ------------------------------------------------------------------------------------- main loop
    def main(self):
        p = self.p
        mode = p["mode"]
        limits = p["cpu_limits"]
        walls = p["wall_limits"]
        self.cpu_hard = int(p["cpu_hard"])
        try:
            compiled = compile(self.code, SOLUTION_FILE, "exec", dont_inherit=True)
        except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as exc:
            err = {"ev": "compile_error", "type": type(exc).__name__, "msg": _safe_str(getattr(exc, "msg", exc))}
            if isinstance(exc, SyntaxError):
                err.update(lineno=exc.lineno, offset=exc.offset, text=(exc.text or "").rstrip("\n"))
            send(err)
            return
        stop_on = set(p.get("stop_on", ()))
        if mode == "stdin":
            for i, stdin_text in enumerate(p["inputs"]):
                def body(compiled=compiled):
                    exec(compiled, _module_namespace())
                status = self.run(i, stdin_text.encode("utf-8", errors="surrogateescape"), limits[i], walls[i], body)
                if status in stop_on:
                    break
            return
        namespace = {}

        def setup():
            namespace.update(_module_namespace())
            if p.get("prefix"):
                exec(compile(p["prefix"], PROMPT_FILE, "exec", dont_inherit=True), namespace)
            exec(compiled, namespace)
            if mode == "humaneval":
                exec(compile(p["test_code"], TEST_FILE, "exec", dont_inherit=True), namespace)

        if self.run(-1, b"", limits[0], walls[0], setup) != "ok":
            return
        for i, args in enumerate(p["inputs"]):
            if mode == "humaneval":
                def body(ns=namespace):
                    ns["check"](ns[p["entry_point"]])
            else:
                def body(args=args, ns=namespace):
                    return _call(ns, p["func_name"], args)
            status = self.run(i, b"", limits[i], walls[i], body)
            if status in stop_on:
                break


def _call(namespace, func_name, args):
    """Call Solution().func_name(*args) (or a top-level func_name) and encode the result as JSON."""
    cls = namespace.get("Solution")
    if isinstance(cls, type) and hasattr(cls, func_name):
        fn = getattr(cls(), func_name)
    elif callable(namespace.get(func_name)):
        fn = namespace[func_name]
    else:
        raise AttributeError(f"no method {func_name!r} in class Solution")
    result = fn(*json.loads(json.dumps(args)))
    if isinstance(result, tuple):
        result = list(result)
    try:
        return {"value": json.dumps(result, allow_nan=True)}
    except (TypeError, ValueError):
        return {"value": None, "value_repr": _safe_str(repr(result), 1000)}


# ------------------------------------------------------------------------------------------- supervisor
def _apply_limits(p):
    limits = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_AS, int(p["memory_bytes"])),
        (resource.RLIMIT_NOFILE, int(p["nofile"])),
    ]
    if p.get("nproc"):
        limits.append((resource.RLIMIT_NPROC, int(p["nproc"])))
    for which, value in limits:
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    hard = int(p["cpu_hard"])
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(p["fsize_hard"]), int(p["fsize_hard"])))


def _worker(p):
    signal.signal(signal.SIGPROF, _on_prof)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _apply_limits(p)
    ll = p.get("landlock")
    abi = _landlock(ll["read"], ll["write"]) if ll else 0
    if ll and not abi and ll.get("required"):
        send({"ev": "setup_failed", "reason": "landlock unavailable"})
        os._exit(71)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), int(p.get("recursion_limit", RECURSION_LIMIT))))
    send({"ev": "ready", "pid": os.getpid(), "uid": os.getuid(), "landlock": abi, "python": sys.version.split()[0]})
    Worker(p).main()
    send({"ev": "done"})


def _site_setup(site_paths):
    """What `site` would have given the program (we run with -S): site-packages, and `exit`/`quit` for the
    modules it imports (its own code sees them in `solution_builtins`)."""
    sys.path.extend(x for x in site_paths if x not in sys.path)
    if not hasattr(builtins, "exit"):
        builtins.exit = builtins.quit = _exit


def _read_exact(fd, size):
    """`size` bytes from a raw fd (no buffering: nothing after them may be consumed before the fork)."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_line(fd, cap=64):
    line = b""
    while not line.endswith(b"\n"):
        ch = os.read(fd, 1)
        if not ch or len(line) > cap:
            return None
        line += ch
    return line


def _read_request(fd):
    """One length-framed JSON payload, or None at end of input (a length line: Docker's attach stream has no
    clean EOF over TLS)."""
    header = _read_line(fd)
    if header is None:
        return None
    raw = _read_exact(fd, int(header))
    return None if raw is None else json.loads(raw)


def _take_protocol_channel():
    """Keep stdout as the protocol channel (``_proto_fd``, inherited by the worker) and point fds 0-2 at
    /dev/null, so nothing else lands on the channel by accident."""
    global _proto_fd
    _proto_fd = os.dup(1)
    os.set_inheritable(_proto_fd, True)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _start_worker(p, child_setup=None):
    """Fork the worker that runs the tests of payload `p` (after `child_setup`, in the child); its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            if child_setup is not None:
                child_setup()
            _site_setup(p.get("site_paths") or ())
            _worker(p)
        except BaseException as exc:  # a harness fault before or between tests
            send({"ev": "harness_error", "reason": f"{type(exc).__name__}: {_safe_str(exc, 500)}"})
            os._exit(72)
        os._exit(0)
    return pid


def _reap(pid):
    """Reap children (we may be PID 1 and inherit orphans) until `pid` exits; its (status, rusage)."""
    while True:
        try:
            waited, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(73)
        except InterruptedError:
            continue
        if waited == pid:
            return status, usage


def _exit_event(status, usage, **extra):
    msg = {"ev": "exit", "cpu": round(usage.ru_utime + usage.ru_stime, 4), "maxrss_kb": usage.ru_maxrss, **extra}
    if os.WIFSIGNALED(status):
        msg["signal"] = os.WTERMSIG(status)
    else:
        msg["code"] = os.WEXITSTATUS(status)
    _held.append(b"\n")  # ends any line the worker was killed in the middle of (one write with the event)
    send(msg)


def _ignore_signals():
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)


def main():
    """One solution: read its payload, run it in a worker, report, exit (taking any leftovers down)."""
    p = _read_request(0)
    if p is None:
        os._exit(74)
    _take_protocol_channel()
    pid = _start_worker(p)
    # Supervisor: never runs model code.
    _ignore_signals()
    status, usage = _reap(pid)
    _exit_event(status, usage)
    if os.getpid() != 1:
        with contextlib.suppress(OSError):
            os.killpg(0, signal.SIGKILL)  # leftovers of the worker in our process group, and us
    os._exit(0)


# --------------------------------------------------------------------------------------- serve mode
# ``--serve``: a long-lived PID 1 of its own sandbox that runs one solution after another, each in a worker
# freshly forked from this never-touched process, and after each one puts the sandbox back as it found it.
_WIPED_DIRS = ("/tmp", "/dev/shm", "/dev/mqueue")


def _kill_everyone_else():
    """SIGKILL every other process of the PID namespace and reap them all.

    Every process here descends from us, and an orphan is handed to us before its parent can be reaped, so
    once we have no child left no process is left. The usual case (the worker made none) costs one call;
    otherwise ``kill(-1)`` (as init, it reaches everyone) and reap until no child remains. A process that
    cannot be ended keeps us waiting: the host sees no ``exit`` event and discards this sandbox."""
    try:
        while os.wait4(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while True:
            os.wait4(-1, 0)


def _wipe(top, mode):
    """Empty a directory the worker could write and give it back its `mode`, whatever modes the worker left
    on it and on what it made (iterative: a deep tree cannot exhaust our stack)."""
    with contextlib.suppress(OSError):
        os.chmod(top, mode)
    stack, dirs = [top], []
    while stack:
        path = stack.pop()
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        try:
            entries = os.listdir(path)
        except OSError:
            continue
        if path != top:
            dirs.append(path)
        for name in entries:
            child = os.path.join(path, name)
            if os.path.isdir(child) and not os.path.islink(child):
                stack.append(child)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(child)
    for path in reversed(dirs):
        with contextlib.suppress(OSError):
            os.rmdir(path)
    with contextlib.suppress(OSError):
        os.chmod(top, mode)


def _remove_sysv_ipc(libc):
    """Delete the System V shared memory, message queues and semaphores left in our IPC namespace. The
    kernel's ``*_INFO`` counters say first whether there is any: reading /proc/sysvipc costs ~0.1 ms a file,
    and almost no solution leaves one."""
    answer = ctypes.create_string_buffer(256)
    kinds = (  # (name, query the counts, which int of the answer counts the objects in use, remove one)
        ("shm", lambda: libc.shmctl(0, 14, answer), 0, lambda i: libc.shmctl(i, 0, None)),  # SHM_INFO: used_ids
        ("msg", lambda: libc.msgctl(0, 12, answer), 0, lambda i: libc.msgctl(i, 0, None)),  # MSG_INFO: msgpool
        ("sem", lambda: libc.semctl(0, 0, 19, answer), 7, lambda i: libc.semctl(i, 0, 0)),  # SEM_INFO: semusz
    )
    for kind, count, field, remove in kinds:
        if count() >= 0 and not int.from_bytes(answer.raw[4 * field:4 * field + 4], sys.byteorder):
            continue
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 1 and fields[1].isdigit():
                remove(int(fields[1]))


_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)  # the keyctl system call's number
_KEYCTL_JOIN_SESSION_KEYRING, _KEYCTL_CLEAR, _KEYCTL_GET_PERSISTENT = 1, 7, 22
_USER_KEYRINGS = (-4, -5)  # KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING


def _own_session_keyring(libc):
    """Give the worker a new, anonymous session keyring: what it adds there goes away with its processes."""
    if _KEYCTL is not None:
        libc.syscall(_KEYCTL, _KEYCTL_JOIN_SESSION_KEYRING, None)


def _clear_keyrings(libc):
    """Empty the keyrings that outlive a worker: the kernel keeps the user, user-session and persistent
    keyrings per uid of the sandbox's user namespace, which a fresh sandbox would not share."""
    if _KEYCTL is None:
        return
    for ring in _USER_KEYRINGS:
        libc.syscall(_KEYCTL, _KEYCTL_CLEAR, ring)
    persistent = libc.syscall(_KEYCTL, _KEYCTL_GET_PERSISTENT, -1, -3)  # linked to our session keyring; -1 if none
    if persistent >= 0:
        libc.syscall(_KEYCTL, _KEYCTL_CLEAR, persistent)


def _not_a_sandbox():
    """Why this is not a sandbox whose /tmp, /dev/shm and /dev/mqueue we may empty, or "" when it is one.

    Serve mode deletes everything in those directories after each solution: run by mistake outside a
    sandbox (say under a bare ``unshare -p``) it would empty the host's. So it insists on being PID 1 of
    its own PID namespace, in a user namespace of its own, with each of those directories its own mount.
    """
    if os.getpid() != 1:
        return "not PID 1 of a PID namespace"
    try:
        with open("/proc/self/uid_map") as f:
            uid_map = f.read().split()
    except OSError:
        return "cannot read /proc/self/uid_map"
    if uid_map == ["0", "0", "4294967295"]:
        return "in the host's user namespace"
    shared = [top for top in _WIPED_DIRS if os.path.isdir(top) and not os.path.ismount(top)]
    if shared:
        return f"{', '.join(shared)} not mounted privately"
    return ""


def serve():
    """Answer requests on fd 0 until it closes: payload, then (read only after the fork, so the worker never
    sees it) a token line that the ``exit`` event echoes. The host trusts only an ``exit`` carrying the
    token, so a program printing a fake ``exit`` on the protocol channel cannot end a run early or shift the
    next run's events."""
    refusal = _not_a_sandbox()
    if refusal:
        sys.stderr.write(f"--serve refuses to run: {refusal}\n")
        os._exit(75)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace of us and no /proc/1/{mem,fd} for the workers
    requests = os.dup(0)
    _take_protocol_channel()
    _ignore_signals()
    solution_builtins()  # the modules solutions use, imported once for all
    modes = {top: os.stat(top).st_mode & 0o7777 for top in _WIPED_DIRS if os.path.isdir(top)}
    gc.freeze()  # our objects live for good: the workers' collector then never touches (and copies) their pages
    while True:
        p = _read_request(requests)
        if p is None:
            os._exit(0)

        def fresh_worker():
            os.close(requests)
            libc.prctl(4, 1, 0, 0, 0)  # the worker is an ordinary process again (its own /proc/self)
            _own_session_keyring(libc)

        pid = _start_worker(p, fresh_worker)
        token = _read_exact(requests, TOKEN_LINE_BYTES)
        status, usage = _reap(pid)
        _kill_everyone_else()
        for top, mode in modes.items():
            _wipe(top, mode)
        _remove_sysv_ipc(libc)
        _clear_keyrings(libc)
        if token is None:
            os._exit(0)
        _exit_event(status, usage, token=token.decode("ascii", "replace").strip())


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main()

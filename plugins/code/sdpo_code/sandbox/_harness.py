# mypy: ignore-errors
# (a standalone script for whatever interpreter the sandbox has: kept untyped and stdlib-only on purpose)
"""The program that runs inside every sandbox (``python -I -S -c <this source>``: no `site`, see `_site_setup`).

Why a separate, stdlib-only script: it must run on whatever interpreter the sandbox has (a Docker image, the
system Python) and must not import sdpo_code. Expected outputs never enter it: the trainer compares.

Three roles, three processes, and only the first two are trusted:

- the *supervisor* reads the payload on stdin and holds the protocol channel to the host (its stdout). In
  ``--serve`` mode it is the sandbox's PID 1 and runs one submission after another, each in a fresh judge.
- the *judge* (the supervisor itself, or for HumanEval in serve mode a fork of it that the task's checks
  cannot outlive) never runs model code. It
  is not dumpable (no ptrace, no ``/proc/<pid>/fd`` for others of its uid) and a child subreaper (every
  orphan of the program is handed to it). It forks the worker, tells it which test to run, enforces each
  test's CPU and wall limits from outside, measures CPU time itself over the whole process tree
  (``/proc/<pid>/task/*/children``, the process CPU clocks, ``RUSAGE_CHILDREN`` of what it reaped), reads
  the test's stdout, and is the only writer of result events on the host channel. HumanEval ``check``
  functions run here, on plain values decoded from the worker's answers, so a program never compares its
  own results and never sees the checks.
- the *worker* runs the model's code, in-process, one test per request: stdin/stdout/stderr are memfds on
  fds 0/1/2 (so ``print``, ``os.write(1, ...)`` and ``open(0)`` work), with the rlimits (AS, CPU, FSIZE,
  NOFILE, NPROC, CORE) set before any model code runs and CPU (``ITIMER_PROF``) and wall (``ITIMER_REAL``)
  timers for a graceful verdict. It holds only its own two pipes to the judge; whatever it writes there is
  the program's output, never a verdict.

Host protocol (the supervisor's stdout, one JSON object per line): ``ready``; ``start`` and ``result`` (test
i, -1 for the module set-up of functional/HumanEval code), a result's line followed by ``stdout_raw`` bytes
of raw stdout; ``compile_error``; ``done``; ``judge_error`` (a fault of the grader itself); ``exit`` from
the supervisor. Worker protocol (its pipe to the judge): a header line per request, then raw bytes.
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
import select
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

# Why a harness process ended itself. The host never reads these (it judges by the protocol's events and
# treats a harness that ends before ``done`` as a sandbox fault); they tell a person reading an exit status
# which path it took.
EXIT_CHANNEL_LOST = 70  # a pipe to the host or to the judge broke: nobody is left to report to
EXIT_NO_LANDLOCK = 71  # Landlock was required and the kernel does not have it
EXIT_WORKER_RETURNED = 72  # the worker's loop returned instead of exiting (never reached by design)
EXIT_NO_CHILD = 73  # the judge waited for a worker it has not got
EXIT_NO_REQUEST = 74  # no payload arrived on stdin
EXIT_NOT_A_SANDBOX = 75  # ``--serve`` was started outside a sandbox's fresh PID namespace


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



# --------------------------------------------------------------------------------------- host channel
_proto_fd = -1  # held by the supervisor and the judge only; closed in the worker before any model code
_held = []  # protocol lines waiting to share the next write


def send(msg, hold=False, raw=b""):
    """Write one protocol line (then `raw` bytes, whose count the line gives); if the host went away, stop.

    `hold` keeps the line for the next write: a test's result then travels with the next test's ``start``
    (or ``done``), one wake-up of the trainer instead of two. Strings go out as UTF-8, lone surrogates as
    JSON escapes."""
    _held.append(json.dumps(msg, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n" + raw)
    if hold:
        return
    data = b"".join(_held)
    _held.clear()
    try:
        _write_all(_proto_fd, data)
    except OSError:
        os._exit(EXIT_CHANNEL_LOST)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
# Landlock's system calls have these numbers on every architecture (added after the tables were unified).
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1  # flag: return the ABI version instead of a ruleset
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38


def _landlock(read_paths, write_paths):
    """Confine reads and writes to the given trees (Linux Landlock); returns the ABI used or 0."""
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                  ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
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
    ruleset = syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
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
        syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return 0
    os.close(ruleset)
    return abi



# -------------------------------------------------------------------------------------------- values
MAX_DEPTH = 500  # nesting the value codec accepts; deeper (or cyclic) values are not comparable
_BIG_INT_BITS = 13000  # ~3900 digits: below Python's int/str conversion limit


class Unencodable(Exception):
    """A value the codec does not carry: an exotic type, too deep or cyclic."""


class TooLarge(Exception):
    """A value whose encoding passes the output limit."""


def _float_text(x):
    text = float.__repr__(x)
    return {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(text, text)


def encode_value(value, cap, tagged=False):
    """JSON text of `value`, built iteratively from the built-in types' own accessors (a subclass's
    overridden ``__eq__``, ``__iter__``, ``__str__`` or ``__repr__`` is never called).

    Plain (`tagged=False`, LeetCode return values): lists and tuples become arrays, dicts objects with
    json's key rules. Tagged (HumanEval calls, both ways): arrays are lists, and tuples, sets, frozensets,
    dicts, bytes and huge ints are one-key objects, so the judge gets back the exact types."""
    parts, size, stack = [], 0, [(value, 0)]
    while stack:
        item = stack.pop()
        if type(item) is str:
            text = item
        else:
            obj, depth = item
            if depth > MAX_DEPTH:
                raise Unencodable(f"nested deeper than {MAX_DEPTH} levels (or cyclic)")
            text = _encode_one(obj, depth, stack, tagged)
        parts.append(text)
        size += len(text)
        if size > cap:
            raise TooLarge(f"more than {cap} bytes")
    return "".join(parts)


def _push_items(stack, items, depth, open_, close):
    stack.append(close)
    for k in range(len(items) - 1, -1, -1):
        stack.append((items[k], depth + 1))
        if k:
            stack.append(",")
    return open_


def _encode_one(obj, depth, stack, tagged):
    """The text that opens `obj` (pushing its items and its closing text on `stack`)."""
    if obj is None:
        return "null"
    if obj is True or obj is False:
        return "true" if obj else "false"
    if isinstance(obj, int):
        n = int.__int__(obj)
        if n.bit_length() <= _BIG_INT_BITS:
            return int.__repr__(n)
        if not tagged:
            raise Unencodable("an int with more than 3900 digits")
        return json.dumps({"h": hex(n)})
    if isinstance(obj, float):
        return _float_text(float.__float__(obj))
    if isinstance(obj, str):
        return json.dumps(str.__str__(obj))
    if isinstance(obj, list):
        return _push_items(stack, list(list.__iter__(obj)), depth, "[", "]")
    if isinstance(obj, tuple):
        items = list(tuple.__iter__(obj))
        return _push_items(stack, items, depth, '{"t":[' if tagged else "[", "]}" if tagged else "]")
    if isinstance(obj, dict):
        pairs = list(dict.items(obj))
        if tagged:
            return _push_items(stack, [[k, v] for k, v in pairs], depth, '{"d":[', "]}")
        stack.append("}")
        for k in range(len(pairs) - 1, -1, -1):
            stack.append((pairs[k][1], depth + 1))
            stack.append(_plain_key(pairs[k][0]) + ":")
            if k:
                stack.append(",")
        return "{"
    if tagged and isinstance(obj, (set, frozenset)):
        base = set if isinstance(obj, set) else frozenset
        return _push_items(stack, list(base.__iter__(obj)), depth, '{"s":[' if base is set else '{"f":[', "]}")
    if tagged and isinstance(obj, bytes):
        return json.dumps({"b": b"".join((obj,)).hex()})
    raise Unencodable(f"an object of type {type.__getattribute__(type(obj), '__name__')}")


def _plain_key(key):
    """A dict key as json.dumps writes it (str as is; int, float, bool and None as their JSON text)."""
    if isinstance(key, str):
        return json.dumps(str.__str__(key))
    if key is None or key is True or key is False:
        return json.dumps({None: "null", True: "true", False: "false"}[key])
    if isinstance(key, int):
        return json.dumps(int.__repr__(int.__int__(key)))
    if isinstance(key, float):
        return json.dumps(_float_text(float.__float__(key)))
    raise Unencodable(f"a dict key of type {type.__getattribute__(type(key), '__name__')}")


_TAGS = {"t": tuple, "s": set, "f": frozenset}


def decode_tagged(text):
    """The value `encode_value(..., tagged=True)` wrote, as plain built-in objects; ValueError (or
    RecursionError) for anything else."""
    return _untag(json.loads(text))


def _untag(obj):
    if isinstance(obj, list):
        return [_untag(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) != 1:
        raise ValueError("not a tagged value")
    (tag, body), = obj.items()
    if tag in _TAGS and isinstance(body, list):
        return _TAGS[tag](_untag(x) for x in body)
    if tag == "d" and isinstance(body, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in body):
        return {_untag(k): _untag(v) for k, v in body}
    if tag == "b" and isinstance(body, str):
        return bytes.fromhex(body)
    if tag == "h" and isinstance(body, str):
        return int(body, 16)
    raise ValueError(f"unknown tag {tag!r}")


# ------------------------------------------------------------------------------------ worker (untrusted)
def _memfd(name, data=b""):
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        _write_all(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _frames(summary, code_lines, keep=50):
    """The submitted code's frames (not the harness's), innermost last, with its own line numbers."""
    out = []
    for fs in summary:
        if fs.filename == SOLUTION_FILE:
            line = code_lines[fs.lineno - 1].strip() if fs.lineno and 0 < fs.lineno <= len(code_lines) else ""
            out.append([fs.lineno, fs.name, line])
    return out[-keep:]


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


def _safe_str(obj, cap=2000, text=str):
    try:
        out = text(obj)
    except BaseException:
        out = "<unprintable>"
    return out[:cap] if isinstance(out, str) else "<unprintable>"


class Worker:
    """Runs the model's code in this process, one step per request of the judge, and answers on its pipe.

    Nothing here is trusted: the program can rewrite any of it. What it answers is the program's output
    (what it printed, what it returned, the exception it says it raised); the judge measures time itself."""

    def __init__(self, p, req_fd, rep_fd):
        self.p = p
        self.code_lines = p["code"].splitlines()
        self.out_cap = int(p["output_bytes"])
        self.err_cap = int(p.get("debug_bytes", 4096))
        self.fsize_hard = int(p["fsize_hard"])
        self.cpu_hard = int(p["cpu_hard"])
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.requests = open(req_fd, "rb", buffering=0)  # noqa: SIM115 (the worker's whole life)
        self.rep_fd = rep_fd
        self.namespace = {}
        self.compiled = None

    def reply(self, header, out=b"", err=b"", value=b""):
        header["n"] = [len(out), len(err), len(value)]
        data = b"\n" + json.dumps(header, ensure_ascii=True).encode() + b"\n" + out + err + value
        try:
            _write_all(self.rep_fd, data)
        except OSError:
            os._exit(EXIT_CHANNEL_LOST)

    def step(self, seq, stdin_bytes, cpu_limit, wall_limit, body, exit_ok=True):
        """Run `body` with the test's streams and timers; answer with its status, output and value."""
        _fired["cpu"] = _fired["wall"] = False
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
        soft = min(math.ceil(used.ru_utime + used.ru_stime + cpu_limit) + 1, self.cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, self.cpu_hard))
        header = {"seq": seq, "status": "ok"}
        value = b""
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, wall_limit)
                signal.setitimer(signal.ITIMER_PROF, cpu_limit)
                value = body() or b""
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
                signal.setitimer(signal.ITIMER_REAL, 0)
            _flush_stdout()
        except CpuLimit:
            header["status"] = "timeout"
        except WallLimit:
            header["status"] = "wall_timeout"
        except MemoryError:
            header["status"] = "memory"
        except TooLarge:
            header["status"] = "output_limit"
        except SystemExit as exc:
            code = exc.code
            if code not in (None, 0) or not exit_ok:
                header["status"] = "exit"
                header["exit_code"] = code if isinstance(code, int) and not isinstance(code, bool) else (
                    0 if code is None else 1)
            with contextlib.suppress(BaseException):
                _flush_stdout()
        except BaseException as exc:
            header["status"] = "exception"
            header["exc"] = _exc_info(exc, self.code_lines, ())
            if isinstance(exc, OSError) and exc.errno == 27:  # EFBIG: wrote past RLIMIT_FSIZE
                header["status"] = "output_limit"
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.setitimer(signal.ITIMER_REAL, 0)
        if _fired["cpu"]:
            header["status"] = "timeout"
        elif _fired["wall"]:
            header["status"] = "wall_timeout"
        for fd in (0, 1, 2):
            os.dup2(self.devnull, fd)
        header["out_size"] = os.fstat(out_fd).st_size
        out = os.pread(out_fd, self.out_cap + 1, 0)
        err = os.pread(err_fd, self.err_cap, 0)
        for fd in (in_fd, out_fd, err_fd):
            os.close(fd)
        if isinstance(value, tuple):  # (None, why): the value could not be encoded
            header["val_error"], value = value[1], b""
        self.reply(header, out, err, value)

    def setup(self, seq):
        p = self.p
        try:
            self.compiled = compile(p["code"], SOLUTION_FILE, "exec", dont_inherit=True)
        except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as exc:
            err = {"type": type(exc).__name__, "msg": _safe_str(getattr(exc, "msg", exc))}
            if isinstance(exc, SyntaxError):
                err.update(lineno=exc.lineno, offset=exc.offset, text=(exc.text or "").rstrip("\n"))
            self.reply({"seq": seq, "compile_error": err})
            return
        if p["mode"] == "stdin":
            self.reply({"seq": seq, "status": "ok"})
            return

        def body():
            self.namespace.update(_module_namespace())
            if p.get("prefix"):
                exec(compile(p["prefix"], PROMPT_FILE, "exec", dont_inherit=True), self.namespace)
            exec(self.compiled, self.namespace)
        self.step(seq, b"", p["cpu_limits"][0], p["wall_limits"][0], body)

    def serve(self):
        """Answer the judge's requests until it closes the pipe."""
        p = self.p
        while True:
            line = self.requests.readline()
            if not line:
                os._exit(0)
            req = json.loads(line)
            seq, op, i = req["seq"], req["op"], req.get("i", 0)
            if op == "setup":
                self.setup(seq)
                continue
            cpu, wall = p["cpu_limits"][i], p["wall_limits"][i]
            if op == "test" and p["mode"] == "stdin":
                data = p["inputs"][i].encode("utf-8", errors="surrogateescape")
                self.step(seq, data, cpu, wall, lambda: exec(self.compiled, _module_namespace()))
            elif op == "test":
                args = json.loads(json.dumps(p["inputs"][i]))
                self.step(seq, b"", cpu, wall, lambda args=args: self.call_leetcode(args), exit_ok=False)
            else:
                args, kwargs = decode_tagged(req["args"])
                self.step(seq, b"", cpu, wall, lambda a=args, k=kwargs: self.call_entry_point(a, k),
                          exit_ok=False)

    def call_leetcode(self, args):
        """Solution().func_name(*args) (or a top-level func_name), encoded as plain JSON."""
        ns, name = self.namespace, self.p["func_name"]
        cls = ns.get("Solution")
        if isinstance(cls, type) and hasattr(cls, name):
            fn = getattr(cls(), name)
        elif callable(ns.get(name)):
            fn = ns[name]
        else:
            raise AttributeError(f"no method {name!r} in class Solution")
        return self.encoded(fn(*args), tagged=False)

    def call_entry_point(self, args, kwargs):
        return self.encoded(self.namespace[self.p["entry_point"]](*args, **kwargs), tagged=True)

    def encoded(self, result, tagged):
        try:
            return encode_value(result, self.out_cap, tagged).encode("ascii")
        except Unencodable as exc:
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(1000)  # repr of a deep value fails cleanly instead of overflowing the C stack
            try:
                return None, f"{exc}: {_safe_str(result, 1000, repr)}"
            finally:
                sys.setrecursionlimit(limit)


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


def _worker(p, req_fd, rep_fd):
    """The worker process: limits, then ``ready``, then the judge's requests. Runs after the fork, with no
    descriptor of the supervisor's or the judge's."""
    signal.signal(signal.SIGPROF, _on_prof)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _site_setup(p.get("site_paths") or ())
    worker = Worker(p, req_fd, rep_fd)
    _apply_limits(p)
    ll = p.get("landlock")
    abi = _landlock(ll["read"], ll["write"]) if ll else 0
    if ll and not abi and ll.get("required"):
        worker.reply({"seq": 0, "setup_failed": "landlock unavailable"})
        os._exit(EXIT_NO_LANDLOCK)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), int(p.get("recursion_limit", RECURSION_LIMIT))))
    worker.reply({"seq": 0, "ready": True, "uid": os.getuid(), "landlock": abi, "python": sys.version.split()[0]})
    worker.serve()


# ----------------------------------------------------------------------------------------- judge (trusted)
_PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER = 4, 36
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_POLL = 0.1  # seconds between two readings of a running test's CPU time
_CPU_SLACK = 0.1  # CPU seconds past a test's limit that timer granularity may take
_HEADER_CAP = 1 << 20
_STATUSES = ("ok", "exception", "exit", "timeout", "wall_timeout", "memory", "output_limit")


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _children(pid):
    kids = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
            kids.extend(int(x) for x in f.read().split())
    return kids


def _descendants(root):
    found, frontier = [], [root]
    while frontier:
        kids = _children(frontier.pop())
        found.extend(kids)
        frontier.extend(kids)
    return found


def _process_cpu(pid):
    """CPU seconds of one live (or zombie) process: all its threads (the kernel's CPU clock of the process,
    else /proc ticks) plus the children it reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2:].split()
        own = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        reaped = (int(fields[13]) + int(fields[14])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0
    clock = ctypes.c_int()
    if _libc().clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
        with contextlib.suppress(OSError):
            own = time.clock_gettime(clock.value)
    return own + reaped


def tree_cpu():
    """CPU seconds of everything this process started: what it reaped, and every live descendant."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime + sum(_process_cpu(pid) for pid in _descendants(os.getpid()))


def _kill_descendants():
    """SIGKILL every descendant and reap them all (orphans come to us: we are a subreaper or PID 1)."""
    while True:
        pids = _descendants(os.getpid())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.wait4(-1, 0)
    with contextlib.suppress(ChildProcessError):
        while os.wait4(-1, os.WNOHANG)[0]:
            pass


def _close_fds_except(keep):
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _int_or_none(x):
    return x if type(x) is int else None


def _plain_frames(frames):
    """A worker's traceback frames as [line, function, source] of plain types (at most the last 50)."""
    if not isinstance(frames, list):
        return []
    return [[_int_or_none(f[0]), _safe_str(f[1], 200), _safe_str(f[2], 500)] for f in frames[-50:]
            if isinstance(f, list) and len(f) == 3]


class _Replies:
    """The worker's pipe, read with a deadline and a CPU check every `_POLL` seconds; never blocks."""

    def __init__(self, fd, pidfd):
        self.fd, self.pidfd = fd, pidfd
        self.buf = bytearray()
        self.eof = False
        self.next_check = 0.0
        os.set_blocking(fd, False)

    def _fill(self, deadline, over_cpu):
        """Read more; None when bytes arrived, else why not: "wall", "cpu" or "exit" (the worker is gone)."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                return "wall"
            if now >= self.next_check:
                if over_cpu():
                    return "cpu"
                self.next_check = now + _POLL
            watch = [self.pidfd] if self.eof else [self.fd, self.pidfd]
            ready, _, _ = select.select(watch, [], [], max(0.0, min(self.next_check, deadline) - now))
            if self.fd in ready:
                try:
                    chunk = os.read(self.fd, 1 << 20)
                except BlockingIOError:
                    continue
                if chunk:
                    self.buf += chunk
                    return None
                self.eof = True
            elif self.pidfd in ready:
                return "exit"

    def line(self, deadline, over_cpu):
        start = 0
        while True:
            nl = self.buf.find(b"\n", start)
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                return line, None
            if len(self.buf) > _HEADER_CAP:
                return None, "flood"
            start = len(self.buf)
            why = self._fill(deadline, over_cpu)
            if why:
                return None, why

    def exact(self, n, deadline, over_cpu):
        while len(self.buf) < n:
            why = self._fill(deadline, over_cpu)
            if why:
                return None, why
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data, None


class _Stop(BaseException):
    """A candidate call ended the check: the worker timed out, died, exited or ran out of memory."""

    def __init__(self, msg):
        super().__init__(msg.get("status"))
        self.msg = msg


class _CandidateRaised(BaseException):
    def __init__(self, exc):
        super().__init__(exc.get("type"))
        self.exc = exc


class _Unreadable(BaseException):
    """The candidate returned something the judge does not compare (an exotic type, a cycle, too deep)."""


class Judge:
    """Runs one submission's tests through a worker and reports every verdict-bearing fact itself."""

    def __init__(self, p):
        self.p = p
        self.mode = p["mode"]
        self.limits, self.walls = p["cpu_limits"], p["wall_limits"]
        self.out_cap = int(p["output_bytes"])
        self.err_cap = int(p.get("debug_bytes", 4096))
        self.test_lines = (p.get("test_code") or "").splitlines()
        self.stop_on = set(p.get("stop_on", ()))
        self.seq = 0
        self.garbage = 0
        self.dead = False
        self.checks = None
        self.fds = []

    def run(self):
        libc = _libc()
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace of us, no /proc/<pid>/{fd,mem} for the worker
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # the program's orphans are ours to count and kill
        try:
            self._start_worker()
            self._session()
        except BaseException as exc:  # the judge's own fault (or the task's test code): the host abstains
            send({"ev": "judge_error", "reason": f"{type(exc).__name__}: {_safe_str(exc, 500)}"})
        finally:
            _kill_descendants()
            for fd in self.fds:  # PID 1 judges one submission after another: it must not collect descriptors
                os.close(fd)

    def _start_worker(self):
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _close_fds_except((req_r, rep_w))
                _libc().prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)  # an ordinary process again (its own /proc/self)
                _own_session_keyring(_libc())
                for key in ("test_code", "check_prefix"):  # no reference to the checks (see the docs' limits)
                    self.p.pop(key, None)
                self.test_lines = ()
                _worker(self.p, req_r, rep_w)
            finally:
                os._exit(EXIT_WORKER_RETURNED)
        os.close(req_r)
        os.close(rep_w)
        self.pid, self.req = pid, req_w
        self.replies = _Replies(rep_r, os.pidfd_open(pid))
        self.fds = [req_w, rep_r, self.replies.pidfd]

    def _session(self):
        answer, why = self._answer(0, time.monotonic() + 20.0, lambda: False)
        if answer is None or not answer[0].get("ready"):
            reason = answer[0].get("setup_failed") if answer else None
            send({"ev": "harness_error", "reason": str(reason or f"the worker did not start ({why})")})
            return
        ready = answer[0]
        send({"ev": "ready", "pid": self.pid, "uid": ready.get("uid"), "landlock": ready.get("landlock"),
              "python": ready.get("python")})
        if self.mode == "humaneval":
            _site_setup(self.p.get("site_paths") or ())
            self._load_checks()
        msg, out = self._step(-1, {"op": "setup"}, self.limits[0], self.walls[0])
        if msg.get("ev") == "compile_error":
            send(msg)
            return
        if self.mode != "stdin" or msg["status"] != "ok":
            self._report(msg, out)
        if msg["status"] == "ok":
            for i in range(len(self.p["inputs"])):
                if self.mode == "humaneval":
                    msg, out = self._check(i)
                else:
                    msg, out = self._step(i, {"op": "test", "i": i}, self.limits[i], self.walls[i])
                self._report(msg, out)
                if msg["status"] in self.stop_on or self.dead:
                    break
        send({"ev": "done", "garbage": self.garbage})

    def _report(self, msg, out):
        send({**msg, "stdout_raw": len(out)}, hold=True, raw=out)

    # ------------------------------------------------------------------------- one request, one answer
    def _ask(self, request, deadline, cpu0, cpu_limit):
        self.seq += 1
        _write_all(self.req, (json.dumps({**request, "seq": self.seq}) + "\n").encode())
        return self._answer(self.seq, deadline, lambda: tree_cpu() - cpu0 > cpu_limit + _CPU_SLACK)

    def _answer(self, seq, deadline, over_cpu):
        """The worker's answer to request `seq`: ((header, out, err, value), None) or (None, why not).
        Lines that are not that answer (the program writing on its own pipe) are counted and skipped."""
        caps = (self.out_cap + 1, self.err_cap, self.out_cap)
        while True:
            line, why = self.replies.line(deadline, over_cpu)
            if line is None:
                return None, why
            if not line.strip():
                continue
            try:
                header = json.loads(line)
                sizes = header["n"] if isinstance(header, dict) and header.get("seq") == seq else None
            except (ValueError, RecursionError, KeyError, TypeError):
                sizes = None
            if not (isinstance(sizes, list) and len(sizes) == 3 and all(type(k) is int for k in sizes)):
                self.garbage += 1
                continue
            if any(not 0 <= k <= cap for k, cap in zip(sizes, caps, strict=True)):
                return None, "flood"
            data, why = self.replies.exact(sum(sizes), deadline, over_cpu)
            if data is None:
                return None, why
            a, b = sizes[0], sizes[0] + sizes[1]
            return (header, data[:a], data[a:b], data[b:]), None

    def _failure(self, why, cpu, cpu_limit):
        """The status of a test that got no answer; the worker is gone afterwards."""
        self.dead = True
        if why == "exit":
            _, status = os.waitpid(self.pid, 0)
        else:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            status = None
        _kill_descendants()
        if why == "wall":
            return {"status": "wall_timeout"}
        if why == "cpu" or cpu > cpu_limit + _CPU_SLACK:
            return {"status": "timeout"}
        if why == "flood":
            return {"status": "died", "why": "the program flooded the harness's pipe"}
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU:
                return {"status": "timeout"}
            if sig == signal.SIGXFSZ:
                return {"status": "output_limit"}
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return {"status": "died", "why": f"the program was killed by {name}"}
        return {"status": "died",
                "why": f"the program exited with code {os.WEXITSTATUS(status)} in the middle of the test"}

    def _result(self, index, msg, cpu, wall, cpu_limit, out_size, stderr=""):
        if cpu > cpu_limit + _CPU_SLACK:
            msg["status"] = "timeout"
        elif out_size > self.out_cap and msg["status"] in ("ok", "exception", "exit"):
            msg["status"] = "output_limit"
        msg.update(ev="result", i=index, cpu=round(cpu, 4), wall=round(wall, 4), stdout_bytes=out_size,
                   stderr=stderr)
        return msg

    def _step(self, index, request, cpu_limit, wall_limit):
        """One test (or the set-up) in the worker: (result event, stdout bytes)."""
        send({"ev": "start", "i": index})
        t0, cpu0 = time.monotonic(), tree_cpu()
        self.replies.next_check = t0 + _POLL
        answer, why = self._ask(request, t0 + wall_limit, cpu0, cpu_limit)
        wall, cpu = time.monotonic() - t0, tree_cpu() - cpu0
        if answer is None:
            return self._result(index, self._failure(why, cpu, cpu_limit), cpu, wall, cpu_limit, 0), b""
        header, out, err, value = answer
        if isinstance(header.get("compile_error"), dict):
            ce = header["compile_error"]
            return {"ev": "compile_error", "type": _safe_str(ce.get("type", "SyntaxError"), 200),
                    "msg": _safe_str(ce.get("msg", "")), "lineno": _int_or_none(ce.get("lineno")),
                    "offset": _int_or_none(ce.get("offset")), "text": _safe_str(ce.get("text", ""))}, b""
        msg = self._claimed(header)
        if self.mode == "functional" and index >= 0 and msg["status"] == "ok":
            msg["value"] = value.decode("ascii", "replace") if value else None
            if header.get("val_error"):
                msg["value_repr"] = _safe_str(header["val_error"], 1000)
        out_size = max(len(out), header["out_size"] if type(header.get("out_size")) is int else 0)
        msg = self._result(index, msg, cpu, wall, cpu_limit, out_size, err.decode("utf-8", "replace"))
        return msg, out[:self.out_cap]

    @staticmethod
    def _claimed(header):
        """What the worker says happened (the program's to say: an exception, an exit, its own timeout)."""
        status = header.get("status")
        msg = {"status": status if status in _STATUSES else "exception"}
        if msg["status"] == "exception":
            exc = header.get("exc") if isinstance(header.get("exc"), dict) else {}
            msg["exc"] = {"type": _safe_str(exc.get("type", "Error"), 200), "msg": _safe_str(exc.get("msg", "")),
                          "frames": _plain_frames(exc.get("frames")), "in_test": False}
        elif msg["status"] == "exit":
            msg["exit_code"] = header["exit_code"] if type(header.get("exit_code")) is int else 1
        return msg

    # ------------------------------------------------------------------------------ HumanEval checks
    def _load_checks(self):
        """The task's prompt (helpers the checks use) and test code, run here: the worker never sees them."""
        namespace = {"__name__": "__main__", "__builtins__": solution_builtins()}
        if self.p.get("check_prefix"):
            exec(compile(self.p["check_prefix"], PROMPT_FILE, "exec", dont_inherit=True), namespace)
        exec(compile(self.p["test_code"], TEST_FILE, "exec", dont_inherit=True), namespace)
        self.checks = namespace

    def _test_line(self, tb):
        line = ""
        for frame, lineno in traceback.walk_tb(tb):
            if frame.f_code.co_filename == TEST_FILE and 0 < lineno <= len(self.test_lines):
                line = self.test_lines[lineno - 1].strip()
        return line

    def _check(self, index):
        """One run of ``check(candidate)`` here, on plain values: a test passes only when it returns."""
        send({"ev": "start", "i": index})
        cpu_limit = self.limits[index]
        t0, cpu0 = time.monotonic(), tree_cpu()
        self.replies.next_check = t0 + _POLL
        deadline = t0 + self.walls[index]
        outs, errs = [], []

        def candidate(*args, **kwargs):
            request = {"op": "call", "i": index, "args": encode_value([list(args), kwargs], 1 << 30, True)}
            answer, why = self._ask(request, deadline, cpu0, cpu_limit)
            if answer is None:
                raise _Stop(self._failure(why, tree_cpu() - cpu0, cpu_limit))
            header, out, err, value = answer
            outs.append(out)
            errs.append(err)
            msg = self._claimed(header)
            if msg["status"] == "exception":
                raise _CandidateRaised(msg["exc"])
            if msg["status"] != "ok":
                raise _Stop(msg)
            if header.get("val_error") or not value:
                raise _Unreadable(_safe_str(header.get("val_error") or "no value", 1000))
            try:
                return decode_tagged(value.decode("ascii"))
            except Exception as exc:  # malformed, or nested past our recursion limit
                raise _Unreadable(f"an answer the judge cannot decode ({type(exc).__name__})") from None

        candidate.__name__ = candidate.__qualname__ = str(self.p["entry_point"])
        self.checks[candidate.__name__] = candidate  # some checks call the function by its name (HumanEval/33)
        try:
            self.checks["check"](candidate)
            msg = {"status": "ok"}
        except _Stop as stop:
            msg = stop.msg
        except _CandidateRaised as raised:
            msg = {"status": "exception", "exc": raised.exc}
        except _Unreadable as bad:
            msg = {"status": "exception", "exc": {"type": "UnreadableValue", "msg": str(bad), "frames": [],
                                                   "in_test": True, "test_line": self._test_line(bad.__traceback__)}}
        except Exception as exc:  # the check's own assertion (or an error on the candidate's values)
            msg = {"status": "exception", "exc": _exc_info(exc, (), self.test_lines)}
        wall, cpu = time.monotonic() - t0, tree_cpu() - cpu0
        out = b"".join(outs)
        stderr = b"".join(errs)[:self.err_cap].decode("utf-8", "replace")
        return self._result(index, msg, cpu, wall, cpu_limit, len(out), stderr), out[:self.out_cap]


# ------------------------------------------------------------------------------------------- supervisor
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
    """Keep stdout as the protocol channel (``_proto_fd``, which only the judge inherits) and point fds 0-2
    at /dev/null, so nothing else lands on the channel by accident."""
    global _proto_fd
    _proto_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _start_judge(p, child_setup):
    """Fork the judge of payload `p` (after `child_setup`, in the child); its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            child_setup()
            Judge(p).run()
        finally:
            os._exit(0)
    return pid


def _reap(pid):
    """Reap children (we may be PID 1 and inherit orphans) until `pid` exits; its (status, rusage)."""
    while True:
        try:
            waited, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(EXIT_NO_CHILD)
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
    _held.append(b"\n")  # ends any line the judge was killed in the middle of (one write with the event)
    send(msg)


def _ignore_signals():
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)


def main():
    """One submission: read its payload, judge it in this process, report, exit."""
    p = _read_request(0)
    if p is None:
        os._exit(EXIT_NO_REQUEST)
    _take_protocol_channel()
    _ignore_signals()
    Judge(p).run()
    _exit_event(0, resource.getrusage(resource.RUSAGE_CHILDREN))
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


_IPC_RMID, _SHM_INFO, _MSG_INFO, _SEM_INFO = 0, 14, 12, 19


def _remove_sysv_ipc(libc):
    """Delete the System V shared memory, message queues and semaphores left in our IPC namespace. The
    kernel's ``*_INFO`` counters say first whether there is any: reading /proc/sysvipc costs ~0.1 ms a file,
    and almost no solution leaves one."""
    answer = ctypes.create_string_buffer(256)
    kinds = (  # (name, query the counts, which int of the answer counts the objects in use, remove one)
        ("shm", lambda: libc.shmctl(0, _SHM_INFO, answer), 0, lambda i: libc.shmctl(i, _IPC_RMID, None)),  # used_ids
        ("msg", lambda: libc.msgctl(0, _MSG_INFO, answer), 0, lambda i: libc.msgctl(i, _IPC_RMID, None)),  # msgpool
        ("sem", lambda: libc.semctl(0, 0, _SEM_INFO, answer), 7, lambda i: libc.semctl(i, 0, _IPC_RMID)),  # semusz
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
_KEY_SPEC_SESSION_KEYRING, _KEY_SPEC_USER_KEYRING, _KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
_USER_KEYRINGS = (_KEY_SPEC_USER_KEYRING, _KEY_SPEC_USER_SESSION_KEYRING)


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
    # our uid's (-1) persistent keyring, linked to our session keyring; -1 if there is none
    persistent = libc.syscall(_KEYCTL, _KEYCTL_GET_PERSISTENT, -1, _KEY_SPEC_SESSION_KEYRING)
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
    """Answer requests on fd 0 until it closes: payload, then (read only after the fork) a token line that
    the ``exit`` event echoes, so that each ``exit`` the host reads belongs to the run it sent."""
    refusal = _not_a_sandbox()
    if refusal:
        sys.stderr.write(f"--serve refuses to run: {refusal}\n")
        os._exit(EXIT_NOT_A_SANDBOX)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace of us and no /proc/1/{mem,fd} for the worker
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
        if p["mode"] == "humaneval":  # the checks run in a judge of their own, which then ends
            pid = _start_judge(p, functools.partial(os.close, requests))
            token = _read_exact(requests, TOKEN_LINE_BYTES)
            status, usage = _reap(pid)
        else:  # no task code to run: PID 1 judges (one fork a submission fewer)
            token = _read_exact(requests, TOKEN_LINE_BYTES)
            Judge(p).run()
            status, usage = 0, resource.getrusage(resource.RUSAGE_CHILDREN)
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

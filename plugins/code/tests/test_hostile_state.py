"""State one submission leaves for the next: on every local backend, a "leaver" that changes whatever it can
reach, then a different, correct "victim" that looks at that state, must get exactly the verdict and output it
gets in a fresh sandbox, and what the leaver could fill is bounded. One attack class per leaver.

The victim reports what it sees in full on bwrap (a hermetic file system). The process backend shares the
host's file system, whose directories other programs change meanwhile, so there the victim reports only the
traces a leaver leaves (names with ``sdpo-leaver`` in them) and the host is checked directly.
"""

from __future__ import annotations

import os
import textwrap

import pytest
from sdpo_code import CodeEnvironment
from sdpo_code.sandbox._system import UID_BASE, UID_SLOTS
from sdpo_code.sandbox.base import ExecutionRequest

ADD = {"prompt": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}
MARK = "sdpo-leaver"
WRITABLE_MIB = 2 * 64 + 1  # bwrap: /tmp and /dev/shm (64 MiB each) and /dev/mqueue's few kilobytes

_TRY = "def attempt(fn, *args):\n    try:\n        return fn(*args)\n    except Exception:\n        return None\n"
_DIRS = ("/", "/etc", "/dev", "/usr", "/usr/bin", "/tmp", "/dev/shm", "/dev/mqueue", "/var/tmp")

LEAVERS = {
    "files-everywhere": f"""
        import os
        for d in {_DIRS!r} + (os.environ.get('HOME', '/'), os.getcwd()):
            attempt(lambda: open(os.path.join(d, '{MARK}'), 'w').write('x'))
            attempt(os.mkdir, os.path.join(d, '{MARK}-dir'))
    """,
    "replace-bin-sh": f"""
        import os
        fake = '/tmp/{MARK}-bin'
        attempt(os.makedirs, fake)
        attempt(lambda: open(fake + '/sh', 'w').write('#!/usr/bin/python3\\nprint(42)\\n'))
        attempt(os.chmod, fake + '/sh', 0o755)
        for path in ('/bin', '/usr/bin/sh', '/bin/sh', '/usr/bin/dash'):
            attempt(os.rename, path, path + '-{MARK}')
            attempt(os.unlink, path)
            attempt(os.symlink, fake if path == '/bin' else fake + '/sh', path)
    """,
    "replace-dev-stdio": f"""
        import os
        attempt(lambda: open('/tmp/{MARK}-in', 'w').write('40 2\\n'))
        for name in ('stdin', 'stdout', 'stderr', 'null', 'fd'):
            attempt(os.unlink, '/dev/' + name)
            attempt(os.symlink, '/tmp/{MARK}-in', '/dev/' + name)
        attempt(os.chmod, '/dev/null', 0)
    """,
    "fill-everything": f"""
        import os
        written = 0
        chunk = b'x' * (1 << 20)
        for i, d in enumerate(('/', '/etc', '/dev', '/tmp', '/dev/shm', '/dev/mqueue', os.getcwd())):
            for n in range(64):
                f = attempt(open, os.path.join(d, '{MARK}-fill-%d-%d' % (i, n)), 'wb')
                if f is None:
                    break
                full = False
                for _ in range(4):
                    try:
                        f.write(chunk)
                        f.flush()
                        written += len(chunk)
                    except OSError:
                        full = True
                        break
                attempt(f.close)
                if full:
                    break
        import sys
        sys.stderr.write('wrote %d MiB\\n' % (written >> 20))
    """,
    "lock-the-work-dirs": """
        import os
        for d in ('/tmp', '/dev/shm', '/dev/mqueue', os.getcwd()):
            attempt(os.chmod, d, 0)
    """,
    "keyrings": f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        number = {{'x86_64': (248, 250), 'aarch64': (217, 219)}}.get(os.uname().machine)
        if number:
            add_key, keyctl = number
            persistent = libc.syscall(keyctl, 22, -1, -3)
            for ring in (-4, -5, -3, persistent):
                libc.syscall(add_key, b'user', b'{MARK}', b'{MARK}-secret', 18, ring)
    """,
    "ipc-objects": """
        import ctypes
        libc = ctypes.CDLL(None)
        libc.shmget(0, 4096, 0o1666)
        libc.msgget(0, 0o1666)
        libc.semget(0, 1, 0o1666)
        attempt(lambda: open('/dev/mqueue/q', 'w').close())
    """,
}

VICTIM = f"""
import ctypes, os, subprocess, sys, tempfile
FULL = FULL_REPORT
def attempt(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return type(exc).__name__
def listing(d):
    names = attempt(os.listdir, d)
    if isinstance(names, list):
        names = sorted(n for n in names if FULL or '{MARK}' in n)
    return names
a, b = map(int, open('/dev/stdin').read().split())
shell = attempt(lambda: subprocess.run(['/bin/sh', '-c', 'echo %d' % (a + b)], capture_output=True).stdout)
print(shell.decode().strip() if isinstance(shell, bytes) else shell, file=open('/dev/stdout', 'a'), flush=True)
report = {{d: listing(d) for d in {_DIRS!r} + ('/bin', '/dev/fd')}}
report['home'], report['cwd'] = listing(os.environ.get('HOME', '/')), listing(os.getcwd())
report['tmp file'] = attempt(lambda: tempfile.TemporaryFile().close())
report['null'] = attempt(lambda: open('/dev/null', 'w').write('x'))
libc = ctypes.CDLL(None, use_errno=True)
keyctl = {{'x86_64': 250, 'aarch64': 219}}.get(os.uname().machine)
secrets = []
for line in attempt(lambda: open('/proc/keys').read().splitlines()) or []:
    buf = ctypes.create_string_buffer(64)
    if keyctl and libc.syscall(keyctl, 11, int(line.split()[0], 16), buf, 64) >= 0 and b'{MARK}' in buf.raw:
        secrets.append(buf.value)
report['keys'] = secrets
report['sysv'] = [attempt(lambda: len(open('/proc/sysvipc/' + k).read().splitlines())) for k in ('shm', 'msg', 'sem')]
if FULL:
    report['modes'] = {{d: oct(os.stat(d).st_mode) for d in ('/tmp', '/dev/shm', '/dev/mqueue')}}
    report['free'] = {{d: os.statvfs(d).f_bfree for d in ('/tmp', '/dev/shm')}}
    report['pids'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid())
print(report, file=sys.stderr)
"""


def victim(full: bool) -> str:
    return VICTIM.replace("FULL_REPORT", str(full))


def _request(code: str) -> ExecutionRequest:
    return ExecutionRequest(mode="stdin", code=code, inputs=("1 2\n",), cpu_limits=(2.0,), wall_limits=(6.0,),
                            memory_bytes=256 << 20)


def _victim(sandbox, name: str) -> tuple[str, str]:
    """The victim's stdout and report in `sandbox`."""
    result = sandbox.run(_request(victim(full=name.startswith("bwrap"))))
    assert result.done, result
    assert result.results[0]["status"] == "ok", result
    return result.results[0]["stdout"], result.results[0]["stderr"]


@pytest.fixture(params=["bwrap", "bwrap-fresh", "process"])
def backend(request: pytest.FixtureRequest, backend_by_name) -> str:
    backend_by_name(request.param)  # skips where it cannot work
    return request.param


@pytest.mark.parametrize("leaver", sorted(LEAVERS))
def test_the_next_submission_sees_a_fresh_sandbox(backend, leaver, backend_by_name, no_leftovers):
    sandbox = backend_by_name(backend)
    # What the victim sees in a fresh sandbox: a new bwrap sandbox for the reused one, else the backend's own
    # (every run of which is a fresh sandbox).
    reference = _victim(backend_by_name("bwrap-fresh" if backend == "bwrap" else backend), backend)
    assert reference[0] == "3\n"
    code = _TRY + textwrap.dedent(LEAVERS[leaver]) + "print(3)\n"
    left = sandbox.run(_request(code))
    assert left.done, left
    started = sandbox._pool.started if getattr(sandbox, "_pool", None) else None
    if backend.startswith("bwrap") and leaver == "fill-everything":
        written = int(left.results[0]["stderr"].split()[1])
        assert written <= WRITABLE_MIB, f"a submission filled {written} MiB"
    assert _victim(sandbox, backend) == reference
    if started is not None:
        assert sandbox._pool.started == started, "the victim did not run in the leaver's sandbox"
    env = CodeEnvironment(backend=sandbox, time_limit=2.0)
    assert env.score(ADD, f"```python\n{victim(full=False)}\n```").reward == 1.0
    no_leftovers()
    for d in (d for d in _DIRS if os.path.isdir(d)):  # the host is unchanged
        assert not [n for n in os.listdir(d) if MARK in n], d
    assert not _host_ipc_of_sandboxes()


def _host_ipc_of_sandboxes() -> list[str]:
    """The host's System V IPC objects created by a sandbox uid."""
    found = []
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            header, *rows = [line.split() for line in f]
        cuid = header.index("cuid")
        found += [f"{kind} {row[1]}" for row in rows if UID_BASE <= int(row[cuid]) <= UID_BASE + UID_SLOTS]
    return found

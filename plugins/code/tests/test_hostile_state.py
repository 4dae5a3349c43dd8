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
from sdpo_code.limits import Limits
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
        import ctypes
        libc = ctypes.CDLL(None)
        if libc.unshare(0x10000000 | 0x00020000) == 0:  # a user and mount namespace of its own, with a tmpfs
            for name, text in (('setgroups', 'deny'), ('uid_map', '65534 65534 1'), ('gid_map', '65534 65534 1')):
                attempt(lambda: open('/proc/self/' + name, 'w').write(text))
            if libc.mount(b'none', b'/tmp', b'tmpfs', 0, b'size=1g') == 0:
                for n in range(64):
                    try:
                        with open('/tmp/{MARK}-nested-%d' % n, 'wb') as f:
                            for _ in range(4):
                                f.write(chunk)
                                f.flush()
                                written += len(chunk)
                    except OSError:
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
                            limits=Limits(memory_mb=256))


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


# ----------------------------------------------------------------------------------- the grader's own data
# A program that looks for the bundled problems (sdpo_code/data/problems.jsonl, with their hidden tests) in
# the places given as ROOTS, and answers from them: stdin problems by printing the output stored for the
# input it reads, functional ones through a `Solution` whose every method returns the stored output.
LOOKUP = """
import glob, gzip, json, os, sys
ROOTS = LOOKUP_ROOTS
seen, found, tests = 0, [], []
for top in ROOTS:
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in ('/proc', '/sys')]
        for name in files:
            seen += 1
            path = os.path.join(root, name)
            if not name.endswith(('.jsonl', '.jsonl.gz', '.json')):
                continue
            try:
                raw = open(path, 'rb').read()
                text = (gzip.decompress(raw) if name.endswith('.gz') else raw).decode()
            except (OSError, ValueError):
                continue
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                    cases = [c for k in ('public_test_cases', 'private_test_cases') for c in json.loads(row[k])]
                except (ValueError, KeyError, TypeError):
                    continue
                found.append(path)
                tests += cases
print('seen %d files; grader data in %s' % (seen, sorted(set(found))), file=sys.stderr)
stdin = sys.stdin.read()
for case in tests:
    if stdin and case['input'] == stdin:
        print(case['output'], end='')
class Solution:
    def __getattr__(self, name):
        def answer(*args):
            for case in tests:
                if [json.loads(x) for x in case['input'].split(chr(10))] == list(args):
                    return json.loads(case['output'])
        return answer
"""


CENSUS = ("[VENV, '/usr/local', *glob.glob('/usr/lib*/python3*'), *(os.path.join('/', d) for d in"
          " os.listdir('/') if d not in ('usr', 'proc', 'sys') and not os.path.islink(os.path.join('/', d)))]")


def lookup(roots: list[str] | str) -> str:
    return LOOKUP.replace("LOOKUP_ROOTS", repr(roots) if isinstance(roots, list) else roots)


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
    """A virtual environment with sdpo-code installed the regular way (a wheel, not editable), made from the
    interpreter the bwrap sandbox runs, in a directory the sandbox user can read."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from sdpo_code.sandbox import SandboxUnavailable, get_sandbox

    try:
        base = get_sandbox("bwrap", reuse=False).interpreter.path
    except SandboxUnavailable as exc:
        pytest.skip(str(exc))
    top = Path(tempfile.mkdtemp(prefix="sdpo-code-venv-", dir="/var/tmp"))
    top.chmod(0o755)
    try:
        venv = top / "venv"
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        plugin = tmp_path_factory.mktemp("src") / "sdpo-code"  # a copy: building writes build/ next to the source
        shutil.copytree(Path(__file__).resolve().parents[1], plugin,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
        wheels = tmp_path_factory.mktemp("wheel")
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(plugin)],
                       check=True, capture_output=True, cwd=wheels)
        (wheel,) = wheels.glob("sdpo_code-*.whl")
        subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
                        str(wheel)], check=True, capture_output=True)
        for path in top.rglob("*"):
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
        yield venv
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.integration
def test_the_grader_installed_in_the_interpreters_venv_is_out_of_reach(installed_venv):
    import subprocess

    from sdpo_code import load_bundled
    from sdpo_code.sandbox.bwrap import BwrapSandbox

    python = str(installed_venv / "bin" / "python")
    data = list(installed_venv.glob("lib/python3*/site-packages/sdpo_code/data/problems.jsonl"))
    assert data, "the regular install did not ship the bundled problems"
    # Outside a sandbox the lookup program finds them (so it is a real attack)...
    outside = subprocess.run([python, "-c", lookup([str(installed_venv)])], input="2 3\n", capture_output=True,
                             text=True, timeout=60)
    assert outside.stdout == "5\n"
    assert str(data[0]) in outside.stderr
    sandbox = BwrapSandbox(python=python, reuse=True)
    try:
        assert sandbox.interpreter.venv == str(installed_venv)
        # ...inside, a search of every place it could be (all but the system's own /usr, of which the Python
        # trees and /usr/local) finds nothing of the grader,
        census_roots = CENSUS.replace("VENV", repr(str(installed_venv)))
        census = sandbox.run(ExecutionRequest(mode="stdin", code=lookup(census_roots), inputs=("",),
                                              cpu_limits=(30.0,), wall_limits=(90.0,)))
        assert census.done, census
        report = census.results[0]["stderr"]
        assert int(report.split()[1]) > 1000, report  # it did walk the file system
        assert report.rstrip().endswith("grader data in []"), report
        # and no bundled problem is solved by looking its answers up where the package is installed.
        env = CodeEnvironment(backend=sandbox, time_limit=5.0)
        roots = f"[{str(installed_venv)!r}, *sys.path]"
        rows = load_bundled()
        rewards = [fb.reward for fb in env.evaluate(rows, [f"```python\n{lookup(roots)}\n```"] * len(rows))]
        assert rewards == [0.0] * len(rows)
    finally:
        sandbox.close()

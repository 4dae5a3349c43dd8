"""Hostile programs on every local backend: each gets the right verdict, nothing survives, the host is
unchanged, and the next submission runs normally. One adversarial property per test."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
from sdpo_code import CodeEnvironment

ADD = {"prompt": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}
GOOD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
REPO_FILE = Path(__file__).resolve().parents[3] / "pyproject.toml"


def py(code: str) -> str:
    return f"```python\n{code}\n```"


@pytest.fixture
def judge(sandbox, no_leftovers):
    """`judge(code, **env_kwargs)` scores `code` on ADD, checks that nothing survived and that a correct
    submission still passes afterwards, and returns the hostile submission's feedback."""
    def run(code: str, task=ADD, **kwargs):
        kwargs = {"time_limit": 0.5, "wall_factor": 2.0, "memory_mb": 256, **kwargs}
        env = CodeEnvironment(backend=sandbox, **kwargs)
        feedback = env.score(task, py(code))
        no_leftovers()
        after = env.score(ADD, GOOD)
        assert after.reward == 1.0, f"the next submission failed: {after.text}"
        return feedback
    return run


def verdict(fb) -> str:
    return fb.details["verdict"]


def test_fork_bomb(judge):
    fb = judge("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert verdict(fb) == "Time Limit Exceeded"


def test_memory_bomb(judge):
    fb = judge("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))")
    assert verdict(fb) == "Memory Limit Exceeded"
    assert fb.text.startswith("Memory Limit Exceeded\n\nLast Executed Input\n1 2")


def test_infinite_loop(judge):
    assert verdict(judge("while True:\n    pass")) == "Time Limit Exceeded"


def test_sleep_past_the_limit(judge):
    fb = judge("import time\ntime.sleep(60)")
    assert verdict(fb) == "Time Limit Exceeded"
    assert fb.details["seconds"] < 10


def test_ignoring_the_cpu_timer(judge):
    code = ("import signal\nsignal.signal(signal.SIGPROF, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass")
    assert verdict(judge(code)) == "Time Limit Exceeded"


def test_infinite_output(judge):
    fb = judge("while True:\n    print('x' * 1000)", output_limit_bytes=1 << 20)
    assert verdict(fb) == "Output Limit Exceeded"


def test_write_outside_the_work_dir(judge):
    target_dir = tempfile.mkdtemp(prefix="sdpo-code-escape-", dir="/tmp")
    os.chmod(target_dir, 0o777)
    try:
        paths = (target_dir + "/escape", "/dev/shm/sdpo-code-escape", "/var/tmp/sdpo-code-escape")
        code = (f"for path in {paths!r}:\n"
                "    try:\n        open(path, 'w').write('x')\n    except OSError:\n        pass\n"
                f"open({target_dir + '/escape2'!r}, 'w').write('x')")
        fb = judge(code)
        assert verdict(fb) == "Runtime Error"
        assert os.listdir(target_dir) == []
        assert not os.path.exists("/dev/shm/sdpo-code-escape")
        assert not os.path.exists("/var/tmp/sdpo-code-escape")
    finally:
        os.rmdir(target_dir)


@pytest.mark.parametrize("path", ["/etc/shadow", str(REPO_FILE)])
def test_read_outside_the_work_dir(judge, path):
    fb = judge(f"print(open({path!r}).read())")
    assert verdict(fb) == "Runtime Error"
    assert any(err in fb.text for err in ("PermissionError", "FileNotFoundError"))


def test_network_connection_to_localhost(judge):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        fb = judge(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert verdict(fb) == "Runtime Error"
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize("attack", [
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.kill(-1, signal.SIGKILL)",
    "os.killpg(0, signal.SIGKILL)",
])
def test_killing_the_parent_process_group(judge, attack):
    fb = judge(f"import os, signal\n{attack}\nimport time\ntime.sleep(0.2)\nprint(3)")
    # Signals to the sandbox's PID 1 are ignored by the kernel, so some attacks only kill the program itself.
    assert verdict(fb) in ("Runtime Error", "Accepted")
    assert os.getpid() > 0  # the test runner survived


def test_daemon_left_behind(judge):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
            "    os._exit(0)\n"
            "a, b = map(int, input().split())\nprint(a + b)")
    assert verdict(judge(code)) == "Accepted"  # the judge's no_leftovers() checks that the daemon is gone


@pytest.mark.parametrize(("code", "expected"), [
    ("import os\nos._exit(3)", "Runtime Error"),
    ("import os\nos._exit(0)", "Runtime Error"),
    ("import sys\nprint(3)\nsys.exit(0)", "Accepted"),
    ("import sys\nprint(3)\nsys.exit(2)", "Runtime Error"),
])
def test_exit_codes(judge, code, expected):
    fb = judge(code)
    assert verdict(fb) == expected
    if "_exit(3)" in code:
        assert "code 3" in fb.text


def test_closing_stdout(judge):
    assert verdict(judge("import sys\nprint(3)\nsys.stdout.close()")) == "Accepted"
    assert verdict(judge("import os\nos.close(1)\nprint(3)")) in ("Runtime Error", "Wrong Answer")


def test_huge_input(judge):
    numbers = [str(i % 1000) for i in range(1_500_000)]
    expected = sum(i % 1000 for i in range(1_500_000))
    test = {"input": f"{len(numbers)}\n{' '.join(numbers)}\n", "output": f"{expected}\n", "testtype": "stdin"}
    task = {"prompt": "sum", "tests": [test]}
    ok = judge("import sys\ndata = sys.stdin.buffer.read().split()\nprint(sum(map(int, data[1:])))", task=task,
               time_limit=5.0, memory_mb=1024)
    assert verdict(ok) == "Accepted"
    wrong = judge("print(0)", task=task, time_limit=5.0, memory_mb=1024)
    assert len(wrong.text) <= 2000
    assert "... " not in wrong.text.split("\n")[3][:3]


def test_non_utf8_output(judge):
    fb = judge("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe3\\n')")
    assert verdict(fb) == "Wrong Answer"
    assert "\ufffd" in fb.text


def test_environment_is_scrubbed(judge, monkeypatch):
    monkeypatch.setenv("SDPO_CODE_SECRET", "hunter2")
    fb = judge("import os\nprint(os.environ)")
    assert "hunter2" not in fb.text
    assert verdict(fb) == "Wrong Answer"


def test_a_sandbox_is_gone_when_its_run_returns(backend_by_name, no_leftovers):
    """Killing a bwrap sandbox ends its PID 1 only through the parent-death signal, asynchronously: the run
    returns once every process of the sandbox has ended, so none is left even without a grace period (and the
    sandbox's uid is free of them for the next one)."""
    env = CodeEnvironment(backend=backend_by_name("bwrap-fresh"), time_limit=0.5, wall_factor=2.0, memory_mb=256)
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
              "a, b = map(int, input().split())\nprint(a + b)")
    for _ in range(5):
        assert verdict(env.score(ADD, py(daemon))) == "Accepted"
        no_leftovers(timeout=0)

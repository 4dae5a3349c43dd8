"""A reused bwrap sandbox (the default): one solution leaves nothing the next one can see, the channel cannot be
desynchronised, PID 1 cannot be reached, and a sandbox that went wrong is replaced, not reused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from sdpo_code import CodeEnvironment
from sdpo_code.sandbox.base import HARNESS_SOURCE, ExecutionRequest
from sdpo_code.sandbox.bwrap import BwrapSandbox

ADD = {"prompt": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}
GOOD = "a, b = map(int, input().split())\nprint(a + b)"
ECHO = {"prompt": "echo", "tests": [{"input": "", "output": "-\n", "testtype": "stdin"}]}


def py(code: str) -> str:
    return f"```python\n{code}\n```"


@pytest.fixture
def reused(backend_by_name, no_leftovers):
    """A fresh reused bwrap sandbox per test (its own pool), closed afterwards."""
    backend_by_name("bwrap")  # skips where bwrap cannot work
    sandbox = BwrapSandbox(reuse=True)
    yield sandbox
    sandbox.close()
    no_leftovers()


def _env(sandbox, **kwargs) -> CodeEnvironment:
    return CodeEnvironment(backend=sandbox, time_limit=1.0, **kwargs)


def _run(sandbox: BwrapSandbox, code: str):
    return sandbox.run(ExecutionRequest(mode="stdin", code=code, inputs=("",), cpu_limits=(1.0,), wall_limits=(3.0,)))


def _printed(sandbox: BwrapSandbox, code: str) -> str:
    """What `code` printed, straight from the sandbox."""
    result = _run(sandbox, code)
    assert result.done, result
    return result.results[0]["stdout"]


def test_one_sandbox_serves_every_solution_even_from_threads_that_end(reused):
    env = _env(reused)
    rewards = []
    for _ in range(4):  # each call on a thread that exits afterwards (bwrap's --die-with-parent is per thread)
        t = threading.Thread(target=lambda: rewards.append(env.score(ADD, py(GOOD)).reward))
        t.start()
        t.join()
    assert rewards == [1.0] * 4
    assert reused._pool.started == 1


def test_concurrent_callers_get_one_sandbox_each(reused):
    env = _env(reused, max_workers=2)
    results = env.evaluate([ADD] * 8, [py(GOOD)] * 8)
    assert [r.reward for r in results] == [1.0] * 8
    assert 1 <= reused._pool.started <= 2


def _next_sees(sandbox: BwrapSandbox, leave: str, look: str) -> str:
    """Run `leave` (accepted: it prints ``-``), then what `look` prints in the next solution."""
    assert _env(sandbox).score(ECHO, py(leave)).reward == 1.0
    return _printed(sandbox, look).strip()


def test_files_do_not_survive_into_the_next_solution(reused):
    leave = ("import os\nfor d in ('/tmp', '/dev/shm'):\n    os.makedirs(d + '/deep/er', exist_ok=True)\n"
             "    open(d + '/deep/er/f', 'w').write('x')\n    open(d + '/secret', 'w').write('x')\n"
             "    os.chmod(d + '/deep/er', 0)\n    os.chmod(d + '/deep', 0)\n"
             "open('/dev/mqueue/q', 'w').close()\nos.chmod('/tmp', 0o500)\nprint('-')")
    look = ("import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')), "
            "sorted(os.listdir('/dev/mqueue')), os.access('/tmp', os.W_OK))")
    assert _next_sees(reused, leave, look) == "[] [] [] True"


def test_processes_do_not_survive_into_the_next_solution(reused):
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
              "    os._exit(0)\nprint('-')")
    others = ("import os\nme = {os.getpid(), os.getppid()} - {1}\n"
              "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) not in me))")
    assert _next_sees(reused, daemon, others) == "[1]"  # only the sandbox's PID 1 (and this solution's judge)


def test_system_v_ipc_does_not_survive_into_the_next_solution(reused):
    create = ("import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.shmget(0, 4096, 0o1600) >= 0\n"
              "assert libc.msgget(0, 0o1600) >= 0\nassert libc.semget(0, 1, 0o1600) >= 0\nprint('-')")
    count = ("rows = [len(open('/proc/sysvipc/' + k).read().splitlines()) - 1 for k in ('shm', 'msg', 'sem')]\n"
             "print(rows)")
    assert _next_sees(reused, create, count) == "[0, 0, 0]"


def test_each_solution_gets_its_own_random_state(reused):
    draw = "import random\nprint(random.random())"
    assert _printed(reused, draw) != _printed(reused, draw)


def test_pid_1_cannot_be_read_or_traced(reused):
    probe = ("import os\nout = []\nfor path in ('/proc/1/mem', '/proc/1/environ'):\n    try:\n"
             "        open(path, 'rb').read(1)\n        out.append('read')\n    except OSError:\n"
             "        out.append('denied')\ntry:\n    os.listdir('/proc/1/fd')\n    out.append('read')\n"
             "except OSError:\n    out.append('denied')\nprint(out)")
    assert _printed(reused, probe).strip() == "['denied', 'denied', 'denied']"


def test_a_forged_end_of_run_is_ignored(reused):
    """The program writes fake ``exit`` events on every descriptor: the run still ends when PID 1 says so, and
    the next solution's events are its own."""
    env = _env(reused)
    fake = json.dumps({"ev": "exit", "code": 0, "cpu": 0.0})
    forge = (f"import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\n{fake}\\n')\n"
             "    except OSError:\n        pass\nimport time\ntime.sleep(0.2)\nprint(5)")
    result = _run(reused, forge)
    assert result.done
    assert result.results[0]["stdout"].endswith("\n5\n")  # the fake line went into its own stdout too
    assert result.info["garbage_lines"] >= 1
    assert env.score(ADD, py(GOOD)).reward == 1.0
    assert reused._pool.started == 1


def test_a_sandbox_killed_at_a_deadline_is_replaced(reused):
    """The trainer's whole-submission budget (1 s) ends before the judge's own per-test wall limit (2 s)."""
    env = _env(reused, wall_factor=1.0, task_time_limit=1.0)
    blocked = ("import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGPROF})\n"
               "time.sleep(60)")
    fb = env.score(ADD, py(blocked))
    assert fb.details["verdict"] == "Time Limit Exceeded"
    assert env.score(ADD, py(GOOD)).reward == 1.0
    assert reused._pool.started == 2


def test_a_sandbox_that_died_while_idle_is_replaced_without_blaming_the_solution(reused):
    env = _env(reused)
    assert env.score(ADD, py(GOOD)).reward == 1.0
    (idle,) = reused._pool._idle
    os.kill(idle.proc.pid, signal.SIGKILL)
    idle.proc.wait(timeout=10)
    time.sleep(0.1)
    fb = env.score(ADD, py(GOOD))
    assert fb.reward == 1.0, fb.text
    assert reused._pool.started == 2


def test_close_stops_the_idle_sandboxes(reused, no_leftovers):
    env = _env(reused)
    assert env.score(ADD, py(GOOD)).reward == 1.0
    assert reused._pool._idle
    reused.close()
    assert not reused._pool._idle
    no_leftovers()


def test_a_pickled_copy_starts_its_own_sandboxes(reused):
    assert _printed(reused, "print('-')") == "-\n"
    copy = pickle.loads(pickle.dumps(reused))
    assert copy._pool is not reused._pool
    assert _printed(copy, "print('+')") == "+\n"
    assert copy._pool.started == 1
    copy.close()


def test_the_environment_closes_the_sandbox_it_built(backend_by_name, no_leftovers):
    backend_by_name("bwrap")
    env = CodeEnvironment(backend="bwrap")
    assert env.score(ADD, py(GOOD)).reward == 1.0
    assert env.sandbox._pool._idle
    env.close()
    assert not env.sandbox._pool._idle
    no_leftovers()


@pytest.mark.parametrize("launcher", [[], ["unshare", "--pid", "--fork", "--mount-proc"]], ids=["plain", "pid-ns"])
def test_serve_mode_refuses_to_run_outside_a_sandbox(launcher):
    """Serve mode empties /tmp after each solution: outside a sandbox of its own it must not start at all
    (a bare PID namespace makes it PID 1, but /tmp is still the host's)."""
    if launcher and (shutil.which(launcher[0]) is None or os.geteuid() != 0):
        pytest.skip("needs root and unshare")
    with tempfile.NamedTemporaryFile(prefix="sdpo-canary-") as canary:
        out = subprocess.run([*launcher, sys.executable, "-I", "-S", "-c", HARNESS_SOURCE, "--serve"],
                             input=b"", capture_output=True, timeout=60)
        assert out.returncode == 75, out
        assert b"--serve refuses to run" in out.stderr
        assert os.path.exists(canary.name)

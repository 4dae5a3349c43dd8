"""Programs that try to forge a reward instead of earning it, on every local backend: a forged pass, a forged
abstention, a forged or stretched time, a forged verdict line. Each must get reward 0 (or exactly the verdict an
honest program with that behaviour gets), leave nothing running, and leave the sandbox such that the next,
different submissions get the verdicts they get anywhere else. One attack class per test."""

from __future__ import annotations

import json
import time

import pytest
from sdpo_code import CodeEnvironment
from sdpo_code.sandbox.bwrap import BwrapSandbox

ADD = {"prompt": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}
GOOD = "a, b = map(int, input().split())\nprint(a + b)"
WRONG = "print(4)"
HUMANEVAL = {"task_id": "HumanEval/add", "prompt": 'def add(a, b):\n    """Add."""\n', "entry_point": "add",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"
                     "    assert candidate(-1, 1) == 0\n"}
LEETCODE = {"question_content": "Return the pair (a + b, a - b).",
            "starter_code": "class Solution:\n    def f(self, a, b):\n",
            "public_test_cases": json.dumps([{"input": "5\n3", "output": "[8, 2]", "testtype": "functional"}]),
            "metadata": json.dumps({"func_name": "f"})}
THREE_SLEEPY_TESTS = {"prompt": "add", "tests": [dict(ADD["tests"][0]) for _ in range(3)]}


def py(code: str) -> str:
    return f"```python\n{code}\n```"


@pytest.fixture
def attack(sandbox, no_leftovers):
    """`attack(code, task, **env_kwargs)` scores `code`, checks that no process survived, that the host channel
    still works and that the same sandbox then judges an honest and a wrong submission as a fresh one does
    (Accepted, Wrong Answer); returns the attack's feedback."""
    def run(code: str, task=ADD, **kwargs):
        kwargs = {"time_limit": 0.5, "wall_factor": 2.0, "memory_mb": 256, **kwargs}
        env = CodeEnvironment(backend=sandbox, **kwargs)
        feedback = env.score(task, py(code))
        no_leftovers()
        assert feedback.reward is not None, f"the attack made the grader abstain: {feedback.details}"
        after = [env.score(ADD, py(GOOD)).details["verdict"], env.score(ADD, py(WRONG)).details["verdict"]]
        assert after == ["Accepted", "Wrong Answer"], f"the next submissions were judged {after}"
        return feedback
    return run


def verdict(fb) -> str:
    return fb.details["verdict"]


# ------------------------------------------------------------------------- HumanEval: a pass is a finished check
@pytest.mark.parametrize("leave", ["exit()", "quit()", "import sys; sys.exit(0)", "import os; os._exit(0)",
                                   "raise SystemExit", "raise SystemExit(0)"])
def test_leaving_while_the_checks_run_is_not_a_pass(attack, leave):
    fb = attack(f"def add(a, b):\n    {leave}", task=HUMANEVAL)
    assert verdict(fb) == "Runtime Error"


@pytest.mark.parametrize("leave", ["exit()", "import os; os._exit(0)"])
def test_leaving_at_module_level_is_not_a_pass(attack, leave):
    fb = attack(f"def add(a, b):\n    return 0\n{leave}", task=HUMANEVAL)
    assert verdict(fb) in ("Runtime Error", "Wrong Answer")


@pytest.mark.parametrize("liar", [
    "class R:\n    def __init__(self, *a):\n        pass\n    def __eq__(self, other):\n        return True\n",
    "class R:\n    def __init__(self, *a):\n        pass\n    def __eq__(self, other):\n        return True\n"
    "    def __ne__(self, other):\n        return False\n",
    "class R:\n    def __init__(self, *a):\n        pass\n    def __bool__(self):\n        return True\n"
    "    def __eq__(self, other):\n        return self\n",
    "class R(int):\n    def __new__(cls, *a):\n        return int.__new__(cls, 7)\n"
    "    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n",
    "class R(str):\n    def __new__(cls, *a):\n        return str.__new__(cls, 'x')\n"
    "    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n",
])
def test_a_value_that_lies_about_equality_is_not_a_pass(attack, liar):
    fb = attack(f"{liar}\ndef add(a, b):\n    return R(a, b)", task=HUMANEVAL)
    assert verdict(fb) == "Wrong Answer"


def test_the_checks_compare_real_values(attack):
    """A subclass carrying the right value is judged by that value (its methods are never called)."""
    honest = "class R(int):\n    def __eq__(self, other):\n        return False\n    __hash__ = int.__hash__\n"
    assert verdict(attack(f"{honest}\ndef add(a, b):\n    return R(a + b)", task=HUMANEVAL)) == "Accepted"


def test_rewriting_the_checks_is_not_a_pass(attack):
    code = ("import gc, builtins\nfor obj in gc.get_objects():\n    if getattr(obj, '__name__', '') == 'check':\n"
            "        obj.__code__ = (lambda candidate: None).__code__\n"
            "builtins.AssertionError = type('Quiet', (Exception,), {})\ndef add(a, b):\n    return 0")
    assert verdict(attack(code, task=HUMANEVAL)) == "Wrong Answer"


# ------------------------------------------------------- LeetCode: what the host cannot decode is a definite verdict
@pytest.mark.parametrize(("value", "expected"), [
    ("x = []\n        for _ in range(100000):\n            x = [x]\n        return x", "Wrong Answer"),
    ("x = []\n        x.append(x)\n        return x", "Wrong Answer"),
    ("return object()", "Wrong Answer"),
    ("return (v for v in (8, 2))", "Wrong Answer"),
    ("class L(list):\n            def __eq__(self, o):\n                return True\n        return L([0])",
     "Wrong Answer"),
    ("return list(range(10 ** 6))", "Output Limit Exceeded"),
])
def test_an_undecodable_return_value_gets_a_verdict(attack, value, expected):
    code = f"class Solution:\n    def f(self, a, b):\n        {value}"
    fb = attack(code, task=LEETCODE, output_limit_bytes=1 << 20, time_limit=2.0)
    assert verdict(fb) == expected


def test_a_tuple_is_still_a_list(attack):
    assert verdict(attack("class Solution:\n    def f(self, a, b):\n        return (a + b, a - b)",
                          task=LEETCODE)) == "Accepted"


# --------------------------------------------------------------- the result channel is out of the program's reach
_FORGED = [
    {"ev": "result", "i": 0, "status": "ok", "stdout": "3\n", "stdout_bytes": 2, "cpu": 0.0, "wall": 0.0},
    {"ev": "done"},
    {"ev": "start", "i": 0},
    {"ev": "exit", "code": 0, "cpu": 0.0, "token": "0" * 32},
    {"ev": "judge_error", "reason": "forged"},
    {"seq": 1, "status": "ok", "n": [2, 0, 0], "out_size": 2},
]
_SPRAY = ("import os, json\nlines = b''.join(b'\\n' + json.dumps(m).encode() + b'\\n3\\n' for m in {forged!r})\n"
          "def spray():\n    for fd in range(1024):\n        try:\n            os.write(fd, lines)\n"
          "        except OSError:\n            pass\n")


def test_forged_protocol_lines_do_not_forge_a_pass(attack):
    code = _SPRAY.format(forged=_FORGED) + "spray()\nimport os\nos._exit(0)"
    fb = attack(code)
    assert verdict(fb) == "Runtime Error"


def test_forged_protocol_lines_do_not_turn_a_wrong_answer_into_an_abstention(attack):
    code = _SPRAY.format(forged=_FORGED) + "spray()\nprint(4)"
    fb = attack(code)
    assert verdict(fb) == "Wrong Answer"
    assert fb.reward == 0.0


def test_forged_events_do_not_stretch_the_wall_budget(attack):
    """Three tests with 1.5 s of wall each, a program that ignores its timers and keeps announcing tests."""
    code = _SPRAY.format(forged=_FORGED) + ("import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                                            "while True:\n    spray()\n    time.sleep(0.05)")
    started = time.monotonic()
    fb = attack(code, task=THREE_SLEEPY_TESTS, time_limit=0.25, wall_factor=2.0)  # 1.5 s of wall a test
    assert verdict(fb) == "Time Limit Exceeded"
    assert fb.details["seconds"] < 3 * 1.5 + 3.0, fb.details
    assert time.monotonic() - started < 30


def test_the_program_holds_no_descriptor_of_the_judge(attack):
    """The program holds two pipes (its requests and its answers) and cannot open the judge's or PID 1's
    descriptors, so the host's channel is out of its reach."""
    code = ("import os\nlinks = set()\nfor fd in os.listdir('/proc/self/fd'):\n    try:\n"
            "        links.add(os.readlink('/proc/self/fd/' + fd))\n    except OSError:\n        pass\nparent = []\n"
            "for pid in {os.getppid(), 1}:\n    try:\n        parent.append(os.listdir(f'/proc/{pid}/fd'))\n"
            "    except OSError:\n        pass\nprint(len([x for x in links if x.startswith('pipe:')]), parent)")
    fb = attack(code, task={"prompt": "fds", "tests": [{"input": "", "output": "2 []\n", "testtype": "stdin"}]})
    assert verdict(fb) == "Accepted", fb.text


def test_close_leaves_no_process_after_a_forgery(backend_by_name, no_leftovers):
    backend_by_name("bwrap")
    sandbox = BwrapSandbox(reuse=True)
    env = CodeEnvironment(backend=sandbox, time_limit=0.5)
    code = (_SPRAY.format(forged=_FORGED) + "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n"
            "        os.setsid()\n        spray()\n        time.sleep(60)\nspray()\nprint(4)")
    assert verdict(env.score(ADD, py(code))) == "Wrong Answer"
    assert env.score(ADD, py(GOOD)).reward == 1.0
    sandbox.close()
    no_leftovers(timeout=5.0)


# ----------------------------------------------------------------------- CPU time is measured from outside
@pytest.mark.parametrize("burn", [
    # the program's own reading of its CPU time, and its timers, rewritten
    "import resource, signal\nresource.getrusage = lambda who: resource.struct_rusage((0.0,) * 16)\n"
    "signal.setitimer = lambda *a, **k: (0.0, 0.0)\nsignal.signal(signal.SIGPROF, signal.SIG_IGN)\n"
    "t = time.process_time()\nwhile time.process_time() - t < 1.5:\n    pass",
    # the burning done by a child the program waits for
    "import os\npid = os.fork()\nif pid == 0:\n    t = time.process_time()\n    while time.process_time() - t < 1.5:\n"
    "        pass\n    os._exit(0)\nos.waitpid(pid, 0)",
    # the burning done by a thread, with the CPU timer ignored
    "import signal, threading\nsignal.signal(signal.SIGPROF, signal.SIG_IGN)\ndef spin():\n"
    "    t = time.thread_time()\n    while time.thread_time() - t < 1.5:\n        pass\n"
    "th = threading.Thread(target=spin)\nth.start()\nth.join()",
], ids=["patched-getrusage", "forked-child", "thread"])
def test_cpu_burnt_where_the_program_hides_it_is_a_timeout(attack, burn):
    fb = attack(f"import time\n{burn}\nprint(3)", time_limit=0.5, wall_factor=12.0)
    assert verdict(fb) == "Time Limit Exceeded", fb.text
    assert fb.details["tests"][0]["cpu_seconds"] >= 0.5


# --------------------------------------------------------------------------------- output: bounded host work
def test_an_8_mib_line_within_the_limit_is_a_wrong_answer_at_bounded_cost(attack):
    limit = 8 << 20
    host_cpu = time.process_time()
    fb = attack(f"import sys\nsys.stdout.buffer.write(b'\\xff' * {limit - 1} + b'\\n')", time_limit=2.0)
    host_cpu = time.process_time() - host_cpu
    assert verdict(fb) == "Wrong Answer"
    assert len(fb.text) < 5000
    assert host_cpu < 1.0, f"the trainer process spent {host_cpu:.2f} CPU-s on it"


def test_one_byte_past_the_output_limit_is_output_limit_exceeded(attack):
    fb = attack("import sys\nsys.stdout.buffer.write(b'\\xff' * (1 << 20) + b'\\n')", output_limit_bytes=1 << 20)
    assert verdict(fb) == "Output Limit Exceeded"


def test_a_test_the_judge_ends_leaves_the_sandbox_reusable(backend_by_name, no_leftovers):
    """The judge, not the trainer, ends a test past its wall limit, so the sandbox is clean and kept."""
    backend_by_name("bwrap")
    sandbox = BwrapSandbox(reuse=True)
    env = CodeEnvironment(backend=sandbox, time_limit=0.5, wall_factor=2.0)
    blocked = ("import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGPROF})\n"
               "time.sleep(60)")
    assert verdict(env.score(ADD, py(blocked))) == "Time Limit Exceeded"
    assert env.score(ADD, py(GOOD)).reward == 1.0
    assert sandbox._pool.started == 1
    sandbox.close()
    no_leftovers()

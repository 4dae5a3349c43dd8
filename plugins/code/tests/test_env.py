"""The ``code`` environment through the public API (``sdpo_envs.make``), on every local backend."""

from __future__ import annotations

import json
import os

import pytest
from sdpo_code import CodeEnvironment

import sdpo_envs
from sdpo_envs.testing import check_environment

ADD = {"prompt": "add", "task_id": "add", "tests": [
    {"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
    {"input": "5 7\n", "output": "12\n", "testtype": "stdin", "hidden": True},
]}
LCB_FUNCTIONAL = {
    "question_content": "Return the sum of nums.",
    "starter_code": "class Solution:\n    def total(self, nums: List[int]) -> int:\n        ",
    "public_test_cases": json.dumps([{"input": "[1, 2, 3]", "output": "6", "testtype": "functional"}]),
    "private_test_cases": json.dumps([{"input": "[]", "output": "0", "testtype": "functional"},
                                      {"input": "[-1, 1]", "output": "0", "testtype": "functional"}]),
    "metadata": json.dumps({"func_name": "total"}),
}


def py(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


@pytest.fixture
def make_env(code_plugin, sandbox):
    def make(**kwargs):
        return sdpo_envs.make("code", backend=sandbox, **kwargs)
    return make


def test_make_builds_the_code_environment(make_env):
    env = make_env()
    assert isinstance(env, CodeEnvironment)
    assert env.name == "code"
    check_environment(env, [ADD], [py("a, b = map(int, input().split())\nprint(a + b)")])


def test_accepted_stdin_and_functional(make_env):
    env = make_env()
    stdin_fb, func_fb = env.evaluate(
        [ADD, LCB_FUNCTIONAL],
        [py("import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)"),
         py("class Solution:\n    def total(self, nums: List[int]) -> int:\n        return sum(nums)")])
    for fb in (stdin_fb, func_fb):
        assert (fb.reward, fb.text, fb.success, fb.details["verdict"]) == (1.0, "", True, "Accepted")


THIRD_PARTY = py("import yaml\na, b = map(int, input().split())\nprint(yaml.safe_load(str(a + b)))")


def test_what_site_provides_still_works_without_it(make_env, sandbox):
    """The harness runs with -S: `exit()`/`quit()` and third-party packages must behave as with `site`, where
    the backend shows installed packages (bwrap shows them only when asked, see the next test)."""
    env = make_env()
    ok_exit, bad_quit, third_party = env.evaluate(
        [ADD] * 3,
        [py("a, b = map(int, input().split())\nprint(a + b)\nexit()"),
         py("a, b = map(int, input().split())\nprint(a + b)\nquit(3)"),
         THIRD_PARTY])
    assert ok_exit.details["verdict"] == "Accepted"
    assert bad_quit.details["verdict"] == "Runtime Error"
    assert "exit code 3" in bad_quit.text
    if sandbox.name in ("bwrap", "docker"):  # bwrap hides the packages; the docker image has none
        assert third_party.details["verdict"] == "Runtime Error"
        assert "ModuleNotFoundError: No module named 'yaml'" in third_party.text
    else:
        assert third_party.details["verdict"] == "Accepted", third_party.text


@pytest.mark.parametrize("reuse", [True, False])
def test_bwrap_shows_the_package_directories_it_is_given(backend_by_name, reuse):
    from sdpo_code.sandbox.bwrap import BwrapSandbox

    site_paths = backend_by_name("bwrap").interpreter.site_paths
    where = next((p for p in site_paths if os.path.isdir(os.path.join(p, "yaml"))), None)
    if where is None:
        pytest.skip(f"no yaml in the sandbox interpreter's site-packages {site_paths}")
    sandbox = BwrapSandbox(packages=[where], reuse=reuse)
    try:
        fb = CodeEnvironment(backend=sandbox).score(ADD, THIRD_PARTY)
        assert fb.details["verdict"] == "Accepted", fb.text
    finally:
        sandbox.close()
    import sdpo_code

    grader = os.path.dirname(os.path.dirname(sdpo_code.__file__))
    with pytest.raises(ValueError, match="holds sdpo_code, the grader"):
        BwrapSandbox(packages=[grader])


def test_prelude_names_without_imports_and_a_fresh_module_per_test(make_env):
    """What LCB's grader star-imports resolves with no import, in its order (`pow` keeps its modulus); bare
    `stdin` and `stdout` are this test's (LCB's grader loses output written to a bare `stdout`); a test's
    rebinding of a name does not reach the next test; `__builtins__` is still a module."""
    env = make_env()
    (fb,) = env.evaluate([ADD], [py(
        "a, b = map(int, stdin.readline().split())\n"
        "q = deque([a]); heappush(h := [], b); xs: List[int] = deepcopy([q[0], h[0]])\n"
        "assert gcd(12, 18) == 6 and pow(2, 10, 7) == 2 and ascii_lowercase[0] == 'a' and mean([1, 3]) == 2\n"
        "assert isinstance(inf, float) and datetime.date(2026, 1, 1).year == 2026 and sys.maxsize > 0\n"
        "assert 'deque' not in dir() or deque is collections.deque\n"
        "deque = None\n"
        "__builtins__.print(sum(xs), end='')\n"
        "stdout.write('\\n')")])
    assert fb.details["verdict"] == "Accepted", fb.text


def test_wrong_answer_shows_the_visible_case_only(make_env):
    fb = make_env().score(ADD, py("a, b = map(int, input().split())\nprint(a * b)"))
    assert fb.reward == 0.0
    assert not fb.success
    assert fb.text == "Test Case 1: Wrong Answer\n\nInput\n1 2\n\nOutput\n2\n\nExpected\n3"
    assert [t["verdict"] for t in fb.details["tests"]] == ["Wrong Answer", "Wrong Answer"]


def test_runtime_error_line_numbers_are_the_submitted_codes(make_env):
    code = "def solve(a):\n    return a // 0\n\nprint(solve(int(input().split()[0])))"
    fb = make_env().score(ADD, py(code))
    assert fb.text.startswith(
        "Runtime Error\nZeroDivisionError: integer division or modulo by zero\n"
        "  print(solve(int(input().split()[0])))\nLine 4 in <module> (Solution.py)\n"
        "  return a // 0\nLine 2 in solve (Solution.py)\n\nLast Executed Input\n1 2")
    assert "harness" not in fb.text
    assert "<string>" not in fb.text


def test_functional_runtime_error_and_wrong_method(make_env):
    env = make_env()
    fb = env.score(LCB_FUNCTIONAL, py("class Solution:\n    def total(self, nums):\n        return nums[0]"))
    assert fb.details["verdict"] == "Runtime Error"
    assert "IndexError: list index out of range\n  return nums[0]\nLine 3 in total (Solution.py)" in fb.text
    fb = env.score(LCB_FUNCTIONAL, py("class Solution:\n    def add(self, nums):\n        return 0"))
    assert "AttributeError: no method 'total' in class Solution" in fb.text


def test_functional_tuple_is_a_list(make_env):
    test = {"input": "1", "output": "[1, 2]", "testtype": "functional"}
    task = {"prompt": "p", "func_name": "pair", "tests": [test]}
    fb = make_env().score(task, py("def pair(x):\n    return (x, x + 1)"))
    assert fb.reward == 1.0


def test_syntax_error_is_its_own_verdict(make_env):
    fb = make_env().score(ADD, py("x = 1\nprint(x +)\n"))
    assert fb.details["verdict"] == "Syntax Error"
    assert fb.text == "Syntax Error\nSyntaxError: invalid syntax\n  print(x +)\nLine 2 (Solution.py)"


def test_no_code_and_truncated(make_env):
    env = make_env()
    assert env.score(ADD, "I think the answer is 3.").details["verdict"] == "No Code Found"
    fb = env.score({**ADD, "truncated": True}, "```python\nprint(")
    assert fb.details["verdict"] == "Truncated"
    assert fb.text.startswith("Truncated Attempt:")


def test_bad_test_data_abstains_without_text(make_env):
    bad = {"prompt": "p", "tests": [{"input": "1", "testtype": "stdin"}]}
    fb = make_env().score(bad, py("print(1)"))
    assert fb.reward is None
    assert fb.text == ""
    assert fb.failed
    assert fb.details["verdict"] == "Harness Error"
    assert "tests[0].output" in fb.details["error"]


def test_fraction_reward(make_env):
    fb = make_env(reward="fraction").score(ADD, py("a, b = map(int, input().split())\nprint(3)"))
    assert fb.reward == 0.5
    assert not fb.success


def test_expected_output_switch_and_hidden_switch(make_env):
    code = py("print(0)")
    assert "Expected" not in make_env(show_expected_output=False).score(ADD, code).text
    shown = make_env(show_hidden_tests=True).score({**ADD, "tests": ADD["tests"][1:]}, code).text
    assert "5 7" in shown
    assert "12" in shown


def test_humaneval_row(make_env):
    row = {"task_id": "HumanEval/x", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"}
    env = make_env(show_hidden_tests=True)
    assert env.score(row, py("def add(a, b):\n    return a + b")).reward == 1.0
    assert env.score(row, "    return a + b\n") .reward == 0.0  # unfenced continuation: off by default
    assert make_env(allow_unfenced=True).score(row, "    return a + b\n").reward == 1.0
    fb = env.score(row, py("def add(a, b):\n    return 3"))
    assert fb.details["verdict"] == "Wrong Answer"
    assert "assert candidate(2, 2) == 4" in fb.text  # the failing assertion, not a bare "failed: "


def test_prompt_from_lcb_row(code_plugin, sandbox):
    env = sdpo_envs.make("code", backend=sandbox)
    prompt = env.reset(LCB_FUNCTIONAL)
    assert "Return the sum of nums." in prompt
    assert "def total" in prompt
    assert "```python" in prompt


def test_dataset_is_the_bundled_problems_in_chat_format(make_env):
    env = make_env()
    rows = env.dataset(as_dataset=False)
    assert len(rows) >= 8
    assert rows[0]["prompt"][0]["role"] == "user"
    assert "```python" in rows[0]["prompt"][0]["content"]
    dataset = env.dataset()
    assert dataset.num_rows == len(rows)
    (result,) = env.evaluate([dataset[0]], ["no code here"])
    assert result.details["verdict"] == "No Code Found"
    assert isinstance(env.dataset(chat=False, as_dataset=False)[0]["prompt"], str)
    assert env.reset(rows[0]) == rows[0]["prompt"]  # chat prompts pass through, e.g. for `sdpo eval`

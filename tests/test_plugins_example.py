"""The tutorial's example plugin (docs/plugins/sdpo-example) works, and the tutorial shows its real code."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from sdpo_envs import make
from sdpo_envs.testing import check_environment, registered_plugin

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "plugins" / "sdpo-example"
TUTORIAL = EXAMPLE.parent / "tutorial.md"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sdpo_example_under_test", EXAMPLE / "sdpo_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_environment(example):
    env = example.ReverseEnvironment()
    check_environment(env, tasks=[{"word": "hello"}, {"word": "sdpo"}], completions=["olleh", "opds"])
    prompt = env.reset({"word": "hello"})
    assert prompt == "Reverse the letters of the word 'hello'. Answer with the reversed word only."
    assert env.step("The answer is Olleh.").reward == 1.0
    assert env.step("olleg").feedback.text == "Letter 5 of your answer 'olleg' is wrong."
    assert env.step("oleh").feedback.text == "Your answer 'oleh' has 4 letters; the word has 5."
    assert env.step("  ").feedback.text == "The answer is empty: reply with the reversed word."


def test_example_registers_reverse(example):
    with registered_plugin(example, name="example"):
        env = make("reverse", case_sensitive=True)
        assert env.evaluate([{"word": "hello"}], ["Olleh"])[0].reward == 0.0


def test_tutorial_shows_the_checked_in_code():
    tutorial = TUTORIAL.read_text()
    source = (EXAMPLE / "sdpo_example.py").read_text()
    python_blocks = re.findall(r"```python\n(.*?)```", tutorial, re.DOTALL)
    assert python_blocks[0].strip() in source  # the environment
    assert python_blocks[1].strip() in source  # the hook
    pyproject = (EXAMPLE / "pyproject.toml").read_text()
    toml_block = re.findall(r"```toml\n(.*?)```", tutorial, re.DOTALL)[0]
    for line in filter(None, toml_block.splitlines()):
        assert line in pyproject, line
    tests = (EXAMPLE / "tests" / "test_sdpo_example.py").read_text()
    test_block = next(block for block in python_blocks if "def test_" in block)
    for function in re.findall(r"^def (test_\w+)", test_block, re.MULTILINE):
        assert f"def {function}(" in tests

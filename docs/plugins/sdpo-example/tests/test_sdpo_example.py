"""Tests a plugin author would write: the environment keeps the contract, and the plugin registers it."""

import pytest
from sdpo_envs import make
from sdpo_envs.testing import check_environment, registered_plugin

import sdpo_example


@pytest.fixture
def example_plugin():
    with registered_plugin(sdpo_example, name="example-under-test"):
        yield


def test_contract():
    env = sdpo_example.ReverseEnvironment()
    check_environment(env, tasks=[{"word": "hello"}, {"word": "sdpo"}], completions=["olleh", "opds"])


def test_feedback_points_at_the_first_wrong_letter():
    env = sdpo_example.ReverseEnvironment()
    env.reset({"word": "hello"})
    result = env.step("olleg")
    assert result.reward == 0.0
    assert result.feedback.text == "Letter 5 of your answer 'olleg' is wrong."


def test_registered(example_plugin):
    env = make("reverse", case_sensitive=True)
    assert env(prompts=["Reverse 'hello'."], completions=["Olleh"], word=["hello"]) == [0.0]
    assert env.last_feedback == ["Letter 1 of your answer 'Olleh' is wrong."]


def test_multi_turn_episode():
    env = sdpo_example.ReverseEnvironment()
    env.configure_episodes(max_turns=3)
    env.reset({"word": "hello"})
    first = env.step("olleg")
    assert (first.done, first.reward) == (False, 0.0)
    assert first.observation == "Letter 5 of your answer 'olleg' is wrong. Try again: answer with the reversed word only."
    second = env.step("olleh")
    assert (second.done, second.reward) == (True, 1.0)

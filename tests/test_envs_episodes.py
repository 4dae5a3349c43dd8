"""Episodes: `reset`, then `step` until done, with the environment's feedback read between attempts."""

from __future__ import annotations

import ast
import math
import re
import threading
import time
from pathlib import Path

import pytest

import sdpo_envs
from sdpo_envs import Episode, InvalidResultError, Turn, episode_reward, make
from sdpo_envs.episode import step_episodes
from sdpo_envs.testing import FakeEnvironment, registered_plugin

ROOT = Path(__file__).resolve().parents[1]


class Retry(FakeEnvironment):
    """The fake environment, multi-turn: the observation repeats the feedback and counts the attempts."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[tuple[Turn, ...]] = []

    def respond(self, task, history):
        self.seen.append(tuple(history))
        return f"attempt {len(history)}: {history[-1].feedback.text} Try again."


def retry(max_turns=3, **kwargs) -> Retry:
    env = Retry(**kwargs)
    env.configure_episodes(max_turns=max_turns)
    return env


# ------------------------------------------------------------------------------------- single turn
def test_single_turn_is_one_evaluate_call_as_before():
    env = FakeEnvironment()
    assert env.max_turns == 1
    assert not env.multi_turn
    assert env.reset({"prompt": "p", "answer": "42"}) == "p"
    result = env.step("it is 41")
    assert (result.done, result.reward, result.observation) == (True, 0.0, None)
    assert result.feedback == env.evaluate([{"prompt": "p", "answer": "42"}], ["it is 41"])[0]
    assert (result.info["turn"], result.info["max_turns"]) == (1, 1)
    # with one turn, each step is a fresh attempt at the task of the last reset (the behaviour before episodes)
    assert env.step("42").reward == 1.0


# -------------------------------------------------------------------------------------- multi-turn
def test_step_episodes_steps_each_in_order_and_a_broken_one_gives_its_reason():
    env = retry(max_turns=2)
    task = {"prompt": "p", "answer": "42"}
    ended = Episode(env, task)
    ended.step("42")  # solved: a further step breaks the episode's contract
    fresh = [Episode(env, task) for _ in range(3)]
    outcomes = step_episodes([fresh[0], ended, fresh[1], fresh[2]], ["42", "42", "41", "42"])
    assert [o.reward for o in (outcomes[0], outcomes[2], outcomes[3])] == [1.0, 0.0, 1.0]
    assert outcomes[1] == f"{env.label}: step raised RuntimeError: {env.label}: step() after the episode ended " \
        "(turn 1 of max_turns=2); call reset() to start another"
    assert step_episodes([], []) == []
    with pytest.raises(ValueError, match="2 episodes but 1 completions"):
        step_episodes(fresh[:2], ["42"])


class Batches(Retry):
    """Records the size of every batch its engine was given, and the pool size it was told to use."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches: list[tuple[int, int | None]] = []

    def score_batch(self, tasks, completions, *, extra, max_workers, timeout):
        self.batches.append((len(tasks), max_workers or self.max_workers))
        return super().score_batch(tasks, completions, extra=extra, max_workers=max_workers, timeout=timeout)


class BadBatch(FakeEnvironment):
    def score_batch(self, tasks, completions, *, extra, max_workers, timeout):
        raise InvalidResultError("BadBatch.score_batch() returned 1 results for 2 episodes")


def test_step_episodes_scores_the_episodes_of_one_environment_in_one_batch_on_its_engine():
    env = Batches(max_workers=3)
    env.configure_episodes(max_turns=2)
    task = {"prompt": "p", "answer": "42"}
    episodes = [Episode(env, task) for _ in range(4)]
    step_episodes(episodes, ["41", "42", "40", "42"])
    step_episodes([e for e in episodes if not e.done], ["42", "42"])
    assert env.batches == [(4, 3), (2, 3)]


def test_a_broken_environment_fails_only_its_own_episodes():
    good, bad = retry(max_turns=2), BadBatch()
    task = {"prompt": "p", "answer": "42"}
    outcomes = step_episodes([Episode(good, task), Episode(bad, task), Episode(good, task), Episode(bad, task)],
                             ["42", "42", "41", "42"])
    assert outcomes[0].reward == 1.0
    assert outcomes[2].observation.startswith("attempt 1:")
    assert outcomes[1] == outcomes[3] == \
        "BadBatch: step raised InvalidResultError: BadBatch.score_batch() returned 1 results for 2 episodes"


def test_step_episodes_plays_a_turn_exactly_as_step_does():
    env = retry(max_turns=3)
    env.turn_discount = 0.5
    task = {"prompt": "p", "answer": "42"}
    attempts = ["40", "41", "42"]
    together, alone = [Episode(env, task) for _ in range(2)], Episode(env, task)
    for turn, attempt in enumerate(attempts):
        (batched, _) = step_episodes(together, [attempt, attempt])
        single = alone.step(attempt)
        assert (batched.feedback, batched.done, batched.observation) == \
            (single.feedback, single.done, single.observation), f"turn {turn + 1}"
        assert {k: v for k, v in batched.info.items() if k != "seconds"} == \
            {k: v for k, v in single.info.items() if k != "seconds"}
    assert together[0].reward == alone.reward == 0.25


def test_a_failing_attempt_gets_feedback_and_another_turn():
    env = retry(max_turns=3)
    task = {"prompt": "p", "answer": "42"}
    assert env.reset(task) == "p"
    first = env.step("41")
    assert first.done is False
    assert first.reward == 0.0
    assert first.observation == "attempt 1: The completion does not contain the answer (2 characters). Try again."
    second = env.step([{"role": "assistant", "content": "40"}])  # conversational completions too
    assert second.done is False
    assert second.info["turn"] == 2
    third = env.step("42")
    assert (third.done, third.reward, third.feedback.success, third.observation) == (True, 1.0, True, None)
    assert [len(h) for h in env.seen] == [1, 2]
    assert [t.completion for t in env.seen[1]] == ["41", "40"]
    with pytest.raises(RuntimeError, match=r"Retry: step\(\) after the episode ended \(turn 3 of max_turns=3\)"):
        env.step("42")


def test_a_pass_ends_the_episode_early():
    env = retry(max_turns=3)
    env.reset({"answer": "7", "prompt": "p"})
    result = env.step("7")
    assert (result.done, result.reward, result.info["turn"]) == (True, 1.0, 1)
    assert env.seen == []


def test_the_episode_stops_at_max_turns_and_respond_is_not_asked_for_more():
    env = retry(max_turns=3)
    env.reset({"answer": "7", "prompt": "p"})
    results = [env.step("no") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert results[-1].observation is None
    assert len(env.seen) == 2


@pytest.mark.parametrize(("discount", "turn", "expected"), [(1.0, 3, 1.0), (0.5, 3, 0.25), (0.9, 1, 1.0)])
def test_turn_discount(discount, turn, expected):
    env = retry(max_turns=3)
    env.configure_episodes(turn_discount=discount)
    env.reset({"answer": "7", "prompt": "p"})
    for _ in range(turn - 1):
        env.step("no")
    result = env.step("7")
    assert result.reward == pytest.approx(expected)
    assert result.reward == pytest.approx(episode_reward(1.0, turn, discount))


def test_episode_reward_against_the_formula():
    for reward in (0.0, 0.3, 1.0):
        for turn in range(1, 6):
            for discount in (0.25, 0.5, 1.0):
                assert episode_reward(reward, turn, discount) == pytest.approx(reward * discount ** (turn - 1))
    assert episode_reward(None, 2, 0.5) is None


def test_respond_returning_none_ends_the_episode_without_failing_it():
    class Quits(FakeEnvironment):
        def respond(self, task, history):
            return None

    env = Quits()
    env.configure_episodes(max_turns=3)
    env.reset({"answer": "7", "prompt": "p"})
    result = env.step("no")
    assert (result.done, result.reward, result.feedback.failed, env.error_count) == (True, 0.0, False, 0)


def test_episodes_share_an_environment_but_not_state():
    env = retry(max_turns=2)
    one, two = Episode(env, {"answer": "a", "prompt": "p"}), Episode(env, {"answer": "b", "prompt": "q"})
    assert one.step("x").done is False
    assert two.step("b").reward == 1.0
    assert one.step("a").reward == 1.0
    assert one.done
    assert two.done
    assert (one.reward, len(one.history), len(two.history)) == (1.0, 2, 1)


# -------------------------------------------------------------------------------------- bad input
class Broken(FakeEnvironment):
    def __init__(self, respond, **kwargs):
        super().__init__(**kwargs)
        self._respond = respond

    def respond(self, task, history):
        return self._respond()


def _boom():
    raise KeyError("no such hint")


@pytest.mark.parametrize(("behaviour", "reason"), [
    (_boom, "Broken.respond() raised KeyError: 'no such hint'"),
    (lambda: 42, "Broken.respond() returned int; expected a non-empty str, or None to end the episode"),
    (lambda: ["user", "assistant"], "Broken.respond() returned list; expected a non-empty str"),
    (lambda: "  ", "Broken.respond() returned an empty str"),
])
def test_a_broken_respond_is_a_recorded_failed_episode(behaviour, reason):
    env = Broken(behaviour, error_reward=-1.0)
    env.configure_episodes(max_turns=3)
    env.respond_timeout = 0.2
    env.reset({"answer": "7", "prompt": "p"})
    started = time.monotonic()
    result = env.step("wrong")
    assert time.monotonic() - started < 5
    assert result.done is True
    assert result.reward == -1.0
    assert result.feedback.failed
    assert result.feedback.success is False
    assert reason in result.feedback.details["error"]
    assert result.feedback.text == "The completion does not contain the answer (1 characters)."  # kept for the teacher
    assert env.error_count == 1


def test_a_failed_score_ends_the_episode_without_asking_respond():
    env = retry(max_turns=3, error_reward=None)
    env.reset({"answer": "7", "prompt": "p"})
    result = env.step("FAIL")
    assert (result.done, result.reward, result.feedback.details["error"]) == (True, None, "RuntimeError: fake failure")
    assert env.seen == []


@pytest.mark.parametrize(("options", "message"), [
    ({"max_turns": 0}, "environment 'Retry': max_turns must be at least 1, got 0"),
    ({"max_turns": -2}, "max_turns must be at least 1, got -2"),
    ({"max_turns": 2.5}, "max_turns must be an int >= 1, got 2.5"),
    ({"max_turns": True}, "max_turns must be an int >= 1, got True"),
    ({"turn_discount": 0.0}, "environment 'Retry': turn_discount must be in (0, 1], got 0.0"),
    ({"turn_discount": 1.5}, "turn_discount must be in (0, 1], got 1.5"),
    ({"turn_discount": math.nan}, "turn_discount must be in (0, 1], got nan"),
])
def test_bad_episode_options_name_the_environment_and_the_parameter(options, message):
    env = Retry()
    with pytest.raises(ValueError, match=re.escape(message)):
        env.configure_episodes(**options)
    assert (env.max_turns, env.turn_discount) == (1, 1.0)


def test_multi_turn_needs_respond():
    with pytest.raises(ValueError, match=re.escape(
            "environment 'FakeEnvironment' cannot run multi-turn episodes (max_turns=3): it does not implement "
            "respond(task, history); use max_turns=1")):
        FakeEnvironment().configure_episodes(max_turns=3)
    env = FakeEnvironment()
    env.max_turns = 2  # set around configure_episodes: the episode still refuses to start
    with pytest.raises(ValueError, match="cannot run multi-turn episodes"):
        env.reset({"prompt": "p"})


class _Plugin:
    @staticmethod
    @sdpo_envs.hookimpl
    def register_environments(register):
        register("retry", Retry)
        register("single", FakeEnvironment)
        register("own_turns", OwnTurns)


class OwnTurns(Retry):
    """A factory that takes max_turns itself gets it."""

    def __init__(self, max_turns: int = 1):
        super().__init__()
        self.asked = max_turns
        self.configure_episodes(max_turns=max_turns)


def test_make_configures_episodes_for_any_environment():
    with registered_plugin(_Plugin(), name="episodes-test"):
        env = make("retry", max_turns=3, turn_discount=0.5, answer_column="solution")
        assert (env.max_turns, env.turn_discount, env.answer_column) == (3, 0.5, "solution")
        assert sdpo_envs.resolve_environment('retry:{"max_turns": 2}').max_turns == 2
        assert make("retry").max_turns == 1
        assert make("own_turns", max_turns=4).asked == 4
        with pytest.raises(ValueError, match=re.escape("environment 'single' cannot run multi-turn episodes "
                                                       "(max_turns=2)")):
            make("single", max_turns=2)
        with pytest.raises(ValueError, match="environment 'retry': max_turns must be at least 1, got 0"):
            make("retry", max_turns=0)


# ------------------------------------------------------------------------------ shipped environments
def test_math_episode_says_the_answer_is_wrong_without_the_label():
    from sdpo_math import MathEnvironment

    env = MathEnvironment(checker="inline")
    env.configure_episodes(max_turns=3)
    task = {"question": "What is 6 times 7?", "answer": "42"}
    env.reset(task)
    first = env.step("The answer is \\boxed{41}.")
    assert first.done is False
    assert first.reward == 0.0
    assert first.observation == "Your final answer `41` is not correct. Try again."
    assert "42" not in first.observation
    second = env.step("Sorry: \\boxed{42}")
    assert (second.done, second.reward, second.info["turn"]) == (True, 1.0, 2)

    revealing = MathEnvironment(checker="inline", reveal_answer=True)
    revealing.configure_episodes(max_turns=2)
    revealing.reset(task)
    assert "The correct answer is 42." in revealing.step("\\boxed{41}").observation


def test_code_episode_shows_the_failing_test_and_the_traceback():
    from sdpo_code import CodeEnvironment

    env = CodeEnvironment(backend="process", max_workers=1)
    env.configure_episodes(max_turns=3)
    task = {"prompt": "add", "task_id": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]}
    try:
        env.reset(task)
        wrong = env.step("```python\na, b = map(int, input().split())\nprint(a - b)\n```")
        assert wrong.done is False
        assert wrong.observation.startswith("Test Case 1: Wrong Answer")
        assert "Input\n1 2" in wrong.observation
        assert "Output\n-1" in wrong.observation
        assert "Expected\n3" in wrong.observation
        assert wrong.observation.endswith("reply with the whole corrected program in a ```python block.")
        crash = env.step("```python\na, b = input().split()\nprint(a + 1)\n```")
        assert crash.done is False
        assert "Runtime Error" in crash.observation
        assert "TypeError" in crash.observation
        assert "  print(a + 1)\nLine 2 in <module> (Solution.py)" in crash.observation  # the traceback
        assert "Last Executed Input\n1 2" in crash.observation
        right = env.step("```python\na, b = map(int, input().split())\nprint(a + b)\n```")
        assert (right.done, right.reward, right.info["turn"]) == (True, 1.0, 3)
    finally:
        env.close()


# ----------------------------------------------------------------------------------- the API's shape
def test_dataset_is_a_declared_optional_method():
    assert sdpo_envs.Environment.dataset is None
    assert FakeEnvironment().dataset is None
    from sdpo_math import MathEnvironment

    assert len(MathEnvironment(size=3).dataset(as_dataset=False)) == 3


def test_the_concurrency_engine_does_not_import_the_environment_modules():
    tree = ast.parse((ROOT / "sdpo_envs" / "executors.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {m for m in imported if m and m.startswith("sdpo_envs")} == {"sdpo_envs.types"}


def test_the_tutorials_multi_turn_method_is_the_example_plugins():
    tutorial = (ROOT / "docs" / "plugins" / "tutorial.md").read_text()
    source = (ROOT / "docs" / "plugins" / "sdpo-example" / "sdpo_example.py").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", tutorial, re.DOTALL) if "def respond(" in b)
    assert block.strip() in source


# ------------------------------------------------------------------------------------ feedback channel
class SeedStyle:
    def __init__(self, texts=None):
        self.last_feedback = texts


def test_reset_and_read_feedback():
    func = SeedStyle(["old"])
    previous = sdpo_envs.reset_feedback(func, "f")
    assert previous == ["old"]
    assert func.last_feedback is None
    assert sdpo_envs.read_feedback(func, "f", 2, previous) is None
    func.last_feedback = ["a", None, math.nan]
    assert sdpo_envs.read_feedback(func, "f", 3, previous) == ["a", "", ""]
    assert sdpo_envs.reset_feedback(object(), "plain") is None


@pytest.mark.parametrize(("texts", "message"), [
    (["a"], "reward function 'f': last_feedback must be a list with one text per row; got 1 entries for 2 rows"),
    ("ab", "last_feedback must be a list with one text per row; got 2 entries"),
    (5, "last_feedback must be a list with one text per row; got int for 2 rows"),
    (["a", 3], "reward function 'f': last_feedback[1] is int, expected str or None"),
])
def test_read_feedback_rejects_malformed_lists(texts, message):
    with pytest.raises(InvalidResultError, match=re.escape(message)):
        sdpo_envs.read_feedback(SeedStyle(texts), "f", 2)


def test_read_feedback_rejects_a_list_left_from_the_previous_call():
    stale = ["old", "old"]
    with pytest.raises(InvalidResultError, match="'f': last_feedback must be a fresh list per call"):
        sdpo_envs.read_feedback(SeedStyle(stale), "f", 2, previous=stale)


def test_reset_feedback_needs_a_settable_attribute():
    class ReadOnly:
        @property
        def last_feedback(self):
            return None

    with pytest.raises(InvalidResultError, match="'ro': last_feedback must be settable"):
        sdpo_envs.reset_feedback(ReadOnly(), "ro")


def test_environments_write_their_feedback_through_the_channel():
    env = FakeEnvironment()
    rewards = env(prompts=["p", "q"], completions=["42", "1"], answer=["42", "7"])
    assert rewards == [1.0, 0.0]
    assert env.last_feedback == [r.text for r in env.last_results]
    sdpo_envs.write_feedback(env, None)
    assert env.last_feedback is None
    assert env.last_results is None


def test_a_hanging_respond_fails_the_episode_after_respond_timeout():
    gate = threading.Event()
    env = Broken(gate.wait)
    env.configure_episodes(max_turns=2)
    env.respond_timeout = 0.2
    env.reset({"answer": "7", "prompt": "p"})
    started = time.monotonic()
    try:
        result = env.step("no")
    finally:
        gate.set()  # release the abandoned thread
    assert time.monotonic() - started < 5
    assert (result.done, result.reward, env.error_count) == (True, 0.0, 1)
    assert result.feedback.details["error"] == "Broken.respond() did not return within 0.2 s"


def test_check_environment_plays_a_multi_turn_step():
    from sdpo_envs.testing import check_environment

    env = retry(max_turns=3)
    check_environment(env, tasks=[{"prompt": "p", "answer": "42"}], completions=["41"])
    broken = Broken(_boom)
    broken.configure_episodes(max_turns=2)
    with pytest.raises(AssertionError, match=r"Broken: the episode failed: Broken.respond\(\) raised KeyError"):
        check_environment(broken, tasks=[{"prompt": "p", "answer": "42"}], completions=["41"])


def test_a_router_is_multi_turn_when_every_environment_is():
    mixed = sdpo_envs.MultiEnvironment({"a": Retry(), "b": FakeEnvironment()})
    assert not mixed.multi_turn
    with pytest.raises(ValueError, match="environment 'MultiEnvironment' cannot run multi-turn episodes"):
        mixed.configure_episodes(max_turns=2)
    router = sdpo_envs.MultiEnvironment({"a": Retry(), "b": Retry(answer_column="solution")})
    router.configure_episodes(max_turns=2)
    router.reset({"env": "b", "prompt": "p", "solution": "xyz"})
    first = router.step("no")
    assert first.observation == "attempt 1: The completion does not contain the answer (3 characters). Try again."
    assert router.environments["b"].seen
    assert not router.environments["a"].seen
    assert router.step("xyz").reward == 1.0

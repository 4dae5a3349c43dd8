"""The `reward` environment: plain scores, the last_feedback protocol, (score, feedback) pairs, async."""

from __future__ import annotations

import asyncio
import functools
import math
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sdpo_reward
import torch
from sdpo_reward import RewardEnvironment

from sdpo_envs import Feedback, InvalidResultError, make
from sdpo_envs.testing import check_environment, registered_plugin


def exact(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def only_completions(completions):
    return [float(len(c)) for c in completions]


class SeedStyle:
    """The seed reference's protocol: scores returned, one feedback text per row in `last_feedback`."""

    def __init__(self):
        self.last_feedback = None
        self.saw_reset = []

    def __call__(self, prompts, completions, **kwargs):
        self.saw_reset.append(self.last_feedback is None)
        self.last_feedback = ["" if c == "ok" else f"bad: {c}" for c in completions]
        return [1.0 if c == "ok" else 0.0 for c in completions]


def pairs(completions, **kwargs):
    out = []
    for c in completions:
        if c == "ok":
            out.append((1.0, None))
        elif c == "feedback":
            out.append(Feedback(reward=0.5, text="object", success=True, details={"k": 1}))
        elif c == "abstain":
            out.append(None)
        else:
            out.append((0.0, f"wrong: {c}"))
    return out


async def async_reward(completions, **kwargs):
    await asyncio.sleep(0)
    return [1.0 if c == "ok" else 0.0 for c in completions]


class AsyncCallable:
    async def __call__(self, completions, **kwargs):
        await asyncio.sleep(0)
        return [0.25 for _ in completions]


@pytest.fixture
def reward_plugin():
    with registered_plugin(sdpo_reward):
        yield


def test_plain_function_through_make(reward_plugin):
    env = make("reward", fn=exact)
    assert isinstance(env, RewardEnvironment)
    assert env.__name__ == "exact"
    assert env(prompts=["p", "q"], completions=["a", "b"], answer=["a", "c"]) == [1.0, 0.0]
    assert env.last_feedback == ["", ""]
    assert [r.success for r in env.last_results] == [True, False]
    check_environment(env)


def test_only_the_keywords_a_function_names_are_passed():
    env = RewardEnvironment(only_completions)
    assert env(prompts=["p"], completions=["abc"], answer=["x"], completion_ids=[[1]], trainer_state=None) == [3.0]


def test_functions_with_var_kwargs_get_columns_and_trainer_keywords():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    RewardEnvironment(spy)(prompts=["p"], completions=["c"], answer=["x"], completion_ids=[[1]], trainer_state="s")
    assert seen == {"answer": ["x"], "completion_ids": [[1]], "trainer_state": "s"}


def test_last_feedback_protocol():
    fn = SeedStyle()
    env = RewardEnvironment(fn)
    assert env.__name__ == "SeedStyle"
    env(prompts=["p", "p"], completions=["ok", "no"])
    env(prompts=["p"], completions=["again"])
    assert fn.saw_reset == [True, True]  # reset to None before every call
    assert env.last_feedback == ["bad: again"]
    assert env.last_results[0].text == "bad: again"


def test_last_feedback_must_be_fresh_and_right_length():
    class Stale:
        def __init__(self):
            self._fb = ["x"]

        @property
        def last_feedback(self):
            return self._fb

        @last_feedback.setter
        def last_feedback(self, value):
            pass  # ignores the reset

        def __call__(self, completions, **kwargs):
            return [0.0] * len(completions)

    with pytest.raises(InvalidResultError, match="'Stale': last_feedback must be a fresh list per call"):
        RewardEnvironment(Stale())(prompts=["p"], completions=["c"])

    class Short(SeedStyle):
        def __call__(self, prompts, completions, **kwargs):
            self.last_feedback = ["only one"]
            return [0.0] * len(completions)

    with pytest.raises(InvalidResultError, match="'Short': last_feedback must be a list with one text per row; "
                                                 "got 1 entries for 2 rows"):
        RewardEnvironment(Short())(prompts=["p", "q"], completions=["a", "b"])

    class NotText(SeedStyle):
        def __call__(self, prompts, completions, **kwargs):
            self.last_feedback = [3]
            return [0.0]

    with pytest.raises(InvalidResultError, match=r"last_feedback\[0\] is int"):
        RewardEnvironment(NotText())(prompts=["p"], completions=["a"])


def test_pairs_feedback_objects_and_none():
    env = RewardEnvironment(pairs, success_threshold=0.9)
    rewards = env(prompts=["p"] * 4, completions=["ok", "no", "feedback", "abstain"])
    assert rewards == [1.0, 0.0, 0.5, None]
    assert env.last_feedback == ["", "wrong: no", "object", ""]
    assert env.last_results[2].details["k"] == 1
    assert [r.success for r in env.last_results] == [True, False, True, False]
    assert env.error_count == 0  # None is the function abstaining, not an error


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, (math.nan, "text"), torch.tensor(math.nan),
                                 torch.tensor(-math.inf, dtype=torch.float64)])
def test_non_finite_rewards_are_errors_naming_the_function_and_row(bad):
    def flaky(completions):
        return [1.0, bad]

    with pytest.raises(InvalidResultError, match=r"reward function 'flaky' returned -?(nan|inf) for row 1; rewards "
                                                 r"must be finite \(None abstains\)"):
        RewardEnvironment(flaky)(prompts=["p", "q"], completions=["a", "b"])


@pytest.mark.parametrize(("fn", "message"), [
    (lambda completions: [1.0], "returned 1 values for 2 rows"),
    (lambda completions: 1.0, "returned float, expected a list with one value per row"),
    (lambda completions: [1.0, "x"], "returned 'x' (str) for row 1; expected a float"),
    (lambda completions: [True, 1.0], "returned True (bool) for row 0"),
    (lambda completions: [1.0, (0.0, 3)], "the feedback of row 1 is int"),
])
def test_wrong_results_name_the_function_and_row(fn, message):
    fn.__name__ = "broken_reward"
    with pytest.raises(InvalidResultError, match=re.escape(f"reward function 'broken_reward' {message}")
                       if not message.startswith("the") else re.escape(message)):
        RewardEnvironment(fn)(prompts=["p", "q"], completions=["a", "b"])


def test_raising_rows_are_isolated_and_counted():
    def picky(completions):
        if "boom" in completions:
            raise ValueError("cannot score boom")
        return [1.0] * len(completions)

    env = RewardEnvironment(picky)
    assert env(prompts=["p"] * 3, completions=["a", "boom", "b"]) == [1.0, 0.0, 1.0]
    assert env.last_results[1].details["error"] == "ValueError: cannot score boom"
    assert env.error_count == 1
    whole = RewardEnvironment(picky, isolate_errors=False, error_reward=None)
    assert whole(prompts=["p"] * 2, completions=["a", "boom"]) == [None, None]
    assert whole.error_count == 2


@pytest.mark.parametrize("fn", [async_reward, AsyncCallable(), functools.partial(async_reward)])
def test_async_callables_in_every_calling_context(fn):
    env = RewardEnvironment(fn)
    expected = env(prompts=["p", "q"], completions=["ok", "no"])
    assert len(expected) == 2

    async def inside_a_loop():
        return env(prompts=["p", "q"], completions=["ok", "no"])

    assert asyncio.run(inside_a_loop()) == expected
    with ThreadPoolExecutor(2) as pool:
        assert pool.submit(env, prompts=["p", "q"], completions=["ok", "no"]).result() == expected
        assert pool.submit(asyncio.run, inside_a_loop()).result() == expected


@pytest.fixture
def helper_module(tmp_path, monkeypatch):
    (tmp_path / "sdpo_reward_test_helpers.py").write_text(
        "NOT_CALLABLE = 3\n\n\ndef length_reward(completions, **kwargs):\n"
        "    return [float(len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "sdpo_reward_test_helpers"


def test_import_strings(helper_module):
    env = RewardEnvironment(f"{helper_module}:length_reward")
    assert env(prompts=["p"], completions=["abcd"]) == [4.0]
    assert RewardEnvironment(f"{helper_module}.length_reward").fn_name == "length_reward"
    with pytest.raises(ValueError, match="could not be imported"):
        RewardEnvironment(f"{helper_module}:nope")
    with pytest.raises(ValueError, match="expected an import string"):
        RewardEnvironment("nodots")
    with pytest.raises(TypeError, match="not a callable"):
        RewardEnvironment(f"{helper_module}:NOT_CALLABLE")


def test_names_and_pickling():
    assert RewardEnvironment(functools.partial(exact), reward_name="mine").__name__ == "mine"
    assert RewardEnvironment(functools.partial(exact)).__name__ == "exact"
    env = pickle.loads(pickle.dumps(RewardEnvironment(only_completions)))
    assert env(prompts=["p"], completions=["ab"]) == [2.0]


def test_uses_only_the_public_api():
    source = Path(sdpo_reward.__file__).read_text()
    imports = re.findall(r"^\s*(?:from|import) (sdpo_envs\S*)", source, re.MULTILINE)
    assert imports == ["sdpo_envs"]

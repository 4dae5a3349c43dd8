"""The `math` environment: every verdict and its feedback, rewards, threads, and registration."""

from __future__ import annotations

import asyncio
import pickle
import threading
from typing import Any

import pytest
import sdpo_math
from sdpo_math import MathChecker, MathEnvironment
from sdpo_math.checker import CheckerPool

import sdpo_envs
from sdpo_envs.testing import check_environment, registered_plugin

SLOW_ANSWER = "(x+1)^{3000}"  # slow in sympy; huge numbers would be judged by size at once


@pytest.fixture
def env(pool: CheckerPool) -> MathEnvironment:
    return MathEnvironment(checker=MathChecker(pool=pool, timeout=10.0))


def verdict(env: MathEnvironment, completion: str, answer: Any = "7") -> tuple[float | None, str, str]:
    feedback = env.score({"answer": answer}, completion)
    return feedback.reward, feedback.details["verdict"], feedback.text


# ----------------------------------------------------------------------------------------- verdicts
def test_correct(env: MathEnvironment) -> None:
    feedback = env.score({"answer": "7"}, "3 + 4 = \\boxed{7}")
    assert (feedback.reward, feedback.success, feedback.text) == (1.0, True, "")
    assert feedback.details["verdict"] == "correct"
    assert feedback.details["checked_by"] == "fast"


def test_correct_through_math_verify(env: MathEnvironment) -> None:
    feedback = env.score({"answer": "\\frac{1}{2}"}, "So the probability is $\\boxed{0.5}$.")
    assert feedback.details["verdict"] == "correct"
    assert feedback.details["checked_by"] == "math_verify"


def test_wrong_answer(env: MathEnvironment) -> None:
    reward, kind, text = verdict(env, "3 + 4 = \\boxed{8}")
    assert (reward, kind) == (0.0, "wrong_answer")
    assert text == "Your final answer `8` is not correct."


def test_wrong_answer_never_reveals_by_default(env: MathEnvironment) -> None:
    for completion in ["\\boxed{8}", "", "no idea", "\\boxed{6", "\\boxed{\\frac{1}{}}", "Answer: 5"]:
        assert "7" not in verdict(env, completion, answer="7")[2]


def test_reveal_answer(pool: CheckerPool) -> None:
    env = MathEnvironment(reveal_answer=True, checker=MathChecker(pool=pool))
    _, kind, text = verdict(env, "\\boxed{8}", answer="#### 7")
    assert kind == "wrong_answer"
    assert text.endswith("The correct answer is 7.")
    assert verdict(env, "\\boxed{7}")[2] == ""  # nothing to say on success


def test_format_only(env: MathEnvironment) -> None:
    reward, kind, text = verdict(env, "3 + 4 = 7\nAnswer: 7")
    assert (reward, kind) == (0.5, "format")
    assert "is right" in text
    assert "\\boxed{}" in text
    reward, kind, text = verdict(env, "three plus four is 7")
    assert (reward, kind) == (0.5, "format")
    assert text.startswith("The last number you wrote")


def test_unformatted_scale(pool: CheckerPool) -> None:
    strict = MathEnvironment(unformatted_scale=0.0, checker=MathChecker(pool=pool))
    assert verdict(strict, "Answer: 7")[:2] == (0.0, "format")
    lenient = MathEnvironment(unformatted_scale=1.0, checker=MathChecker(pool=pool))
    assert verdict(lenient, "Answer: 7")[:2] == (1.0, "format")
    with pytest.raises(ValueError, match="unformatted_scale"):
        MathEnvironment(unformatted_scale=2.0)


def test_wrong_and_unformatted(env: MathEnvironment) -> None:
    reward, kind, text = verdict(env, "Answer: 8")
    assert (reward, kind) == (0.0, "wrong_answer")
    assert text == "Your final answer `8` is not correct. Also, put the final answer in \\boxed{}."
    _, kind, text = verdict(env, "maybe 6 or 8")
    assert kind == "wrong_answer"
    assert "the last number you wrote, `8`, is not correct" in text


@pytest.mark.parametrize("completion", ["", "   ", "\n\n"])
def test_empty_completion(env: MathEnvironment, completion: str) -> None:
    reward, kind, text = verdict(env, completion)
    assert (reward, kind) == (0.0, "no_answer")
    assert text.startswith("The response is empty")


def test_no_answer(pool: CheckerPool) -> None:
    env = MathEnvironment(fallback_last_number=False, checker=MathChecker(pool=pool))
    reward, kind, text = verdict(env, "I think it is seven.")
    assert (reward, kind) == (0.0, "no_answer")
    assert text == "No final answer was found: put the final answer in \\boxed{}."


def test_empty_box(env: MathEnvironment) -> None:
    _, kind, text = verdict(env, "so \\boxed{}")
    assert kind == "no_answer"
    assert "empty" in text


def test_never_closed_box_is_truncated(env: MathEnvironment) -> None:
    reward, kind, text = verdict(env, "3 + 4 = \\boxed{7")
    assert (reward, kind) == (0.0, "truncated")
    assert "never closed" in text
    assert verdict(env, "The answer is \\boxed{\\frac{7}{")[1] == "truncated"


def test_cut_off_without_answer(pool: CheckerPool) -> None:
    env = MathEnvironment(fallback_last_number=False, checker=MathChecker(pool=pool))
    _, kind, text = verdict(env, "Let $f(x) = \\frac{x}{")
    assert kind == "no_answer"
    assert "cut off" in text


@pytest.mark.parametrize("completion", ["\\boxed{\\frac{1}{}}", "\\boxed{2^{}}", "\\boxed{\\sqrt}"])
def test_malformed_latex(env: MathEnvironment, completion: str) -> None:
    reward, kind, text = verdict(env, completion)
    assert (reward, kind) == (0.0, "unparsable")
    assert "could not be read" in text


def test_words_in_the_box_are_explained(env: MathEnvironment) -> None:
    _, kind, text = verdict(env, "\\boxed{7 dollars y}")
    assert kind == "wrong_answer"
    assert "It was read as" in text
    assert verdict(env, "\\boxed{7 dollars}")[1] == "correct"


def test_several_boxes_noted(env: MathEnvironment) -> None:
    feedback = env.score({"answer": "7"}, "\\boxed{7} hmm, no: \\boxed{8}")
    assert feedback.details["n_boxed"] == 2
    assert "only the last one counts" in feedback.text


def test_huge_numbers(env: MathEnvironment) -> None:
    big = str(10**400)
    feedback = env.score({"answer": big}, f"\\boxed{{{big}}}")
    assert feedback.details["verdict"] == "correct"
    feedback = env.score({"answer": big}, f"\\boxed{{{10**400 + 1}}}")
    assert feedback.details["verdict"] == "wrong_answer"
    assert "(401 characters)" in feedback.text  # long answers are cut in the text
    assert env.score({"answer": "10^{400}"}, f"\\boxed{{{big}}}").details["verdict"] == "correct"


def test_checker_timeout_abstains(pool: CheckerPool) -> None:
    env = MathEnvironment(checker=MathChecker(pool=pool, timeout=0.5))
    feedback = env.score({"answer": "5"}, f"\\boxed{{{SLOW_ANSWER}}}")
    assert feedback.reward is None
    assert feedback.details["verdict"] == "checker_timeout"
    assert "checker timed out" in feedback.details["error"]
    assert feedback.text == ""


def test_answer_formats_of_the_reference(env: MathEnvironment) -> None:
    assert verdict(env, "\\boxed{72}", answer="She sold 48 + 24 = 72.\n#### 72")[1] == "correct"
    assert verdict(env, "\\boxed{1000}", answer="#### 1,000")[1] == "correct"
    assert verdict(env, "\\boxed{\\frac12}", answer="so $\\boxed{\\dfrac{1}{2}}$")[1] == "correct"
    assert verdict(env, "\\boxed{3}", answer=3)[1] == "correct"


def test_answer_line_format(pool: CheckerPool) -> None:
    env = MathEnvironment(answer_format="answer_line", checker=MathChecker(pool=pool))
    assert verdict(env, "\\boxed{3}\nAnswer: 7")[1] == "correct"
    _, kind, text = verdict(env, "\\boxed{7}")
    assert kind == "format"
    assert 'end with a line "Answer: <the final answer>"' in text
    prompt = env.prompt({"question": "What is 3 + 4?"})
    assert isinstance(prompt, list)
    assert "Answer:" in prompt[0]["content"]


def test_bad_task_fails_the_episode_not_the_batch(env: MathEnvironment) -> None:
    results = env.evaluate([{"answer": "7"}, {"question": "no answer column"}], ["\\boxed{7}", "\\boxed{7}"])
    assert results[0].details["verdict"] == "correct"
    assert results[1].failed
    assert results[1].reward is None  # our fault, not the model's
    assert "answer" in results[1].details["error"]


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="answer_format"):
        MathEnvironment(answer_format="latex")  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"unterminated|missing"):
        MathEnvironment(answer_pattern="(unclosed")


# -------------------------------------------------------------------------------- prompts, datasets
def test_prompt_from_question(env: MathEnvironment) -> None:
    assert env.prompt({"prompt": "as given"}) == "as given"
    messages = env.prompt({"question": "What is 3 + 4?"})
    assert messages == [
        {"role": "system", "content": "Solve the math problem. Put the final answer in \\boxed{}."},
        {"role": "user", "content": "What is 3 + 4?"},
    ]
    plain = MathEnvironment(chat=False, system_prompt="Box it.").prompt({"question": "What is 3 + 4?"})
    assert plain == "What is 3 + 4?\nBox it."


def test_dataset_of_the_environment() -> None:
    env = MathEnvironment(size=5, difficulty=1, seed=3)
    rows = env.dataset(as_dataset=False)
    assert isinstance(rows, list)
    assert len(rows) == 5
    assert {"prompt", "answer"} <= set(rows[0])
    assert len(env.dataset()) == 5


# ------------------------------------------------------------------------------- threads and TRL
def test_score_from_a_daemon_thread(env: MathEnvironment) -> None:
    box: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: box.setdefault("fb", env.score({"answer": "\\frac{1}{2}"}, "\\boxed{0.5}")), daemon=True
    )
    thread.start()
    thread.join(timeout=60)
    assert box["fb"].details["verdict"] == "correct"


def test_reward_function_in_an_asyncio_loop_on_a_daemon_thread(env: MathEnvironment) -> None:
    """TRL runs async reward functions on an event loop in a daemon thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def reward_fn() -> list[float | None]:
        return env(prompts=["q1", "q2"], completions=["\\boxed{\\sqrt{4}}", "\\boxed{3}"], answer=["2", "2"])

    try:
        rewards = asyncio.run_coroutine_threadsafe(reward_fn(), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
    assert rewards == [1.0, 0.0]
    assert env.last_feedback == ["", "Your final answer `3` is not correct."]


def test_evaluate_in_threads(env: MathEnvironment) -> None:
    tasks = [{"answer": f"\\frac{{{n}}}{{4}}"} for n in range(12)]
    completions = [f"\\boxed{{{n / 4}}}" if n % 3 else "\\boxed{-1}" for n in range(12)]
    results = env.evaluate(tasks, completions, max_workers=4)
    assert [r.success for r in results] == [n % 3 != 0 for n in range(12)]


def test_conformance(env: MathEnvironment) -> None:
    rows = sdpo_math.generate_problems(4, difficulty=1, as_dataset=False)
    assert isinstance(rows, list)
    check_environment(env, rows, [f"so \\boxed{{{row['answer']}}}" for row in rows])


def test_pickles(pool: CheckerPool) -> None:
    env = MathEnvironment(reveal_answer=True, checker=MathChecker(pool=pool, timeout=2.0))
    clone = pickle.loads(pickle.dumps(env))
    assert clone.reveal_answer
    assert clone.checker.timeout == 2.0
    assert clone.score({"answer": "7"}, "\\boxed{7}").success


def test_private_pool_closes_and_restarts_on_use() -> None:
    env = MathEnvironment(checker_workers=1)
    try:
        assert env.score({"answer": "2"}, "\\boxed{\\sqrt{4}}").success
        assert len(env.checker.pool.pids) == 1
        env.close()
        assert env.checker.pool.pids == []
        assert env.score({"answer": "3"}, "\\boxed{\\sqrt{9}}").success
    finally:
        env.close()


# ------------------------------------------------------------------------------------- registration
def test_hook_registers_both_environments() -> None:
    registered: dict[str, Any] = {}

    def register(name: str, factory: Any, *, description: str | None = None) -> None:
        registered[name] = (factory, description)

    sdpo_math.register_environments(register)
    assert registered["math"][0] is MathEnvironment
    assert set(registered) == {"math", "reasoning_gym"}
    assert all(description for _, description in registered.values())


def test_make_through_the_registry() -> None:
    with registered_plugin(sdpo_math, name="sdpo-math-under-test"):
        env = sdpo_envs.make("math", difficulty=2, reveal_answer=True)
        assert isinstance(env, MathEnvironment)
        assert env.name == "math"
        assert env.reveal_answer
        assert env.dataset_options["difficulty"] == 2
        assert "math" in {spec.name for spec in sdpo_envs.list_environments()}
        params = {p.name: p.help for p in sdpo_envs.get_factory("math").parameters()}
        assert "reveal_answer" in params
        assert params["reveal_answer"]

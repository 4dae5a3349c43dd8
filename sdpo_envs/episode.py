"""Episodes: one task, up to `max_turns` attempts, with the environment's feedback read between them.

Turn `t` of an episode scores the model's attempt exactly as a single-turn environment does
(`Environment.evaluate`). The episode then ends if the attempt succeeded, if it was turn `max_turns`,
if the environment could not score it, or if the environment has nothing more to say; otherwise the
environment's `respond(task, history)` writes the observation the model reads before turn `t + 1`.

The episode's reward after turn `t` is the latest attempt's reward times `turn_discount ** (t - 1)`
(`episode_reward`): with the default discount of 1 a pass on the third turn is worth 1, as on the
first. With `max_turns=1` an episode is exactly one `evaluate` call, the behaviour from before
episodes existed.

Failure policy, as for scoring: a `respond` that raises, runs past `respond_timeout` or returns
anything but a non-empty `str` (or `None`) ends the episode as failed, with the environment's
`error_reward`, the reason in `details["error"]`, and one more `error_count`; the run goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sdpo_envs.executors import call_with_timeout
from sdpo_envs.feedback_channel import completion_text
from sdpo_envs.types import Completion, Feedback, Prompt, StepResult, Task, Turn

if TYPE_CHECKING:
    from sdpo_envs.env import Environment


def episode_reward(reward: float | None, turn: int, discount: float) -> float | None:
    """The reward of an episode whose latest attempt (turn `turn`, from 1) scored `reward`."""
    if reward is None:
        return None
    return reward * discount ** (turn - 1)


def check_episode_options(label: str, max_turns: Any, turn_discount: Any, multi_turn: bool) -> None:
    """Raise `ValueError` (naming the environment and the parameter) for settings no episode can run with."""
    if isinstance(max_turns, bool) or not isinstance(max_turns, int):
        raise ValueError(f"environment {label!r}: max_turns must be an int >= 1, got {max_turns!r}")
    if max_turns < 1:
        raise ValueError(f"environment {label!r}: max_turns must be at least 1, got {max_turns}")
    if max_turns > 1 and not multi_turn:
        raise ValueError(f"environment {label!r} cannot run multi-turn episodes (max_turns={max_turns}): it does "
                         "not implement respond(task, history); use max_turns=1")
    if (isinstance(turn_discount, bool) or not isinstance(turn_discount, (int, float))
            or not math.isfinite(turn_discount) or not 0 < turn_discount <= 1):
        raise ValueError(f"environment {label!r}: turn_discount must be in (0, 1], got {turn_discount!r}")


class Episode:
    """One episode of `env` on `task`: `prompt`, then `step(completion)` until `done`.

    Holds the per-episode state, so many episodes can share one environment (which must not keep
    per-episode state itself). `history` lists the attempts so far, each with its feedback.
    """

    def __init__(self, env: Environment, task: Task) -> None:
        check_episode_options(env.label, env.max_turns, env.turn_discount, env.multi_turn)
        self.env = env
        self.task = task
        self.max_turns: int = env.max_turns
        self.turn_discount: float = float(env.turn_discount)
        self.prompt: Prompt = env.prompt(task)
        self.history: list[Turn] = []
        self.result: StepResult | None = None

    @property
    def done(self) -> bool:
        """Whether the episode has ended."""
        return self.result is not None and self.result.done

    @property
    def reward(self) -> float | None:
        """The episode's reward so far; 0.0 before the first attempt."""
        return 0.0 if self.result is None else self.result.reward

    def step(self, completion: Completion) -> StepResult:
        """Score one attempt; the result says whether the episode goes on and what the model reads next."""
        self._check_can_step()
        started = time.monotonic()
        (feedback,) = self.env.evaluate([self.task], [completion])
        return self._advance(completion, feedback, started)

    def _check_can_step(self) -> None:
        if self.done:
            raise RuntimeError(f"{self.env.label}: step() after the episode ended (turn {len(self.history)} of "
                               f"max_turns={self.max_turns}); call reset() to start another")

    def _advance(self, completion: Completion, feedback: Feedback, started: float) -> StepResult:
        """Everything of a turn after its scoring: the history, the next observation, the episode's reward."""
        text = completion_text(completion)
        self.history.append(Turn(text, feedback))
        turn = len(self.history)
        observation: str | None = None
        if not (feedback.failed or feedback.success or turn >= self.max_turns):
            observation, failure = self._respond()
            if failure is not None:
                self.env._note_failure()
                feedback = replace(feedback, reward=self.env.error_reward, success=False,
                                   details={**feedback.details, "error": failure})
        done = observation is None
        if not feedback.failed:
            feedback = replace(feedback, reward=episode_reward(feedback.reward, turn, self.turn_discount))
        info = {"turn": turn, "max_turns": self.max_turns, "seconds": time.monotonic() - started}
        self.result = StepResult(feedback=feedback, done=done, info=info, observation=observation)
        return self.result

    def _respond(self) -> tuple[str | None, str | None]:
        """The next observation (`None`: the environment ends the episode), and why it failed if it did."""
        env = self.env
        history = tuple(self.history)
        try:
            observation = call_with_timeout(lambda: env.respond(self.task, history), env.respond_timeout,
                                            f"{env.label}.respond()")
        except TimeoutError as exc:
            return None, str(exc)
        except Exception as exc:  # the environment's fault must not crash a run
            return None, f"{env.label}.respond() raised {type(exc).__name__}: {exc}"
        if observation is None:
            return None, None
        if not isinstance(observation, str) or not observation.strip():
            what = "an empty str" if isinstance(observation, str) else type(observation).__name__
            return None, f"{env.label}.respond() returned {what}; expected a non-empty str, or None to end the episode"
        return observation, None


def step_episodes(episodes: Sequence[Episode], completions: Sequence[Completion]) -> list[StepResult | str]:
    """Step each episode with its completion and return the results in order.

    The attempts of episodes that share an environment are scored by one `evaluate` call, so that the
    environment's own engine runs them (its `max_workers`, process pool, executor, batch scorer); the
    `respond` calls that follow run concurrently. An episode that cannot step (it has ended), or whose
    environment breaks its contract while scoring it, gives the reason as a `str` instead of a `StepResult`:
    that episode fails (with every episode of the broken environment), the others go on.
    """
    if len(episodes) != len(completions):
        raise ValueError(f"{len(episodes)} episodes but {len(completions)} completions")
    outcomes: list[StepResult | str | None] = [None] * len(episodes)
    by_env: dict[int, list[int]] = {}
    for i, episode in enumerate(episodes):
        try:
            episode._check_can_step()
        except Exception as exc:
            outcomes[i] = _broken(episode, exc)
        else:
            by_env.setdefault(id(episode.env), []).append(i)
    started = time.monotonic()
    scored: dict[int, Feedback] = {}
    for members in by_env.values():
        env = episodes[members[0]].env
        try:
            results = env.evaluate([episodes[i].task for i in members], [completions[i] for i in members])
        except Exception as exc:
            for i in members:
                outcomes[i] = _broken(episodes[i], exc)
        else:
            scored.update(zip(members, results, strict=True))

    def advance(i: int) -> StepResult | str:
        try:
            return episodes[i]._advance(completions[i], scored[i], started)
        except Exception as exc:
            return _broken(episodes[i], exc)

    if scored:
        with ThreadPoolExecutor(min(len(scored), 32)) as pool:
            for i, advanced in zip(scored, pool.map(advance, scored), strict=True):
                outcomes[i] = advanced
    finished: list[StepResult | str] = []
    for outcome in outcomes:
        assert outcome is not None  # every episode was either refused, or scored and advanced
        finished.append(outcome)
    return finished


def _broken(episode: Episode, exc: Exception) -> str:
    return f"{episode.env.label}: step raised {type(exc).__name__}: {exc}"

"""Any sdpo-gym environment inside a plain TRL `GRPOTrainer`, through its `environment_factory`.

What TRL 1.16's `GRPOTrainer(environment_factory=f)` does with `f`: it calls `f()` (no arguments) for
each concurrent rollout and reuses the objects across batches; before generation it calls
`reset(**row)` with the dataset row (a returned string is appended to the row's last user message);
every other public method of the object's class becomes a tool the model may call (its type hints and
docstring are the tool's schema); and a `get_reward()` method scores the finished rollout (logged
under the class's name). A tool's return value is what the model reads next, as a tool message.

`environment_factory(env)` returns such an `f`. Its objects expose one tool, `submit(answer)`, which
plays one turn of the episode (`sdpo_envs.episode`) and returns the observation (the environment's
feedback) while turns remain; `get_reward()` is the episode's reward, `last_feedback` the feedback
text of its latest attempt and `last_answer` the answer it submitted last, both for SDPO's teacher.
The objects share the one environment (its sandboxes, checker and worker pools); each holds its own
`Episode`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from sdpo_envs.env import Environment
from sdpo_envs.episode import Episode
from sdpo_envs.registry import make
from sdpo_envs.types import Prompt, StepResult

NO_SUBMISSION_TEXT = "No answer was submitted: call the `submit` tool with your answer."
OVER_TEXT = "The episode is over: no more answers are accepted."


def default_instructions(max_turns: int) -> str:
    """What `reset` appends to the prompt: how to answer, and how many attempts there are."""
    if max_turns == 1:
        return "Give your final answer by calling the `submit` tool once."
    return (f"Give your answer by calling the `submit` tool. You have {max_turns} attempts: after a wrong one you "
            "are told what was wrong, and may submit again.")


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one text: itself, or the contents of its messages, a blank line apart."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(message.get("content", "")) for message in prompt)


class TRLEnvironment:
    """One rollout's episode as TRL's `GRPOTrainer` drives it: `reset(**row)`, the `submit` tool, `get_reward()`.

    Built by `environment_factory`, which names a subclass after the environment (TRL logs the reward
    as `rewards/<name>/mean`). Only `reset`, `submit` and `get_reward` are public methods: TRL would
    offer any other one to the model as a tool.
    """

    def __init__(self, environment: Environment, *, instructions: str) -> None:
        self._environment = environment
        self._instructions = instructions
        self._episode: Episode | None = None

    @property
    def environment(self) -> Environment:
        """The sdpo-gym environment that scores the attempts."""
        return self._environment

    @property
    def episode(self) -> Episode | None:
        """The current episode (its `history`, `result`, `reward`); `None` before the first `reset`."""
        return self._episode

    @property
    def last_feedback(self) -> str:
        """The feedback text of the episode's latest attempt (what SDPO's teacher reads); `""` after a pass."""
        if self._episode is None or not self._episode.history:
            return NO_SUBMISSION_TEXT
        return self._episode.history[-1].feedback.text

    @property
    def last_answer(self) -> str | None:
        """The latest answer submitted in this episode (what a successful episode demonstrates to SDPO's teacher);
        `None` before the first submission."""
        if self._episode is None or not self._episode.history:
            return None
        return self._episode.history[-1].completion

    def reset(self, **row: Any) -> str | None:
        """Start an episode on the dataset row; return the text TRL appends to the row's last user message.

        That is the instructions (how to submit, how many attempts), and the environment's own prompt first
        when the row has no `prompt` column (TRL then starts from an empty user message).
        """
        self._episode = Episode(self._environment, row)
        if "prompt" in row:
            return f"\n\n{self._instructions}" if self._instructions else None
        text = prompt_text(self._episode.prompt)
        return f"{text}\n\n{self._instructions}" if self._instructions else text

    def submit(self, answer: str) -> str:
        """Submit an answer to the task and get the verdict.

        Args:
            answer: The complete answer, as the task asks for it (for a programming task, the whole program).

        Returns:
            What was wrong with the answer while attempts remain, else that the episode is over.
        """
        if self._episode is None:
            raise RuntimeError("submit() before reset(): TRL resets each environment before generation")
        if self._episode.done:
            return OVER_TEXT
        result = self._episode.step(answer)
        if result.observation is not None:
            return result.observation
        return _closing_text(result)

    def get_reward(self) -> float | None:
        """The episode's reward: its latest attempt's, discounted by turn; 0.0 if nothing was submitted."""
        if self._episode is None:
            raise RuntimeError("get_reward() before reset()")
        return self._episode.reward


def _closing_text(result: StepResult) -> str:
    feedback = result.feedback
    if feedback.success:
        return "Correct. The episode is over."
    if feedback.failed:
        return "Your answer could not be checked. The episode is over."
    text = feedback.text.strip()
    return f"{text}\n\nNo attempts left. The episode is over." if text else "Not correct. The episode is over."


def environment_factory(
    env: str | Environment,
    /,
    *,
    max_turns: int | None = None,
    turn_discount: float | None = None,
    instructions: str | None = None,
    **kwargs: Any,
) -> Callable[[], TRLEnvironment]:
    """A zero-argument factory for `trl.GRPOTrainer(environment_factory=...)`, playing `env`'s episodes.

    Args:
        env (`str` or `Environment`): a registered name (built with `make(env, **kwargs)`) or an environment.
        max_turns (`int`, *optional*): attempts per episode (the environment's `configure_episodes`); for an
            environment instance, this changes that instance.
        turn_discount (`float`, *optional*): the per-turn discount of the reward, in (0, 1].
        instructions (`str`, *optional*): what `reset` appends to the prompt; by default how to call `submit`
            and how many attempts there are. `""` appends nothing.
        **kwargs: the environment's parameters, when `env` is a name.
    """
    if isinstance(env, Environment):
        if kwargs:
            raise TypeError(f"environment_factory: keyword arguments {sorted(kwargs)} configure an environment built "
                            f"by name; {env.label!r} is already built")
        env.configure_episodes(max_turns=max_turns, turn_discount=turn_discount)
        environment = env
    elif isinstance(env, str):
        options = {key: value for key, value in (("max_turns", max_turns), ("turn_discount", turn_discount))
                   if value is not None}
        environment = make(env, **options, **kwargs)
    else:
        raise TypeError(f"environment_factory: expected an environment name or an Environment, got "
                        f"{type(env).__name__}")
    text = default_instructions(environment.max_turns) if instructions is None else instructions
    return functools.partial(_named_class(environment.label), environment, instructions=text)


def _named_class(label: str) -> type[TRLEnvironment]:
    """A `TRLEnvironment` subclass named after the environment, so TRL's reward column says which it is."""
    name = re.sub(r"\W", "_", label) or "TRLEnvironment"
    return type(name, (TRLEnvironment,), {"__module__": __name__, "__qualname__": name})

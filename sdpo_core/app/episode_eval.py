"""Evaluation of a model on multi-turn episodes: pass@1 within 1, 2, ..., `max_turns` turns.

Each sample of a task is one episode (`sdpo_envs.episode.Episode`): turn 1 generates from the task's
prompt; after a failed attempt with turns left, the environment's observation is appended as a user
message (after the attempt as an assistant message) and the model answers again, the conversation
rendered by the chat template like any chat. String prompts get the attempt and the observation
appended as text. Generation is `sdpo_core.app.evaluation.generate_completions`; scoring, the episode's
reward and its failure policy are the environment's (`Episode.step`), so the numbers mean what the
training reward of `SDPOTrainer(reward_funcs=[env])` means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from sdpo_core.app.evaluation import EvalResult, EvalSample, is_solved, pass_at_k, prompt_text
from sdpo_envs import Environment, Feedback, StepResult, Task
from sdpo_envs.episode import Episode, step_episodes

__all__ = ["PlayedEpisode", "conversation", "evaluate_episodes", "pass_within_turns", "play_episodes"]


def conversation(prompt: Any, attempts: Sequence[str], observations: Sequence[str]) -> Any:
    """The prompt of the next turn: `prompt`, then each attempt followed by the observation the environment gave.

    Chat prompts get assistant and user messages; string prompts the texts, a blank line apart.
    """
    if len(observations) != len(attempts):
        raise ValueError(f"{len(attempts)} attempts but {len(observations)} observations")
    if isinstance(prompt, str):
        return "\n\n".join([prompt, *(part for pair in zip(attempts, observations, strict=True) for part in pair)])
    messages = list(prompt)
    for attempt, observation in zip(attempts, observations, strict=True):
        messages += [{"role": "assistant", "content": attempt}, {"role": "user", "content": observation}]
    return messages


def pass_within_turns(solved_at: Sequence[int | None], max_turns: int) -> dict[int, float]:
    """Fraction of episodes solved within `t` turns, for `t` = 1..`max_turns`; `solved_at[i]` is the turn that
    solved episode `i` (from 1), `None` when none did. NaN for no episode."""
    return {t: (sum(s is not None and s <= t for s in solved_at) / len(solved_at)) if solved_at else math.nan
            for t in range(1, max_turns + 1)}


class PlayedEpisode:
    """One evaluated episode: its attempts, the observations between them, and how it ended."""

    def __init__(self, env: Environment, task: Task) -> None:
        self.episode = Episode(env, task)
        self.attempts: list[str] = []
        self.observations: list[str] = []
        self.results: list[Feedback] = []  # each attempt's feedback, its reward the episode's after that turn
        self.error: str | None = None

    @property
    def active(self) -> bool:
        """Whether the model answers again: the environment gave an observation, and turns remain."""
        result = self.episode.result
        return (self.error is None and result is not None and result.observation is not None
                and len(self.attempts) < self.episode.max_turns)

    def solved_at(self, threshold: float | None) -> int | None:
        """The first turn (from 1) whose attempt solved the task, `None` if none did: its reward (the episode's
        after that turn, discounted) reached `threshold`, or with `None` the environment marked it `success`."""
        return next((turn for turn, feedback in enumerate(self.results, start=1) if is_solved(feedback, threshold)),
                    None)

    def record(self, text: str, outcome: StepResult | str) -> None:
        """Keep an attempt and what `step_episodes` made of it (a `str`: the environment broke, the episode fails)."""
        self.attempts.append(text)
        if isinstance(outcome, str):
            self.error = outcome
            return
        result = outcome
        self.results.append(result.feedback)
        if result.observation is not None:
            self.observations.append(result.observation)

    def transcript(self) -> str:
        """The attempts and observations in order, for display."""
        parts = []
        for i, attempt in enumerate(self.attempts):
            parts.append(attempt)
            if i < len(self.observations):
                parts.append(f"[environment] {self.observations[i]}")
        return "\n\n".join(parts)


def play_episodes(env: Environment, tasks: Sequence[Task], *, num_samples: int,
                  generate: Callable[[Sequence[Any], int], list[list[str]]]) -> list[list[PlayedEpisode]]:
    """`num_samples` episodes per task, played to their end; `generate(prompts, n)` returns `n` completions per
    prompt (the caller's `generate_completions` with its settings)."""
    episodes = [[PlayedEpisode(env, task) for _ in range(num_samples)] for task in tasks]
    first = generate([per_task[0].episode.prompt for per_task in episodes], num_samples)
    active = [(e, text) for per_task, texts in zip(episodes, first, strict=True)
              for e, text in zip(per_task, texts, strict=True)]
    while active:
        outcomes = step_episodes([e.episode for e, _ in active], [text for _, text in active])
        for (e, text), outcome in zip(active, outcomes, strict=True):
            e.record(text, outcome)
        going = [e for e, _ in active if e.active]
        if not going:
            break
        contexts = [conversation(e.episode.prompt, e.attempts, e.observations) for e in going]
        active = [(e, texts[0]) for e, texts in zip(going, generate(contexts, 1), strict=True)]
    return episodes


def evaluate_episodes(
    env: Environment,
    tasks: Sequence[Task],
    *,
    ks: Sequence[int],
    num_samples: int,
    generate: Callable[[Sequence[Any], int], list[list[str]]],
    success_threshold: float | None = None,
    show: int = 3,
) -> EvalResult:
    """Play `num_samples` episodes per task and aggregate: pass@k and success over whole episodes (solved within
    `env.max_turns`), `pass_within_turns` (pass@1 within each number of turns) and the mean episode reward.

    A task is solved within `t` turns when one of the episode's first `t` attempts solved it (`PlayedEpisode.
    solved_at`): pass@k and the success rate count episodes solved within `env.max_turns`. An environment may
    go on after an attempt that reaches the threshold without its `success` flag (math's right answer outside
    the requested format, with `unformatted_scale=1`); that attempt still counts, whatever the later ones score.
    """
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad:
        raise ValueError(f"k={bad[0]} needs at least {bad[0]} samples per task, got {num_samples}")
    played = play_episodes(env, tasks, num_samples=num_samples, generate=generate)
    flat = [e for per_task in played for e in per_task]
    solved_at = [e.solved_at(success_threshold) for e in flat]
    solved = [sum(s is not None for s in solved_at[i * num_samples:(i + 1) * num_samples])
              for i in range(len(tasks))]
    rewards = [e.episode.reward if e.error is None else env.error_reward for e in flat]
    scored = [r for r in rewards if r is not None]
    samples = [EvalSample(prompt_text(e.episode.prompt), e.transcript(), reward, s is not None,
                          e.error or (e.episode.result.feedback.text if e.episode.result is not None else ""))
               for e, reward, s in zip(flat, rewards, solved_at, strict=True)]
    samples.sort(key=lambda s: (s.success or not s.feedback.strip(), s.success))
    return EvalResult(
        num_tasks=len(tasks),
        num_samples=num_samples,
        pass_at_k={k: sum(pass_at_k(num_samples, c, k) for c in solved) / len(tasks) if tasks else math.nan
                   for k in ks},
        mean_reward=sum(scored) / len(scored) if scored else math.nan,
        success_rate=sum(s is not None for s in solved_at) / len(flat) if flat else math.nan,
        abstained=sum(r is None for r in rewards),
        samples=tuple(samples[:show]),
        pass_within_turns=pass_within_turns(solved_at, env.max_turns),
        turns_played=sum(len(e.attempts) for e in flat),
    )


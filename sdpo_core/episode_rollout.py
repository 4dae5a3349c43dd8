"""Whole episodes on the training path: `SDPOTrainer(reward_funcs=[make("code", max_turns=3)])`.

A multi-turn environment among the reward functions drives generation through TRL 1.16's
`rollout_func` hook: `EpisodeRollout` generates each turn with the trainer's own single-turn
generator (`GRPOTrainer._generate_single_turn`, the one its tool loop calls), scores the attempt
with `Episode.step`, and appends the environment's observation as a user message before the next
turn. The rollout returns one completion per episode: the assistant turns and the observations
between them, as token ids, with `env_mask` (TRL's name; it becomes `tool_mask`) 0 on the
observation tokens, so that no loss and no gradient lands on them.

The environment's place among the reward functions is taken by `EpisodeReward`, which hands TRL the
reward each episode ended with (`Episode.reward`, discounted by turn) and publishes, for SDPO's
teacher, the feedback on each episode's last attempt (`last_feedback`) and its final answer
(`last_answers`). Other reward functions see the decoded episode as the completion, as usual.

Observation tokens are cut out of the chat template itself (`observation_suffix_text`), so any
template works: the text after the assistant message's end-of-turn token, through the next
generation header. Token ids of the turns already generated are never re-tokenized.

Failure policy: an episode whose environment raises, hangs or breaks its result contract ends as a
failed episode (the environment's `error_reward`, the reason in `EpisodeRecord.error`), never a
crashed step. An episode also ends when its tokens reach `max_completion_length` (`stopped`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdpo_envs import Environment
from sdpo_envs.episode import Episode, check_episode_options, step_episodes
from sdpo_envs.feedback_channel import write_feedback
from sdpo_envs.types import Feedback, StepResult, Task

logger = logging.getLogger(__name__)

_MARKER = "\u2063sdpo-turn-end\u2063"  # assistant content that no template alters and no observation contains


@dataclass
class EpisodeRecord:
    """One played episode, as the trainer's reward and teacher read it.

    `answers` are the assistant turns' texts (special tokens skipped), `result` the latest `StepResult`
    (`None` if no attempt was scored), `error` why the episode failed outside the environment's own
    failure policy, and `stopped` why it ended before the environment said so (`"max_completion_length"`,
    `"truncated"`: a turn that reached the length limit before its end-of-turn token).
    """

    task: Task
    answers: list[str] = field(default_factory=list)
    result: StepResult | None = None
    error: str | None = None
    stopped: str | None = None

    @property
    def turns(self) -> int:
        """Attempts the student generated in this episode."""
        return len(self.answers)

    @property
    def reward(self) -> float | None:
        """The episode's reward: its latest attempt's, discounted by turn (see `sdpo_envs.episode`)."""
        return 0.0 if self.result is None else self.result.reward

    @property
    def feedback(self) -> str:
        """The environment's feedback on the latest attempt (`""` for none)."""
        return "" if self.result is None else self.result.feedback.text

    @property
    def final_answer(self) -> str | None:
        """The last assistant turn: what a successful episode demonstrates to its siblings."""
        return self.answers[-1] if self.answers else None

    @property
    def success(self) -> bool:
        """Whether the environment marked the episode's latest attempt a success."""
        return self.result is not None and self.result.feedback.success

    @property
    def failed(self) -> bool:
        """Whether the episode failed: outside the environment's policy (`error`), or within it (a failed scoring
        or `respond`, see `sdpo_envs.episode`)."""
        return self.error is not None or (self.result is not None and self.result.feedback.failed)


def observation_suffix_text(rendered: str, marker: str, end_tokens: Sequence[str]) -> str:
    """The text a chat template puts between an assistant turn's end and the next assistant turn.

    `rendered` is a conversation `[..., assistant(marker), user(observation)]` rendered with the generation
    header. The suffix starts after the first end-of-turn token (`end_tokens`, e.g. `<|im_end|>`) that
    follows the marker: the student generated the turn up to and including that token.
    """
    start = rendered.find(marker)
    if start < 0:
        raise ValueError("the chat template dropped the assistant message's content; multi-turn episodes need a "
                         "template that renders earlier assistant turns")
    after = start + len(marker)
    ends = [(index, token) for token in end_tokens if token and (index := rendered.find(token, after)) >= 0]
    if not ends:
        raise ValueError(f"the chat template ends an assistant message with none of the end-of-turn tokens "
                         f"{list(end_tokens)}; multi-turn episodes need one (GenerationConfig.eos_token_id)")
    index, token = min(ends)
    return rendered[index + len(token):]


def observation_ids(tokenizer: Any, prompt: Any, observation: str, end_token_ids: Sequence[int],
                    chat_template_kwargs: Mapping[str, Any]) -> list[int]:
    """Token ids of `observation` as a user message after an assistant turn, through the next generation header.

    String prompts (no chat template) get the observation as plain text between blank lines.
    """
    if isinstance(prompt, str):
        return tokenizer(f"\n\n{observation}\n\n", add_special_tokens=False)["input_ids"]
    messages = [*prompt, {"role": "assistant", "content": _MARKER}, {"role": "user", "content": observation}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **chat_template_kwargs)
    end_tokens = tokenizer.convert_ids_to_tokens(list(end_token_ids))
    return tokenizer(observation_suffix_text(rendered, _MARKER, end_tokens), add_special_tokens=False)["input_ids"]


def episode_metrics(records: Sequence[EpisodeRecord]) -> dict[str, float]:
    """What the trainer logs about a batch's episodes (this process's rows): mean attempts, the fraction solved on
    each turn, and the fractions that failed (`error`) or were cut by the token budget (`stopped`)."""
    n = len(records)
    max_turns = max((len(r.answers) for r in records), default=0)
    metrics = {"episodes/turns_mean": sum(r.turns for r in records) / n,
               "episodes/failed_fraction": sum(r.failed for r in records) / n,
               "episodes/stopped_fraction": sum(r.stopped is not None for r in records) / n}
    for turn in range(1, max_turns + 1):
        metrics[f"episodes/solved_on_turn_{turn}"] = sum(r.success and r.turns == turn for r in records) / n
    return metrics


class EpisodeReward:
    """The driving environment's place among the reward functions: the rewards its episodes ended with."""

    def __init__(self, rollout: EpisodeRollout) -> None:
        self._rollout = rollout
        self.__name__ = rollout.environment.label  # TRL names the reward column after it
        self.last_feedback: list[str] | None = None
        self.last_results: list[Feedback] | None = None
        self.last_answers: list[str | None] | None = None

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        records = self._rollout.last_episodes
        if len(records) != len(prompts):
            raise RuntimeError(f"{self.__name__}: {len(records)} episodes were played for {len(prompts)} rows")
        results = [record.result.feedback if record.result is not None else Feedback(reward=0.0) for record in records]
        write_feedback(self, results)
        self.last_answers = [record.final_answer for record in records]
        log_metric = kwargs.get("log_metric")
        if log_metric is not None and records:
            for name, value in episode_metrics(records).items():
                log_metric(name, value)
        return [record.reward for record in records]


class EpisodeRollout:
    """TRL's `rollout_func(prompts, trainer)` playing `environment`'s episodes (see the module docstring).

    TRL passes only the prompts; the trainer sets `rows` (the batch's dataset rows, one per prompt)
    before each generation, so the environment sees the task's columns (tests, answers).
    """

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.reward_function = EpisodeReward(self)
        self.rows: list[Mapping[str, Any]] = []
        self.last_episodes: list[EpisodeRecord] = []

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        if len(self.rows) != len(prompts):
            raise RuntimeError(f"episode rollout: {len(self.rows)} dataset rows for {len(prompts)} prompts")
        tokenizer = trainer._tokenizer
        env = self.environment
        budget = trainer.max_completion_length
        end_ids = list(trainer.eos_token_ids)
        template_kwargs = {**trainer.chat_template_kwargs}
        if getattr(trainer, "chat_template", None) is not None:
            template_kwargs["chat_template"] = trainer.chat_template
        records = [EpisodeRecord({**row, "prompt": prompt}) for row, prompt in zip(self.rows, prompts, strict=True)]
        episodes: list[Episode | None] = [self._start(record) for record in records]
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        completion_ids: list[list[int]] = [[] for _ in prompts]
        env_mask: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] | None = [[] for _ in prompts]
        active = list(range(len(prompts)))  # an episode that could not start still gets its first turn generated
        num_generations = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        for turn in range(1, env.max_turns + 1):
            if not active:
                break
            contexts = [prompt_ids[i] + completion_ids[i] for i in active]
            new_ids, new_logprobs = trainer._generate_single_turn(
                contexts, None, {}, num_generations if turn == 1 and len(active) == len(prompts) else 1)
            for j, i in enumerate(active):
                ids = new_ids[j][: max(0, budget - len(completion_ids[i]))]
                completion_ids[i] += ids
                env_mask[i] += [1] * len(ids)
                if logprobs is not None and new_logprobs is not None:
                    logprobs[i] += list(new_logprobs[j][: len(ids)])
                else:
                    logprobs = None
                records[i].answers.append(tokenizer.decode(ids, skip_special_tokens=True))
            self._step_all([(records[i], episode) for i in active if (episode := episodes[i]) is not None])
            still = []
            for i in active:
                record = records[i]
                result = record.result
                if record.error is not None or result is None or result.observation is None or turn == env.max_turns:
                    continue
                if not completion_ids[i] or completion_ids[i][-1] not in end_ids:
                    record.stopped = "truncated"
                    continue
                suffix = observation_ids(tokenizer, prompts[i], result.observation, end_ids, template_kwargs)
                if len(completion_ids[i]) + len(suffix) >= budget:
                    record.stopped = "max_completion_length"
                    continue
                completion_ids[i] += suffix
                env_mask[i] += [0] * len(suffix)
                if logprobs is not None:
                    logprobs[i] += [0.0] * len(suffix)
                still.append(i)
            active = still
        self.last_episodes = records
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs,
                "env_mask": env_mask}

    def _start(self, record: EpisodeRecord) -> Episode | None:
        try:
            return Episode(self.environment, record.task)
        except Exception as exc:  # a task the environment cannot start is one failed episode, not a crash
            self._fail(record, f"{self.environment.label}: the episode could not start: {type(exc).__name__}: {exc}")
            return None

    def _step_all(self, pairs: list[tuple[EpisodeRecord, Episode]]) -> None:
        """Score the latest attempt of every active episode; one whose environment breaks fails, the run goes on."""
        outcomes = step_episodes([episode for _, episode in pairs], [record.answers[-1] for record, _ in pairs])
        for (record, _), outcome in zip(pairs, outcomes, strict=True):
            if isinstance(outcome, str):
                self._fail(record, outcome)
            else:
                record.result = outcome

    def _fail(self, record: EpisodeRecord, reason: str) -> None:
        logger.warning("%s", reason)
        env = self.environment
        feedback = env.failed_feedback(reason)
        record.error = reason
        turn = max(1, len(record.answers))
        record.result = StepResult(feedback=feedback, done=True, info={"turn": turn, "max_turns": env.max_turns})


def check_rollout_arguments(reward_funcs: Sequence[Any], rollout_func: Any, environment_factory: Any,
                            ) -> EpisodeRollout | None:
    """The episode rollout for the one multi-turn environment among `reward_funcs`, or `None` if there is none.

    Errors name the environments: two multi-turn environments (which one would drive the episode?), a
    multi-turn environment beside a `rollout_func` or an `environment_factory` (which already generate), or
    episode settings no episode can run with (`max_turns` set by hand on an environment without `respond`).
    """
    driving = [f for f in reward_funcs if isinstance(f, Environment) and f.max_turns > 1]
    if not driving:
        return None
    labels = [f.label for f in driving]
    if len(driving) > 1:
        raise ValueError(f"reward functions {labels} are all multi-turn environments (max_turns > 1); one "
                         "environment drives an episode: give the others max_turns=1")
    if rollout_func is not None or environment_factory is not None:
        given = "rollout_func" if rollout_func is not None else "environment_factory"
        raise ValueError(f"environment {labels[0]!r} has max_turns={driving[0].max_turns}, so it plays the episodes "
                         f"itself; it cannot be combined with {given} (give it max_turns=1 there)")
    env = driving[0]
    check_episode_options(env.label, env.max_turns, env.turn_discount, env.multi_turn)  # set by hand, not checked
    return EpisodeRollout(env)


__all__ = [
    "EpisodeRecord",
    "EpisodeReward",
    "EpisodeRollout",
    "check_rollout_arguments",
    "episode_metrics",
    "observation_ids",
    "observation_suffix_text",
]

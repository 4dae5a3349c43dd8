"""Test-time self-distillation: solve one hard problem by SDPO on that problem alone (`discover`).

For each problem, rounds of `k` attempts are sampled and scored by the environment. The first success
(by default a reward of at least 1, as `sdpo eval` counts; `DiscoverSettings.success_threshold`) ends the
problem. After a round without one, a single SDPO step on the problem's own `k` attempts updates
the model: the teacher is the same model reading the environment's feedback on an attempt (or, when an
attempt scored at least `success_reward_threshold` without the environment calling it solved, that
attempt as a demonstration). The step is `SDPOTrainer`'s own (its teacher prompts and loss), run for
`budget // k` rounds at most. By default the update trains a fresh LoRA adapter (peft) on a copy of the
model, so a round is cheap and the caller's model is never changed; every problem starts from the same
weights.

Two baselines spend the same attempt budget with the same model and sampling settings:

- `best_of_k`: rounds of `k` plain samples, no update;
- `multi_turn`: rounds of `k` episodes of up to `max_turns` turns (`sdpo_envs.Episode`), the environment's
  observation on the last attempt in context before the next; every turn is one attempt.

Attempts are counted in the order they are generated (a round's rows in order; in `multi_turn`, turn by
turn), so "attempts to the first success" means the same for every method. A problem the environment
cannot read (its prompt raises) or cannot score (every attempt of a round abstains or fails) gets an
`error` and the next problem goes on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from transformers import PrinterCallback, TrainerCallback

from sdpo_core import SDPOTrainer
from sdpo_core.app.episode_eval import PlayedEpisode, conversation
from sdpo_core.app.evaluation import generate_completions, is_solved
from sdpo_core.config import SDPOConfig
from sdpo_envs import Feedback, completion_text
from sdpo_envs.episode import step_episodes

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sdpo_envs import Environment, Task

METHODS = ("sdpo", "best_of_k", "multi_turn")
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class RoundRecord:
    """One round of a problem: how many attempts, and what the SDPO update after it could learn from.

    `demo_rows` / `feedback_rows`: attempts whose teacher prompt held a demonstration / only the
    environment's feedback (0 for the baselines, and for a round that ended the problem).
    """

    attempts: int
    successes: int
    abstained: int
    demo_rows: int = 0
    feedback_rows: int = 0

    @property
    def signal(self) -> str:
        """`"demo"`, `"feedback"` (feedback only) or `"none"`: what the round's update learned from."""
        if self.demo_rows:
            return "demo"
        return "feedback" if self.feedback_rows else "none"


@dataclass(frozen=True)
class ProblemResult:
    """The outcome of one method on one problem.

    `attempts` is the number of attempts up to and including the first success when `solved`, else all
    the attempts spent. `answer` is the solving completion. `updates` counts SDPO steps taken.
    """

    problem_id: str
    method: str
    solved: bool
    attempts: int
    budget: int
    answer: str | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    updates: int = 0
    error: str | None = None
    seconds: float = 0.0

    def rounds_by_signal(self) -> dict[str, int]:
        """Rounds followed by an update, by what the update learned from (`demo`, `feedback`, `none`)."""
        counts = {"demo": 0, "feedback": 0, "none": 0}
        for record in self.rounds[:self.updates]:
            counts[record.signal] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProblemResult:
        rounds = [RoundRecord(**r) for r in data.get("rounds", [])]
        return cls(**{**data, "rounds": rounds})


# ------------------------------------------------------------------------------------ pure pieces
def plan_rounds(budget: int, k: int) -> int:
    """Rounds of `k` attempts in `budget` attempts; a budget that is not a whole number of rounds is an error."""
    for name, value in (("budget", budget), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if budget < k:
        raise ValueError(f"budget {budget} is smaller than k={k}: not even one round of k attempts fits; "
                         "raise --budget or lower --k")
    if budget % k:
        raise ValueError(f"budget {budget} is not a multiple of k={k}: rounds have k attempts each "
                         f"(use --budget {budget - budget % k} or {budget - budget % k + k})")
    return budget // k


def first_success(successes: Sequence[bool], spent_before: int) -> int | None:
    """Attempts spent up to and including the first success of a round, or `None` without one."""
    for i, ok in enumerate(successes):
        if ok:
            return spent_before + i + 1
    return None


def discovery_curve(results: Sequence[ProblemResult], points: Iterable[int]) -> list[float]:
    """discovery@a for each `a` in `points`: the fraction of problems solved within `a` attempts."""
    if not results:
        raise ValueError("no results to draw a discovery curve from")
    return [sum(r.solved and r.attempts <= a for r in results) / len(results) for a in points]


def median_attempts(results: Sequence[ProblemResult]) -> float:
    """Median attempts to the first success over all problems; an unsolved problem counts as infinitely many.

    `inf` when half or more of the problems stayed unsolved.
    """
    if not results:
        raise ValueError("no results to take a median of")
    return float(statistics.median(r.attempts if r.solved else math.inf for r in results))


def summarize(results: Sequence[ProblemResult]) -> dict[str, Any]:
    """Problems, solved, median attempts to first success, errors and rounds by update signal."""
    signals = {"demo": 0, "feedback": 0, "none": 0}
    for result in results:
        for kind, count in result.rounds_by_signal().items():
            signals[kind] += count
    solved = [r.attempts for r in results if r.solved]
    return {
        "problems": len(results),
        "solved": len(solved),
        "median_attempts": median_attempts(results) if results else math.nan,
        "median_attempts_solved": float(statistics.median(solved)) if solved else math.nan,
        "errors": sum(r.error is not None for r in results),
        "updates": sum(r.updates for r in results),
        "update_rounds_by_signal": signals,
    }


def _usable(feedback: Feedback) -> bool:
    return feedback.reward is not None and not feedback.failed


def abstain_reason(results: Sequence[Feedback], round_index: int) -> str | None:
    """Why a round cannot guide anything (every attempt abstained or failed), or `None` if one was scored."""
    if any(_usable(f) for f in results):
        return None
    errors = [str(f.details["error"]) for f in results if f.failed]
    why = f" (first error: {errors[0]})" if errors else ""
    return (f"the environment scored none of the {len(results)} attempts of round {round_index + 1}: each abstained "
            f"or failed{why}")


def problem_id(task: Mapping[str, Any], index: int) -> str:
    """The task's `id` (or `problem_id`) column, else its position in the task list."""
    for key in ("id", "problem_id"):
        if task.get(key) not in (None, ""):
            return str(task[key])
    return str(index)


# ------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DiscoverSettings:
    """Sampling and update settings shared by every method (so the baselines sample like SDPO)."""

    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-4
    max_turns: int = 4
    success_threshold: float | None = 1.0
    """An attempt succeeds when its reward reaches this (as `sdpo eval` and the trainer's demonstrations count);
    `None`: when the environment marks it `success` (e.g. math's answer in the requested format)."""
    seed: int = 0
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)


def default_sdpo_config() -> SDPOConfig:
    """SDPO for one problem: the seed's loss and teacher prompts, with the teacher frozen at the start weights.

    With a LoRA student the frozen teacher is the base model with the adapter off (no copy), reading the
    environment's feedback: a few rounds on one problem leave nothing for an EMA to average.
    """
    return SDPOConfig(teacher_mode="frozen")


def default_lora_config() -> Any:
    """A rank-16 LoRA adapter on every linear layer."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------ SDPO
class _ProblemOver(Exception):
    """Raised inside the trainer's step once a round decides the problem (solved or unscorable)."""


class _RoundWatch:
    """The environment as the trainer's reward function, showing each round's attempts and feedback to
    `on_round` after scoring and before the update (`on_round` raises `_ProblemOver` to end the problem there).

    Feedback reaches the teacher through the reward-function protocol (`last_feedback`), as for any reward
    function; the step itself is `SDPOTrainer`'s, unchanged.
    """

    def __init__(self, env: Environment, on_round: Callable[[list[str], list[Feedback]], None]) -> None:
        self.env, self.on_round = env, on_round
        self.__name__ = env.label  # TRL names a reward function's metrics after it
        self.last_feedback: list[str] | None = None

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        rewards: list[float | None] = self.env(prompts=prompts, completions=completions, **kwargs)
        results = list(self.env.last_results or [])
        self.last_feedback = [r.text for r in results]
        self.on_round([completion_text(c) for c in completions], results)
        return rewards


class _SignalLog(TrainerCallback):
    """Reads, from each update's logged metrics, how many of the round's rows had a demonstration in their teacher
    prompt and how many the environment's feedback only (`sdpo/demo_row_fraction`, `sdpo/feedback_row_fraction`)."""

    def __init__(self, rows: int, on_signal: Callable[[int, int], None]) -> None:
        self.rows, self.on_signal = rows, on_signal

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "sdpo/demo_row_fraction" in logs:
            self.on_signal(round(logs["sdpo/demo_row_fraction"] * self.rows),
                           round(logs.get("sdpo/feedback_row_fraction", 0.0) * self.rows))


def _discover_sdpo(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, env: Environment, task: Task,
                   pid: str, rounds: int, k: int, settings: DiscoverSettings, sdpo_config: SDPOConfig,
                   peft_config: Any, training_args: Mapping[str, Any]) -> ProblemResult:
    from datasets import Dataset
    from trl import GRPOConfig

    records: list[RoundRecord] = []
    outcome: dict[str, Any] = {"attempts": 0}

    def on_round(completions: list[str], results: list[Feedback]) -> None:
        if len(results) != len(completions):
            raise _ProblemOver(f"the environment returned {len(results)} results for {len(completions)} attempts")
        spent = outcome["attempts"]
        solved = [is_solved(f, settings.success_threshold) for f in results]
        records.append(RoundRecord(attempts=len(completions), successes=sum(solved),
                                   abstained=sum(not _usable(f) for f in results)))
        hit = first_success(solved, spent)
        outcome["attempts"] = spent + len(completions)
        if hit is not None:
            outcome.update(attempts=hit, answer=completions[hit - spent - 1], solved=True)
            raise _ProblemOver
        reason = abstain_reason(results, len(records) - 1)
        if reason is not None:
            raise _ProblemOver(reason)

    def on_signal(demo_rows: int, feedback_rows: int) -> None:
        records[-1] = replace(records[-1], demo_rows=demo_rows, feedback_rows=feedback_rows)

    row = dict(task)
    row["prompt"] = env.prompt(task)
    student = copy.deepcopy(model)  # the caller's model is never trained; each problem starts from it
    error: str | None = None
    with tempfile.TemporaryDirectory(prefix="sdpo-discover-") as output_dir:
        args = GRPOConfig(**{
            "output_dir": output_dir, "num_generations": k, "per_device_train_batch_size": k,
            "gradient_accumulation_steps": 1, "max_steps": rounds,
            "max_completion_length": settings.max_completion_length,
            "temperature": settings.temperature, "top_p": settings.top_p, "learning_rate": settings.learning_rate,
            "lr_scheduler_type": "constant", "save_strategy": "no", "report_to": "none", "logging_steps": 1,
            "disable_tqdm": True, "seed": settings.seed, "activation_checkpointing": False,
            "chat_template_kwargs": dict(settings.chat_template_kwargs) or None,
            **_cpu_defaults(), **training_args,
        })
        trainer = SDPOTrainer(
            model=student, reward_funcs=[_RoundWatch(env, on_round)], args=args,
            train_dataset=Dataset.from_list([row]), processing_class=tokenizer, peft_config=peft_config,
            sdpo_config=sdpo_config, callbacks=[_SignalLog(k, on_signal)],
        )
        trainer.remove_callback(PrinterCallback)  # the per-step log lines; the caller reports per problem
        try:
            trainer.train()
        except _ProblemOver as over:
            error = str(over) or None
        finally:
            del trainer, student
    updates = len(records) - (1 if outcome.get("solved") or error else 0)
    return ProblemResult(problem_id=pid, method="sdpo", solved=bool(outcome.get("solved")),
                         attempts=outcome["attempts"], budget=rounds * k, answer=outcome.get("answer"),
                         rounds=records, updates=updates, error=error)


def _cpu_defaults() -> dict[str, Any]:
    import torch

    return {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False}


# ------------------------------------------------------------------------------------ baselines
def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any], num_samples: int,
              settings: DiscoverSettings, seed: int) -> list[list[str]]:
    return generate_completions(model, tokenizer, prompts, num_samples=num_samples,
                                max_new_tokens=settings.max_completion_length, temperature=settings.temperature,
                                top_p=settings.top_p, batch_size=max(len(prompts) * num_samples, 1),
                                chat_template_kwargs=settings.chat_template_kwargs, seed=seed)


def _discover_best_of_k(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, env: Environment, task: Task,
                        pid: str, rounds: int, k: int, settings: DiscoverSettings) -> ProblemResult:
    prompt = env.prompt(task)
    records: list[RoundRecord] = []
    spent = 0
    for r in range(rounds):
        (completions,) = _generate(model, tokenizer, [prompt], k, settings, seed=settings.seed * 100_003 + r)
        results = env.evaluate([task] * k, completions)
        solved = [is_solved(f, settings.success_threshold) for f in results]
        records.append(RoundRecord(attempts=k, successes=sum(solved), abstained=sum(not _usable(f) for f in results)))
        hit = first_success(solved, spent)
        if hit is not None:
            return ProblemResult(pid, "best_of_k", True, hit, rounds * k, completions[hit - spent - 1], records)
        spent += k
        reason = abstain_reason(results, r)
        if reason is not None:
            return ProblemResult(pid, "best_of_k", False, spent, rounds * k, None, records, error=reason)
    return ProblemResult(pid, "best_of_k", False, spent, rounds * k, None, records)


def _discover_multi_turn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, env: Environment, task: Task,
                         pid: str, rounds: int, k: int, settings: DiscoverSettings) -> ProblemResult:
    budget = rounds * k
    saved = (env.max_turns, env.turn_discount)
    env.configure_episodes(max_turns=settings.max_turns)
    records: list[RoundRecord] = []
    spent = 0
    try:
        r = 0
        while spent < budget:
            live = [PlayedEpisode(env, task) for _ in range(min(k, budget - spent))]
            attempts = successes = abstained = 0
            round_results: list[Feedback] = []
            for turn in range(settings.max_turns):
                live = live[:budget - spent]
                if not live:
                    break
                contexts = [conversation(e.episode.prompt, e.attempts, e.observations) for e in live]
                texts = [text for (text,) in _generate(model, tokenizer, contexts, 1, settings,
                                                       seed=settings.seed * 100_003 + r * 101 + turn)]
                for e, text, outcome in zip(live, texts, step_episodes([e.episode for e in live], texts),
                                            strict=True):
                    e.record(text, outcome)
                    # a str: the environment broke on this attempt, which fails
                    feedback = Feedback(None, details={"error": outcome}) if isinstance(outcome, str) \
                        else outcome.feedback
                    spent += 1
                    attempts += 1
                    round_results.append(feedback)
                    solved = is_solved(feedback, settings.success_threshold)
                    successes += solved
                    abstained += not _usable(feedback)
                    if solved:
                        records.append(RoundRecord(attempts, successes, abstained))
                        return ProblemResult(pid, "multi_turn", True, spent, budget, text, records)
                live = [e for e in live if e.active]
            records.append(RoundRecord(attempts, successes, abstained))
            reason = abstain_reason(round_results, r)
            if reason is not None:
                return ProblemResult(pid, "multi_turn", False, spent, budget, None, records, error=reason)
            r += 1
    finally:
        env.configure_episodes(max_turns=saved[0], turn_discount=saved[1])
    return ProblemResult(pid, "multi_turn", False, spent, budget, None, records)


# ---------------------------------------------------------------------------------------- driver
def discover(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    env: Environment,
    tasks: Sequence[Task],
    *,
    budget: int = 256,
    k: int = 8,
    method: str = "sdpo",
    settings: DiscoverSettings | None = None,
    sdpo_config: SDPOConfig | None = None,
    peft_config: Any = "default",
    training_args: Mapping[str, Any] | None = None,
    skip: Collection[str] = (),
    on_result: Callable[[ProblemResult], None] | None = None,
    progress: Any = None,
) -> list[ProblemResult]:
    """Spend up to `budget` attempts on each task, `k` at a time, and report when each was first solved.

    Args:
        model, tokenizer: the policy; never modified (SDPO trains a copy per problem).
        env: scores attempts; a success is as `settings.success_threshold` says.
        tasks: one row per problem (whatever `env.prompt` and `env.score` read).
        budget: attempts per problem, a multiple of `k`.
        k: attempts per round (SDPO's group size).
        method: `"sdpo"`, `"best_of_k"` or `"multi_turn"`.
        settings: sampling, learning rate and `max_turns` (`DiscoverSettings()` by default).
        sdpo_config: the SDPO step (default `default_sdpo_config()`).
        peft_config: a `peft` config for the update, `"default"` for `default_lora_config()`, `None` to train
            every weight.
        training_args: extra `GRPOConfig` fields for the SDPO step.
        skip: problem ids to leave out (done by an earlier run).
        on_result: called with each problem's result as soon as it is known (to save it).
        progress: a tqdm-like object; `update(1)` per problem.

    Returns:
        One `ProblemResult` per task not skipped, in order. A problem whose prompt cannot be built, or whose
        attempts the environment cannot score, has `error` set; the others go on.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    rounds = plan_rounds(budget, k)
    settings = settings or DiscoverSettings()
    if method == "multi_turn" and not env.multi_turn:
        raise ValueError(f"method 'multi_turn' needs an environment that implements respond(); {env.label} does not")
    if method == "sdpo":
        sdpo_config = sdpo_config or default_sdpo_config()
        peft_config = default_lora_config() if peft_config == "default" else peft_config
    results = []
    for index, task in enumerate(tasks):
        pid = problem_id(task, index)
        if pid in skip:
            continue
        started = time.monotonic()
        try:
            env.prompt(task)
        except Exception as exc:  # a row this environment cannot read: this problem fails, the others go on
            result = ProblemResult(pid, method, False, 0, budget,
                                   error=f"the environment cannot build a prompt for this problem: "
                                         f"{type(exc).__name__}: {exc}")
        else:
            try:
                if method == "sdpo":
                    assert sdpo_config is not None
                    result = _discover_sdpo(model, tokenizer, env, task, pid, rounds, k, settings, sdpo_config,
                                            peft_config, training_args or {})
                elif method == "best_of_k":
                    result = _discover_best_of_k(model, tokenizer, env, task, pid, rounds, k, settings)
                else:
                    result = _discover_multi_turn(model, tokenizer, env, task, pid, rounds, k, settings)
            except Exception as exc:  # one problem's failure (a prompt the template rejects, ...) ends only it
                logger.warning("discover: %s problem %s failed", method, pid, exc_info=True)
                result = ProblemResult(pid, method, False, 0, budget,
                                       error=f"this problem could not be run: {type(exc).__name__}: {exc}")
        result = replace(result, seconds=round(time.monotonic() - started, 2))
        results.append(result)
        if on_result is not None:
            on_result(result)
        if progress is not None:
            progress.update(1)
    return results


# ------------------------------------------------------------------------------- saving results
def append_result(path: str | os.PathLike[str], result: ProblemResult) -> None:
    """Append `result` as one JSON line and flush it to disk, so a crash loses no finished problem."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(result.to_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_results(path: str | os.PathLike[str]) -> list[ProblemResult]:
    """The results `append_result` wrote; a torn last line (a crash mid-write) is dropped, another bad line raises."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    results = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            results.append(ProblemResult.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not a discover result ({exc})") from None
    return results

"""Held-out evaluation of a model on an environment: pass@k, mean reward and a few feedback samples.

Used by `sdpo eval` and by `sdpo train`'s before/after check. Generation is plain batched
`model.generate` (left padding, prompts rendered with the chat template as GRPOTrainer renders them),
scoring is the environment's own batched `evaluate(tasks, completions)`, so the numbers mean what the
training reward means. A sample counts as solved when its reward reaches `success_threshold` (SDPO's
`success_reward_threshold`, so "solved" means what a demonstration means), or, with `success_threshold=None`,
when the environment says `Feedback.success`.

pass@k uses the unbiased estimator of Chen et al. 2021 (huggingface.co/papers/2107.03374) over `n >= k`
samples per task: `1 - C(n - c, k) / C(n, k)` with `c` solved samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from sdpo_envs import Environment, Feedback, Task


@dataclass(frozen=True)
class EvalSample:
    """One scored completion, for display: the question, what the model wrote and what the environment said."""

    prompt: str
    completion: str
    reward: float | None
    success: bool
    feedback: str


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation.

    Args:
        num_tasks (`int`): tasks evaluated.
        num_samples (`int`): completions per task (`n`).
        pass_at_k (`dict[int, float]`): the unbiased pass@k for each requested `k <= n`.
        mean_reward (`float`): mean reward over all scored completions (abstentions excluded; NaN if none).
        success_rate (`float`): fraction of completions solved (pass@1 estimated from `n` samples).
        abstained (`int`): completions the environment could not score (`reward=None`).
        samples (`tuple[EvalSample, ...]`): a few scored completions, failures with feedback first.
        pass_within_turns (`dict[int, float]`): for multi-turn episodes, pass@1 within 1, 2, ... turns
            (`sdpo_core.app.episode_eval`); empty for single-turn evaluation.
        turns_played (`int`): attempts generated and scored over all episodes (`num_tasks * num_samples`
            for single-turn evaluation).
    """

    num_tasks: int
    num_samples: int
    pass_at_k: dict[int, float]
    mean_reward: float
    success_rate: float
    abstained: int = 0
    samples: tuple[EvalSample, ...] = field(default=(), repr=False)
    pass_within_turns: dict[int, float] = field(default_factory=dict)
    turns_played: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        """The inverse of `to_dict`."""
        return cls(
            num_tasks=data["num_tasks"],
            num_samples=data["num_samples"],
            pass_at_k={int(k): v for k, v in data["pass_at_k"].items()},
            mean_reward=data["mean_reward"],
            success_rate=data["success_rate"],
            abstained=data.get("abstained", 0),
            samples=tuple(EvalSample(**s) for s in data.get("samples", ())),
            pass_within_turns={int(t): v for t, v in data.get("pass_within_turns", {}).items()},
            turns_played=data.get("turns_played", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (samples included)."""
        return {
            "num_tasks": self.num_tasks,
            "num_samples": self.num_samples,
            "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()},
            "mean_reward": self.mean_reward,
            "success_rate": self.success_rate,
            "abstained": self.abstained,
            "samples": [vars(s) for s in self.samples],
            "pass_within_turns": {str(t): v for t, v in self.pass_within_turns.items()},
            "turns_played": self.turns_played,
        }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021, eq. 1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) as a product, stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def prompt_text(prompt: Any) -> str:
    """The question of a prompt for display: the last message's content, or the text itself."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[-1], Mapping):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any],
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each prompt as GRPOTrainer feeds them: chat messages through the chat template with the
    generation header, plain text as is."""
    kwargs = dict(chat_template_kwargs or {})
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(tokenizer(prompt)["input_ids"])
        else:
            text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False, **kwargs)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    found: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in found:
                found.append(int(token))
    return found


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[list[str]]:
    """`num_samples` completions per prompt (greedy when `temperature == 0`), decoded without special tokens.

    Batches of `batch_size` prompts, left-padded. Sampling uses its own RNG stream (seeded by `seed`), so an
    evaluation in the middle of a run does not shift the run's randomness.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature == 0 and num_samples > 1:
        raise ValueError("greedy decoding (temperature 0) repeats one sample; set a temperature for num_samples > 1")
    stops = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        num_return_sequences=num_samples,
        pad_token_id=pad_id,
        eos_token_id=stops,
        use_cache=True,
    )
    ids = render_prompts(tokenizer, prompts, chat_template_kwargs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[list[str]] = []
    batches = range(0, len(ids), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluating", unit="batch", leave=False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in batches:
                chunk = ids[start:start + batch_size]
                width = max(len(x) for x in chunk)
                input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in chunk], device=device)  # [b, P]
                attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
                generated = cast(Any, model).generate(input_ids=input_ids, attention_mask=attention_mask,
                                                      generation_config=config)  # [b * n, P + T]
                texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
                outputs.extend(texts[i:i + num_samples] for i in range(0, len(texts), num_samples))
    finally:
        model.train(was_training)
    return outputs


def score_completions(env: Environment, tasks: Sequence[Task], completions: Sequence[Sequence[str]], *,
                      ks: Sequence[int] = (1,), success_threshold: float | None = None, show: int = 3) -> EvalResult:
    """Score `completions[i]` (n per task) for `tasks[i]` with `env.evaluate` and aggregate them.

    A completion is solved when its reward is at least `success_threshold`, or (`None`) when the environment
    marks it `success`.
    """
    if len(tasks) != len(completions):
        raise ValueError(f"{len(tasks)} tasks but {len(completions)} completion lists")
    n = len(completions[0]) if completions else 0
    if any(len(c) != n for c in completions):
        raise ValueError("every task needs the same number of completions")
    bad = [k for k in ks if not 1 <= k <= max(n, 1)]
    if bad:
        raise ValueError(f"k={bad[0]} needs at least {bad[0]} samples per task, got {n}")
    flat_tasks = [task for task in tasks for _ in range(n)]
    flat_completions = [c for per_task in completions for c in per_task]
    results: list[Feedback] = env.evaluate(flat_tasks, flat_completions) if flat_tasks else []
    rewards = [r.reward for r in results if r.reward is not None]
    ok = [is_solved(r, success_threshold) for r in results]
    solved = [sum(ok[i * n:(i + 1) * n]) for i in range(len(tasks))]
    pass_k = {k: sum(pass_at_k(n, c, k) for c in solved) / len(tasks) if tasks else math.nan for k in ks}
    samples = [
        EvalSample(prompt_text(env.prompt(task)), completion, result.reward, success, result.text)
        for task, completion, result, success in zip(flat_tasks, flat_completions, results, ok, strict=True)
    ]
    # failures that come with feedback are the interesting ones to show, then the rest in order
    samples.sort(key=lambda s: (s.success or not s.feedback.strip(), s.success))
    return EvalResult(
        num_tasks=len(tasks),
        num_samples=n,
        pass_at_k=pass_k,
        mean_reward=sum(rewards) / len(rewards) if rewards else math.nan,
        success_rate=sum(ok) / len(ok) if ok else math.nan,
        abstained=sum(r.reward is None for r in results),
        samples=tuple(samples[:show]),
        turns_played=len(results),
    )


def is_solved(result: Feedback, threshold: float | None) -> bool:
    """Whether a scored completion counts as solved: its reward reaches `threshold`, or (`None`) the environment
    marked it `success`."""
    if threshold is None:
        return result.success
    return result.reward is not None and result.reward >= threshold


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    env: Environment,
    tasks: Sequence[Task],
    *,
    k: int | Sequence[int] = 1,
    num_samples: int | None = None,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float = 1.0,
    batch_size: int = 16,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    success_threshold: float | None = None,
    seed: int = 0,
    show: int = 3,
    progress: bool = False,
) -> EvalResult:
    """Generate for `tasks` (prompts from `env.prompt`) and score with `env`.

    Args:
        k (`int` or list of `int`, *optional*, defaults to `1`): the pass@k values to report.
        num_samples (`int`, *optional*): completions per task; defaults to the largest `k`.
        temperature (`float`, *optional*): `0` is greedy; defaults to greedy for one sample per task and
            `1.0` (the rollout temperature) otherwise.
        success_threshold (`float`, *optional*): reward at which a completion counts as solved; `None` uses
            the environment's `Feedback.success`.
    """
    ks = [k] if isinstance(k, int) else list(k)
    n = num_samples if num_samples is not None else max(ks)
    if temperature is None:
        temperature = 0.0 if n == 1 else 1.0
    if env.max_turns > 1:  # whole episodes: the model answers again after the environment's feedback
        from sdpo_core.app.episode_eval import evaluate_episodes

        def generate(prompts: Sequence[Any], samples: int) -> list[list[str]]:
            return generate_completions(
                model, tokenizer, prompts, num_samples=samples, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, batch_size=batch_size, chat_template_kwargs=chat_template_kwargs,
                seed=seed, progress=progress)

        return evaluate_episodes(env, tasks, ks=ks, num_samples=n, generate=generate,
                                 success_threshold=success_threshold, show=show)
    prompts = [env.prompt(task) for task in tasks]
    completions = generate_completions(
        model, tokenizer, prompts, num_samples=n, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, batch_size=batch_size, chat_template_kwargs=chat_template_kwargs, seed=seed, progress=progress,
    )
    return score_completions(env, tasks, completions, ks=ks, success_threshold=success_threshold, show=show)


__all__ = [
    "EvalResult",
    "EvalSample",
    "evaluate_model",
    "generate_completions",
    "is_solved",
    "pass_at_k",
    "prompt_text",
    "render_prompts",
    "score_completions",
]

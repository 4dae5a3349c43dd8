"""Which way the SDPO divergence pulls the demo model's entropy, measured on the model's own samples.

    python benchmarks/tail_bias.py                                  # 16 demo prompts x 8 samples, 1 thread
    python benchmarks/tail_bias.py --prompts 2 --json /tmp/t.json   # a quick look

For each of the first `--prompts` training prompts of the embedded demo (`sdpo train`'s defaults: the demo model,
one-digit sums), the untrained model samples 8 completions as a training step does (T = 1 over the whole
vocabulary, at most 48 tokens). Every row that SDPO would train (a demonstration: the group's first other success;
without one, the environment's feedback) is scored by the same model twice: as the student (its own prompt) and
as the teacher (the seed's teacher prompt, `SDPOConfig()`). For each trained token the script records

- the student's probability outside its own top-K, and the teacher's probability outside those same K tokens
  (`sdpo_core.diagnostics.tail_masses`): with `distillation_add_tail` these are the two tail buckets;
- for each divergence setting, the first-order change of the token's entropy along a descent step on its loss,
  with the logits as parameters (`sdpo_core.diagnostics.entropy_change_rate`): positive means the loss pulls the
  token flatter.

It prints the means per kind of row and writes them to `--json` (default `benchmarks/results/tail_bias.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

import sdpo_envs
from sdpo_core import SDPOConfig
from sdpo_core.app.demo_model import resolve_model
from sdpo_core.app.runs import DEFAULTS
from sdpo_core.diagnostics import entropy_change_rate, tail_masses
from sdpo_core.loss import per_token_distillation_loss, token_entropy
from sdpo_core.teacher_prompt import build_teacher_message, select_demonstrations

REPO = Path(__file__).resolve().parents[1]
GROUP = 8
MAX_NEW_TOKENS = 48
# name -> (alpha, top-K, tail bucket, temperature of the teacher's logits): the seed's setting first
DIVERGENCES: dict[str, tuple[float, int | None, bool, float]] = {
    "jsd_top100_tail": (0.5, 100, True, 1.0),
    "jsd_top100_renormalised": (0.5, 100, False, 1.0),
    "jsd_full_vocabulary": (0.5, None, False, 1.0),
    "reverse_kl_top100_tail": (1.0, 100, True, 1.0),
    "forward_kl_top100_tail": (0.0, 100, True, 1.0),
    "jsd_top100_tail_teacher_t0.9": (0.5, 100, True, 0.9),
    "jsd_top100_tail_teacher_t0.8": (0.5, 100, True, 0.8),
    "jsd_top100_tail_teacher_t0.7": (0.5, 100, True, 0.7),
}


def _completion_logits(model: Any, prompt_ids: list[int], completion: Tensor) -> Tensor:
    """`[T, V]` logits predicting each completion token after `prompt_ids`."""
    ids = torch.cat([torch.tensor(prompt_ids), completion])[None]
    with torch.no_grad():
        return model(ids).logits[0, len(prompt_ids) - 1:-1].float()


def _divergence(alpha: float, topk: int | None, add_tail: bool, teacher_temperature: float,
                teacher: Tensor) -> Callable[[Tensor], Tensor]:
    sharpened = teacher / teacher_temperature
    return lambda logits: per_token_distillation_loss(logits, sharpened, alpha=alpha, topk=topk, add_tail=add_tail)


def _token_rows(model: Any, tokenizer: Any, env: Any, row: dict[str, Any], config: SDPOConfig,
                topk: int) -> list[dict[str, Any]]:
    """One prompt's group: per trained row, its kind and per-token tail masses, entropies and entropy pulls."""
    prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=GROUP,
                             pad_token_id=tokenizer.eos_token_id)
    completions = []
    for sequence in out[:, len(prompt_ids):]:
        ends = (sequence == tokenizer.eos_token_id).nonzero()
        completions.append(sequence[: int(ends[0]) + 1] if len(ends) else sequence)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    feedback = env.evaluate([row] * GROUP, texts)
    demos = select_demonstrations([f.reward for f in feedback], GROUP, threshold=config.success_reward_threshold)
    rows = []
    for completion, demo, verdict in zip(completions, demos, feedback, strict=True):
        teacher = build_teacher_message(row["prompt"], None if demo is None else texts[demo], verdict.text, config)
        if not teacher.in_mask:
            continue
        teacher_ids = tokenizer.apply_chat_template(teacher.prompt, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
        student_logits = _completion_logits(model, prompt_ids, completion)  # [T, V]
        teacher_logits = _completion_logits(model, teacher_ids, completion)  # [T, V]
        student_tail, teacher_tail = tail_masses(student_logits, teacher_logits, topk)
        rows.append({
            "kind": "demo" if teacher.uses_demonstration else "feedback",
            "student_tail": student_tail.tolist(), "teacher_tail": teacher_tail.tolist(),
            "student_entropy": token_entropy(student_logits).tolist(),
            "teacher_entropy": token_entropy(teacher_logits).tolist(),
            "entropy_pull": {name: entropy_change_rate(student_logits, _divergence(*spec, teacher_logits)).tolist()
                             for name, spec in DIVERGENCES.items()},
        })
    return rows


def _pull_summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "flatter": statistics.fmean(v > 0 for v in values)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted means per kind of row (and over all), the fraction of tokens whose teacher tail is the
    larger, and per divergence the mean entropy pull and the fraction of tokens pulled flatter."""
    summary: dict[str, Any] = {}
    for kind in ("all", "demo", "feedback"):
        chosen = [r for r in rows if kind in ("all", r["kind"])]
        if not chosen:
            continue

        def tokens(key: str, rows: list[dict[str, Any]] = chosen) -> list[float]:
            return [value for r in rows for value in r[key]]

        student_tail, teacher_tail = tokens("student_tail"), tokens("teacher_tail")
        pulls = {name: [v for r in chosen for v in r["entropy_pull"][name]] for name in DIVERGENCES}
        summary[kind] = {
            "rows": len(chosen), "tokens": len(student_tail),
            "student_tail": statistics.fmean(student_tail), "teacher_tail": statistics.fmean(teacher_tail),
            "teacher_tail_larger": statistics.fmean(t > s for s, t in zip(student_tail, teacher_tail, strict=True)),
            "student_entropy": statistics.fmean(tokens("student_entropy")),
            "teacher_entropy": statistics.fmean(tokens("teacher_entropy")),
            "entropy_pull": {name: _pull_summary(values) for name, values in pulls.items()},
        }
    return summary


def report_lines(summary: dict[str, Any], topk: int) -> list[str]:
    lines = []
    for kind, s in summary.items():
        lines.append(f"{kind} rows: {s['rows']} rows, {s['tokens']} tokens | mass outside the student's top-{topk}: "
                     f"student {s['student_tail']:.4f}, teacher {s['teacher_tail']:.4f} (teacher larger on "
                     f"{s['teacher_tail_larger']:.0%} of tokens) | entropy: student {s['student_entropy']:.3f}, "
                     f"teacher {s['teacher_entropy']:.3f}")
        for name, pull in s["entropy_pull"].items():
            lines.append(f"    {name:32s} entropy pull {pull['mean']:+.5f} nats per unit step, "
                         f"{pull['flatter']:.0%} of tokens pulled flatter")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=100, help="K of the tail masses (the seed's distillation_topk)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="default: the demo model")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/tail_bias.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.monotonic()
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    env = sdpo_envs.make(DEFAULTS["environment"], **DEFAULTS["environment_kwargs"])
    config = SDPOConfig()
    rows = []
    assert env.dataset is not None  # the math environment has a training set
    for row in env.dataset(as_dataset=False)[: args.prompts]:
        rows.extend(_token_rows(model, tokenizer, env, row, config, args.topk))
    if not rows:
        parser.error("no sampled row got a teacher; raise --prompts")
    summary = summarise(rows)
    print("\n".join(report_lines(summary, args.topk)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    fields = ("alpha", "topk", "add_tail", "teacher_temperature")
    args.json.write_text(json.dumps({
        "model": path, "prompts": args.prompts, "group": GROUP, "max_new_tokens": MAX_NEW_TOKENS,
        "topk": args.topk, "seed": args.seed,
        "divergences": {name: dict(zip(fields, spec, strict=True)) for name, spec in DIVERGENCES.items()},
        "summary": summary, "seconds": round(time.monotonic() - start, 1),
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checks per second of the `math` environment against calling math-verify directly, and their agreement.

    python benchmarks/math_bench.py                 # 40 problems x 8 completions = 320 pairs
    python benchmarks/math_bench.py --problems 100 --group 4 --seed 1

The pairs are generated, fixed by the seed, and shaped like a GRPO batch: each problem gets `--group`
completions, often with the same final answer, in mixed forms (integers with reasoning, grouped
digits, fractions vs decimals, radicals, polynomials, intervals, sets, percentages, units, a 401-digit
integer, answer lines, bare numbers, no answer, malformed LaTeX).

Baseline: `verify(parse("\\boxed{gold}"), parse(completion))` in the main thread, math-verify's own
timeouts on, what a single-process script would do. Ours: `MathEnvironment.evaluate` (threads, the
worker pool, the fast path, the verdict cache) and a serial `score` loop. Agreement is counted where
both give a verdict: math-verify found an answer in the completion, and we neither abstained nor found
no answer; "equal" is math-verify's True against our `correct` or `format` verdict.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sdpo_math import MathChecker, MathEnvironment
from sdpo_math._worker import _parse_gold
from sdpo_math.checker import CheckerPool
from sympy.core.cache import clear_cache


@dataclass(frozen=True)
class Pair:
    kind: str
    gold: str
    completion: str


def _forms(rng: random.Random) -> tuple[str, str, list[str], list[str]]:
    """(kind, gold, equivalent answers, wrong answers) of one problem."""
    kind = rng.choice(["integer", "integer", "integer", "grouped", "fraction", "decimal", "sqrt", "polynomial",
                       "interval", "set", "percent", "units", "huge"])
    if kind == "integer":
        n = rng.randint(-50, 500)
        return kind, str(n), [str(n), f"{n}.0"], [str(n + rng.choice([-2, -1, 1, 10]))]
    if kind == "grouped":
        n = rng.randint(1000, 99999)
        return kind, str(n), [f"{n:,}", f"{n:,}".replace(",", "{,}")], [f"{n + 1000:,}"]
    if kind == "fraction":
        p, q = rng.randint(1, 9), rng.choice([2, 3, 4, 5, 8])
        right = [f"\\dfrac{{{p * 2}}}{{{q * 2}}}", f"{p}/{q}"]
        return kind, f"\\frac{{{p}}}{{{q}}}", right, [f"\\frac{{{p + 1}}}{{{q}}}"]
    if kind == "decimal":
        q = rng.choice([2, 4, 5, 8])
        return kind, f"{1 / q:g}", [f"\\frac{{1}}{{{q}}}"], [f"\\frac{{1}}{{{q + 1}}}"]
    if kind == "sqrt":
        a, b = rng.randint(2, 5), rng.choice([2, 3, 5])
        return kind, f"{a}\\sqrt{{{b}}}", [f"\\sqrt{{{a * a * b}}}"], [f"{a + 1}\\sqrt{{{b}}}"]
    if kind == "polynomial":
        a = rng.randint(1, 5)
        return kind, f"x^2+{2 * a}x+{a * a}", [f"(x+{a})^2"], [f"(x+{a + 1})^2"]
    if kind == "interval":
        lo, hi = rng.randint(-5, 0), rng.randint(1, 9)
        return kind, f"[{lo}, {hi})", [f"[{lo},{hi})"], [f"({lo}, {hi}]"]
    if kind == "set":
        a, b = rng.sample(range(1, 20), 2)
        return kind, f"\\{{{a}, {b}\\}}", [f"\\{{{b}, {a}\\}}"], [f"\\{{{a}, {b + 1}\\}}"]
    if kind == "percent":
        p = rng.choice([10, 20, 25, 50, 75])
        return kind, f"{p}\\%", [f"{p / 100:g}", f"{p}"], [f"{p + 5}\\%"]
    if kind == "units":
        n = rng.randint(2, 99)
        return kind, str(n), [f"{n} \\text{{ cm}}", f"{n}\\text{{ meters}}"], [f"{n + 1} \\text{{ cm}}"]
    n = 10**400 + rng.randint(0, 9)
    return "huge", str(n), [str(n)], [str(n + 1)]


def _completion(rng: random.Random, answer: str) -> str:
    reasoning = rng.choice(["Let me work through this step by step. ", "First simplify, then compute. ", ""])
    shape = rng.random()
    if shape < 0.70:
        return f"{reasoning}So the final answer is $\\boxed{{{answer}}}$."
    if shape < 0.80:
        return f"{reasoning}\nAnswer: ${answer}$"
    if shape < 0.85:
        return f"{reasoning}First I thought \\boxed{{0}}, but no: \\boxed{{{answer}}}."
    if shape < 0.92:
        return f"{reasoning}It is {answer}"
    return f"{reasoning}I am not sure how to finish this."


def make_pairs(problems: int, group: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(problems):
        kind, gold, right, wrong = _forms(rng)
        for _ in range(group):
            roll = rng.random()
            if roll < 0.03:
                completion = "So the answer is \\boxed{\\frac{1}{}}."  # malformed LaTeX
            elif roll < 0.05:
                completion = f"So the answer is \\boxed{{{gold}"  # cut off
            else:
                completion = _completion(rng, rng.choice(right if roll < 0.6 else wrong))
            pairs.append(Pair(kind, gold, completion))
    return pairs


def math_verify_direct(pairs: list[Pair]) -> tuple[list[bool | None], float]:
    """The baseline; `None` where math-verify finds no answer in the completion."""
    from math_verify import parse, verify

    clear_cache()  # sympy's cache: every configuration starts cold on these pairs
    verdicts: list[bool | None] = []
    started = time.perf_counter()
    for pair in pairs:
        target = parse(pair.completion)
        verdicts.append(bool(verify(parse(f"\\boxed{{{pair.gold}}}"), target)) if target else None)
    return verdicts, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--group", type=int, default=8, help="completions per problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="checker worker processes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the best is shown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    pairs = make_pairs(args.problems, args.group, args.seed)
    tasks = [{"answer": p.gold} for p in pairs]
    completions = [p.completion for p in pairs]
    print(f"{len(pairs)} pairs ({args.problems} problems x {args.group}), kinds: "
          f"{dict(sorted(Counter(p.kind for p in pairs).items()))}")

    # Every configuration is warmed on other pairs first (lazy imports inside sympy and latex2sympy, as in
    # a long training run), then timed on these pairs from cold caches.
    warm_pairs = make_pairs(args.problems, args.group, args.seed + 1000)
    warm_tasks, warm_completions = [{"answer": p.gold} for p in warm_pairs], [p.completion for p in warm_pairs]
    math_verify_direct(warm_pairs)
    # Best of `--repeat`, each with a new worker pool (start-up not timed) and empty verdict caches.
    baseline, baseline_seconds = min((math_verify_direct(pairs) for _ in range(args.repeat)), key=lambda r: r[1])
    startups: list[float] = []

    def run(make_checker: Callable[[CheckerPool], MathChecker], serial: bool = False, twice: bool = False
            ) -> tuple[list[str], float]:
        best: tuple[list[str], float] | None = None
        for _ in range(args.repeat):
            pool = CheckerPool(max_workers=args.workers)
            started = time.perf_counter()
            pool.warm_up(args.workers)
            startups.append(time.perf_counter() - started)
            warm = MathEnvironment(checker=make_checker(pool))
            # Inline checks must stay on the main thread (their budget is a signal): warm them serially.
            warm.evaluate(warm_tasks, warm_completions, max_workers=1 if warm.checker.mode == "inline" else None)
            _parse_gold.cache_clear()  # the inline checker's caches live in this process
            clear_cache()
            env = MathEnvironment(checker=make_checker(pool))
            if twice:
                env.evaluate(tasks, completions)
            started = time.perf_counter()
            if serial:
                results = [env.score(t, c) for t, c in zip(tasks, completions, strict=True)]
            else:
                results = env.evaluate(tasks, completions)
            seconds = time.perf_counter() - started
            pool.close()
            if best is None or seconds < best[1]:
                best = ([f.details.get("verdict", "error") for f in results], seconds)
        assert best is not None
        return best

    ours, evaluate_seconds = run(lambda pool: MathChecker(pool=pool))
    rows = [
        ("math-verify directly (main thread)", baseline_seconds),
        (f"math env, evaluate (threads + {args.workers} workers)", evaluate_seconds),
        ("math env, serial score() via workers", run(lambda pool: MathChecker(pool=pool), serial=True)[1]),
        ("math env, serial score(), inline mode", run(lambda pool: MathChecker(mode="inline"), serial=True)[1]),
        ("math env, evaluate, fast path off", run(lambda pool: MathChecker(pool=pool, fast_path=False))[1]),
        ("math env, evaluate again (verdict cache)", run(lambda pool: MathChecker(pool=pool), twice=True)[1]),
    ]
    print(f"worker start-up (not timed): {min(startups):.2f}-{max(startups):.2f} s for {args.workers} workers; "
          f"best of {args.repeat} runs each")
    print(f"{'':44} {'seconds':>8} {'checks/s':>9} {'vs direct':>9}")
    for label, seconds in rows:
        print(f"{label:44} {seconds:8.3f} {len(pairs) / seconds:9.0f} {baseline_seconds / seconds:8.1f}x")

    print(f"our verdicts: {dict(sorted(Counter(ours).items()))}")
    both = [(b, o, p) for b, o, p in zip(baseline, ours, pairs, strict=True)
            if b is not None and o not in ("no_answer", "checker_timeout", "checker_error")]
    agree = [(b, o, p) for b, o, p in both if b == (o in ("correct", "format"))]
    print(f"agreement where both answer: {len(agree)}/{len(both)} = {100 * len(agree) / max(1, len(both)):.1f}% "
          f"(math-verify found no answer in {sum(b is None for b in baseline)}, we found none or abstained in "
          f"{sum(o in ('no_answer', 'checker_timeout', 'checker_error') for o in ours)})")
    reasons = Counter(_why(p, o) for b, o, p in both if (b, o, p) not in agree)
    by_design = sum(n for reason, n in reasons.items() if reason != "other")
    same_rules = len(both) - by_design
    print(f"agreement where both answer, leaving out the {by_design} pairs where the rules differ by design: "
          f"{len(agree)}/{same_rules} = {100 * len(agree) / max(1, same_rules):.1f}%")
    for reason, n in reasons.most_common():
        print(f"  {n:3d} x {DESIGN_DIFFERENCES.get(reason, 'unexplained')}")
    for b, o, p in [x for x in both if x not in agree and _why(x[2], x[1]) == "other"][:10]:
        print(f"  disagree [{p.kind}] gold={p.gold[:40]!r} completion={p.completion[-70:]!r}: "
              f"math-verify={b} ours={o}")


DESIGN_DIFFERENCES = {
    "several_boxes": "several boxes: math-verify joins them (\\boxed{0} ... \\boxed{482} -> '0,482' -> 0.482); "
                     "we take the last",
    "unclosed_box": "unclosed \\boxed{: math-verify reads what is there; we say the answer was cut off (truncated)",
}


def _why(pair: Pair, ours: str) -> str:
    if pair.completion.count("\\boxed{") > 1:
        return "several_boxes"
    if ours == "truncated":
        return "unclosed_box"
    return "other"

if __name__ == "__main__":
    main()

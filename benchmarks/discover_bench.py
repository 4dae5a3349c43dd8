"""Test-time SDPO (`sdpo_core.app.discover`) against best-of-k (and multi-turn retrying) on problems the demo model
rarely solves.

    python benchmarks/discover_bench.py                       # select, then 3 seeds x {sdpo, best_of_k}
    python benchmarks/discover_bench.py --resume              # finish an interrupted benchmark
    python benchmarks/discover_bench.py --methods sdpo,best_of_k,multi_turn --budget 64 --problems 30

1. **Selection, before any SDPO result exists.** The first `--candidates` rows of the math environment's own
   generator (`--difficulty`, seed `--selection_seed`), each distinct question once, are each sampled
   `--selection_samples` times with the run's sampling settings; a problem's sampled accuracy is the fraction
   of correct samples. The `--problems` problems kept are those with an accuracy above 0 and at most
   `--max_accuracy`, lowest first (a problem never solved in the selection samples may be unsolvable for this
   model within any budget; one solved often is not hard; `--keep_unsolved` fills up with never-solved ones).
   The measurement is saved after every problem (`<work_dir>/selection.json`) and reused by `--resume`, which
   may also add `--candidates`. One torch thread by default (`--threads`): on a shared machine, more threads
   spin-wait and run several times slower.
2. **Runs.** For each seed and method, `discover` on the selected problems with the same budget and `k`; each
   problem's result is appended to `<work_dir>/<method>-<seed>.jsonl` as soon as it is known.
3. **Results.** `benchmarks/results/discover.json`: method -> seed -> list of `{problem_id, solved, attempts}`;
   `benchmarks/results/discover_run.json`: the settings, the selection, per-method summaries (median attempts
   to the first success, discovery@k, SDPO updates by teacher signal) and the seconds each method and seed
   took (summed over its problems, so that a resumed run counts them all); `docs/img/discover.png`: discovery@k
   of every method, pooled over seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "discover.json"
RUN_RESULTS = REPO / "benchmarks" / "results" / "discover_run.json"
PLOT = REPO / "docs" / "img" / "discover.png"


def select_problems(accuracies: dict[str, float], count: int, max_accuracy: float,
                    keep_unsolved: bool = False) -> list[str]:
    """The `count` ids with accuracy in (0, max_accuracy], lowest accuracy first (ties in id order); with
    `keep_unsolved`, then those never solved in the selection samples."""
    eligible = sorted((pid for pid, acc in accuracies.items() if 0 < acc <= max_accuracy),
                      key=lambda pid: (accuracies[pid], pid))
    if keep_unsolved:
        eligible += sorted(pid for pid, acc in accuracies.items() if acc == 0)
    return eligible[:count]


def measure_accuracy(model: Any, tokenizer: Any, env: Any, tasks: list[dict[str, Any]], samples: int,
                     settings: Any, seed: int, file: Path, measured: dict[str, Any]) -> dict[str, float]:
    """Sampled accuracy of each task, saved to `file` after every task (so an interrupted selection resumes)."""
    from tqdm.auto import tqdm

    from sdpo_core.app.evaluation import generate_completions, is_solved

    accuracies: dict[str, float] = measured["accuracy"]
    for task in tqdm([t for t in tasks if t["id"] not in accuracies], desc="selection", unit="problem"):
        started = time.monotonic()
        (completions,) = generate_completions(model, tokenizer, [task["prompt"]], num_samples=samples,
                                              max_new_tokens=settings.max_completion_length,
                                              temperature=settings.temperature, top_p=settings.top_p,
                                              batch_size=1, seed=seed)
        results = env.evaluate([task] * samples, completions)
        accuracies[task["id"]] = sum(is_solved(r, settings.success_threshold) for r in results) / samples
        measured["seconds"] = round(measured.get("seconds", 0.0) + time.monotonic() - started, 1)
        file.write_text(json.dumps(measured, indent=2))
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="sdpo,best_of_k", help="comma-separated: sdpo, best_of_k, multi_turn")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=16, help="attempts per problem")
    parser.add_argument("--k", type=int, default=4, help="attempts per round")
    parser.add_argument("--problems", type=int, default=20, help="problems to keep")
    parser.add_argument("--candidates", type=int, default=60, help="problems whose sampled accuracy is measured")
    parser.add_argument("--selection_samples", type=int, default=16, help="samples per candidate")
    parser.add_argument("--max_accuracy", type=float, default=0.2, help="hardest kept: sampled accuracy at most")
    parser.add_argument("--keep_unsolved", action="store_true",
                        help="fill up with problems never solved in the selection samples")
    parser.add_argument("--selection_seed", type=int, default=1000)
    parser.add_argument("--difficulty", type=int, default=1,
                        help="math generator difficulty (0: one-digit sums, the demo's, sampled accuracy about 0.3; "
                             "1 adds - and x)")
    parser.add_argument("--max_completion_length", type=int, default=48)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_turns", type=int, default=2, help="turns per multi_turn episode")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine more threads spin-wait; 0: torch's default)")
    parser.add_argument("--model", help="model folder (default: the demo model)")
    parser.add_argument("--results", default=str(RESULTS), help="method -> seed -> per-problem results (JSON)")
    parser.add_argument("--run_results", default=str(RUN_RESULTS), help="settings, selection and summaries (JSON)")
    parser.add_argument("--plot", default=str(PLOT), help="discovery@k plot (PNG)")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "discover_bench"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_core.app.demo_model import resolve_model
    from sdpo_core.app.discover import (
        DiscoverSettings,
        append_result,
        discover,
        discovery_curve,
        load_results,
        plan_rounds,
        summarize,
    )
    from sdpo_core.app.discover_cli import format_table, plot_discovery, summary_rows
    from sdpo_envs import make

    plan_rounds(args.budget, args.k)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work_dir)
    if work.exists() and any(work.iterdir()) and not args.resume:
        raise SystemExit(f"{work} holds an earlier run: pass --resume, or another --work_dir")
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the demo model ignores \boxed{}: a right final number is a success
    env = make("math", difficulty=args.difficulty, unformatted_scale=1.0, size=args.candidates,
               seed=args.selection_seed)
    settings = {"max_completion_length": args.max_completion_length, "learning_rate": args.learning_rate,
                "max_turns": args.max_turns, "temperature": 1.0}
    # the generator repeats questions (one-digit sums: 100 distinct); keep each once
    first_of_each: dict[str, dict[str, Any]] = {}
    assert env.dataset is not None  # the math environment has its own problem set
    for row in env.dataset().to_list():
        first_of_each.setdefault(row["question"], row)
    candidates = list(first_of_each.values())

    selection_file = work / "selection.json"
    # not the number of candidates: row i of the generator depends only on (seed, i), so --resume with more
    # --candidates measures only the new ones
    selection_settings = {"difficulty": args.difficulty, "samples": args.selection_samples,
                          "seed": args.selection_seed, **settings}
    selection = json.loads(selection_file.read_text()) if selection_file.exists() else \
        {"settings": selection_settings, "accuracy": {}}
    selection["settings"].pop("candidates", None)
    if selection["settings"] != selection_settings:
        raise SystemExit(f"{selection_file} was measured with {selection['settings']}, not {selection_settings}")
    measure_accuracy(model, tokenizer, env, candidates, args.selection_samples, DiscoverSettings(**settings),
                     seed=args.selection_seed, file=selection_file, measured=selection)
    chosen = select_problems(selection["accuracy"], args.problems, args.max_accuracy, args.keep_unsolved)
    if not chosen:
        raise SystemExit(f"no candidate has a sampled accuracy in (0, {args.max_accuracy}]: raise --candidates "
                         "(with --resume) or --max_accuracy")
    print(f"selected {len(chosen)} problems with sampled accuracy in (0, {args.max_accuracy}] of {args.candidates}")
    if len(chosen) < args.problems:
        print(f"only {len(chosen)} of the {args.problems} problems asked for: raise --candidates (with --resume)")
    tasks = [t for t in candidates if t["id"] in set(chosen)]

    seconds: dict[str, dict[str, float]] = {m: {} for m in methods}
    results: dict[str, dict[str, list[Any]]] = {m: {} for m in methods}
    for seed in seeds:
        for method in methods:
            file = work / f"{method}-{seed}.jsonl"
            done = load_results(file)
            discover(model, tokenizer, env, tasks, budget=args.budget, k=args.k, method=method,
                     settings=DiscoverSettings(**settings, seed=seed), skip={r.problem_id for r in done},
                     on_result=functools.partial(append_result, file))
            results[method][str(seed)] = load_results(file)
            # from the per-problem times, so that a resumed run still reports what the whole run cost
            seconds[method][str(seed)] = round(sum(r.seconds for r in results[method][str(seed)]), 1)
            print(f"seed {seed} {method}: {summarize(results[method][str(seed)])}", flush=True)
    env.close()

    table = {m: {s: [{"problem_id": r.problem_id, "solved": r.solved, "attempts": r.attempts} for r in rs]
                 for s, rs in by_seed.items()} for m, by_seed in results.items()}
    Path(args.results).write_text(json.dumps(table, indent=1))
    pooled = {m: [r for rs in by_seed.values() for r in rs] for m, by_seed in results.items()}
    points = sorted({*range(args.k, args.budget + 1, args.k), 1})
    summary = {m: {**summarize(rs),
                   "median_attempts_by_seed": {s: summarize(x)["median_attempts"] for s, x in results[m].items()},
                   "solved_by_seed": {s: sum(r.solved for r in x) for s, x in results[m].items()},
                   "discovery": dict(zip(points, discovery_curve(rs, points), strict=True)),
                   "mean_seconds_per_problem": statistics.mean(r.seconds for r in rs)}
               for m, rs in pooled.items()}
    Path(args.run_results).write_text(json.dumps({"settings": {**vars(args), **settings}, "model": str(path),
                                       "selection": {"chosen": chosen, **selection}, "summary": summary,
                                       "seconds": seconds}, indent=1, default=str))
    plot_discovery(pooled, args.budget, args.k, Path(args.plot),
                   title=f"{len(chosen)} math problems x {len(seeds)} seeds, k={args.k}")
    print(format_table(summary_rows(pooled, args.budget, args.k)))
    print(f"results: {args.results}, {args.run_results}; plot: {args.plot}")


if __name__ == "__main__":
    main()

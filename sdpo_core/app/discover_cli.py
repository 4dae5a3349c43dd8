"""`sdpo discover`: test-time SDPO (and its baselines) on problems from a file or an environment.

    sdpo discover --env math --task problems.jsonl --budget 256 --k 8 --baseline best_of_k --output_dir out

Writes `results.jsonl` (one line per method and problem, as soon as it is known), `run.json` (the
settings, checked by `--resume`), `summary.json` and `discovery.png` (discovery@k, every method on the
same axes) into `--output_dir`, and prints a summary table. The library is `sdpo_core.discover`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdpo_core.app.discover import (
    METHODS,
    DiscoverSettings,
    ProblemResult,
    append_result,
    discovery_curve,
    load_results,
    plan_rounds,
    problem_id,
    summarize,
)
from sdpo_core.app.runs import (
    CLIError,
    _report_errors,
    build_environment,
    environment_rows,
    load_dataset_spec,
    parse_env_args,
)

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "discovery.png"
# settings a resumed run must share with the interrupted one, or its results would not be comparable
_RESUME_KEYS = ("env", "env_kwargs", "task", "num_tasks", "model", "budget", "k", "seed", "max_completion_length",
                "temperature", "learning_rate", "max_turns", "use_peft", "success_threshold")


def summary_rows(by_method: Mapping[str, Sequence[ProblemResult]], budget: int, k: int) -> list[list[str]]:
    """One table row per method: solved, median attempts, discovery@k at k, budget/4, budget/2, budget, updates."""
    marks = sorted({k, max(k, budget // 4), max(k, budget // 2), budget})
    rows = []
    for method, results in by_method.items():
        s = summarize(results)
        curve = dict(zip(marks, discovery_curve(results, marks), strict=True))
        median = s["median_attempts"]
        signals = s["update_rounds_by_signal"]
        rows.append([
            method, f"{s['solved']}/{s['problems']}", "-" if math.isinf(median) else f"{median:g}",
            *(f"{curve[m]:.2f}" for m in marks),
            f"{s['updates']} ({signals['demo']}/{signals['feedback']}/{signals['none']})", str(s["errors"]),
        ])
    return [["method", "solved", "median attempts", *(f"disc@{m}" for m in marks),
             "updates (demo/feedback/none)", "errors"], *rows]


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_discovery(by_method: Mapping[str, Sequence[ProblemResult]], budget: int, k: int, path: Path,
                   title: str = "") -> None:
    """discovery@a (fraction solved within a attempts) against a, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(range(1, budget + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, results in by_method.items():
        if results:
            ax.step(points, discovery_curve(results, points), where="post", label=f"{method} ({len(results)})")
    ax.set_xlabel("attempts")
    ax.set_ylabel("fraction of problems solved")
    ax.set_xlim(1, budget)
    ax.set_ylim(0, 1)
    ax.set_title(title or f"discovery@k, k={k} attempts per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_tasks(args: argparse.Namespace, env: Any) -> list[dict[str, Any]]:
    rows = load_dataset_spec(args.task, config=args.task_config, split=args.task_split) if args.task \
        else environment_rows(env, args.env)
    if args.num_tasks is not None:
        rows = rows.select(range(min(args.num_tasks, len(rows))))
    # a column missing from some rows of a file reads as None there: drop it, so the environment sees it missing
    tasks = [{key: value for key, value in row.items() if value is not None} for row in rows.to_list()]
    if not tasks:
        raise CLIError(f"--task {args.task or '(the environment dataset)'}: no problems")
    ids = [problem_id(task, i) for i, task in enumerate(tasks)]
    if len(set(ids)) != len(ids):
        raise CLIError("problem ids repeat (the 'id' column); --resume needs one id per problem")
    return tasks


def _check_resume(out: Path, run: dict[str, Any], resume: bool) -> list[ProblemResult]:
    results_path, run_path = out / RESULTS_FILE, out / RUN_FILE
    if not resume:
        if results_path.exists():
            raise CLIError(f"{results_path} exists: pass --resume to continue that run, or another --output_dir")
        return []
    if not run_path.exists():
        return []
    before = json.loads(run_path.read_text())
    changed = [key for key in _RESUME_KEYS if before.get(key) != run.get(key)]
    if changed:
        raise CLIError("--resume with other settings than the run in " f"{out}: " + ", ".join(
            f"{key} was {before.get(key)!r}, now {run.get(key)!r}" for key in changed))
    done = load_results(results_path)
    # rewrite without a torn last line, so the next append starts on a line of its own
    results_path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in done))
    return done


def _threshold(value: str) -> float | None:
    if value == "env":
        return None
    try:
        return float(value)
    except ValueError:
        raise CLIError(f"--success_threshold {value!r}: a number or 'env'") from None


def discover_command(args: argparse.Namespace) -> int:
    """`sdpo discover`: see the module docstring."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_core.app.demo_model import resolve_model
    from sdpo_core.app.discover import discover

    methods = list(dict.fromkeys([*([] if args.no_sdpo else ["sdpo"]), *args.baseline]))
    if not methods:
        raise CLIError("--no_sdpo without --baseline: nothing to run")
    try:
        plan_rounds(args.budget, args.k)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        kwargs = json.loads(args.env_kwargs) if args.env_kwargs else {}
    except json.JSONDecodeError as exc:
        raise CLIError(f"--env_kwargs: not valid JSON ({exc})") from None
    kwargs.update(parse_env_args(args.env_arg))
    env = build_environment(args.env, kwargs)
    if "multi_turn" in methods and not env.multi_turn:
        raise CLIError(f"--baseline multi_turn: environment {args.env!r} does not implement respond(), so it "
                       "cannot give feedback between turns")
    tasks = _load_tasks(args, env)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = {"env": args.env, "env_kwargs": kwargs, "task": args.task, "num_tasks": args.num_tasks,
           "model": args.model, "budget": args.budget, "k": args.k, "seed": args.seed,
           "max_completion_length": args.max_completion_length, "temperature": args.temperature,
           "learning_rate": args.learning_rate, "max_turns": args.max_turns, "use_peft": not args.no_peft,
           "success_threshold": args.success_threshold,
           "methods": methods}
    done = _check_resume(out, run, args.resume)
    (out / RUN_FILE).write_text(json.dumps(run, indent=2))
    path = resolve_model(args.model)
    model: Any = AutoModelForCausalLM.from_pretrained(path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = DiscoverSettings(max_completion_length=args.max_completion_length, temperature=args.temperature,
                                learning_rate=args.learning_rate, max_turns=args.max_turns, seed=args.seed,
                                success_threshold=_threshold(args.success_threshold))
    by_method: dict[str, list[ProblemResult]] = {m: [r for r in done if r.method == m] for m in methods}
    todo = sum(len(tasks) - len({r.problem_id for r in by_method[m]}) for m in methods)
    bar = tqdm(total=todo, desc="discover", unit="problem")

    def save(result: ProblemResult) -> None:
        append_result(out / RESULTS_FILE, result)
        by_method[result.method].append(result)
        if result.error:
            bar.write(f"{result.method} problem {result.problem_id}: {result.error}", file=sys.stderr)
        solved = sum(r.solved for r in by_method[result.method])
        bar.set_postfix_str(f"{result.method} solved {solved}/{len(by_method[result.method])}")

    try:
        for method in methods:
            discover(model, tokenizer, env, tasks, budget=args.budget, k=args.k, method=method, settings=settings,
                     peft_config=None if args.no_peft else "default",
                     skip={r.problem_id for r in by_method[method]}, on_result=save, progress=bar)
    finally:
        bar.close()
        env.close()
    rows = summary_rows(by_method, args.budget, args.k)
    print(f"model {path} | environment {args.env} | budget {args.budget}, k={args.k}")
    print(format_table(rows))
    summary = {m: summarize(rs) for m, rs in by_method.items()}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    plot_discovery(by_method, args.budget, args.k, out / PLOT_FILE)
    print(f"results: {out / RESULTS_FILE}; plot: {out / PLOT_FILE}")
    return 0


def add_discover_parser(subparsers: Any) -> None:
    """Register `sdpo discover`."""
    parser = subparsers.add_parser(
        "discover", help="test-time SDPO: solve each problem in as few attempts as possible",
        description="For each problem: rounds of k attempts scored by the environment; after a round without a "
                    "success, one SDPO step (a LoRA adapter) on that problem alone, until it is solved or the "
                    "budget is spent. --baseline adds plain sampling (best_of_k) or retrying with the "
                    "environment's feedback in context (multi_turn) on the same budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--env", required=True, help="registered environment")
    parser.add_argument("--env_kwargs", "--env-kwargs", help="environment keyword arguments as JSON")
    parser.add_argument("--env_arg", "--env-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="one environment keyword argument; repeatable")
    parser.add_argument("--task", help="problems: a file, save_to_disk folder or dataset, as sdpo train's --dataset "
                                       "(default: the environment's dataset())")
    parser.add_argument("--task_config", "--task-config", help="hub dataset configuration")
    parser.add_argument("--task_split", "--task-split", default="train", help="dataset split")
    parser.add_argument("--num_tasks", "--num-tasks", type=int, help="only the first N problems")
    parser.add_argument("--model", help="model folder, .gguf file or hub id (default: the demo model)")
    parser.add_argument("--budget", type=int, default=256, help="attempts per problem (a multiple of --k)")
    parser.add_argument("--k", type=int, default=8, help="attempts per round")
    parser.add_argument("--baseline", action="append", default=[], choices=[m for m in METHODS if m != "sdpo"],
                        help="also run this baseline on the same problems; repeatable")
    parser.add_argument("--no_sdpo", "--no-sdpo", action="store_true", help="run only the baselines")
    parser.add_argument("--max_turns", "--max-turns", type=int, default=4, help="turns per multi_turn episode")
    parser.add_argument("--max_completion_length", "--max-completion-length", type=int, default=256,
                        help="tokens per attempt")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--learning_rate", "--learning-rate", type=float, default=1e-4, help="SDPO step size")
    parser.add_argument("--success_threshold", "--success-threshold", default="1.0",
                        help="reward at which an attempt counts as solved, or 'env' for the environment's own "
                             "success flag")
    parser.add_argument("--no_peft", "--no-peft", action="store_true",
                        help="update every weight instead of a LoRA adapter")
    parser.add_argument("--seed", type=int, default=0, help="sampling and training seed")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="where results and the plot go")
    parser.set_defaults(func=_report_errors(discover_command))


__all__ = ["add_discover_parser", "discover_command", "format_table", "plot_discovery",
           "summary_rows"]

"""The embedded demo (`sdpo train` with its defaults) against its GRPO twin, same budget, over seeds.

    python benchmarks/demo_compare.py                          # 3 seeds x {SDPO, GRPO}, one run at a time
    python benchmarks/demo_compare.py --jobs 2                 # two runs at once, one CPU thread each (2 cores)
    python benchmarks/demo_compare.py --resume                 # finish an interrupted benchmark
    python benchmarks/demo_compare.py --variants guarded,paper,grpo   # the guarded preset, the paper's SDPO, GRPO
    python benchmarks/demo_compare.py --max_steps 60 --preset reference_lcb   # other flags go to `sdpo train`

Each (variant, seed) pair is one `sdpo train --seed S` subprocess (GRPO adds `--no_enabled`, guarded
`--preset guarded`, see `VARIANTS`; every other flag the benchmark does not know is passed through), so a run's
numbers are exactly what a user of `sdpo train` sees:
held-out accuracy (greedy, on distinct prompts never trained on) before training, every `--eval_every` steps and
after, and the per-step metrics of `metrics.jsonl`. Runs go seed-major (both variants of seed 0 first), `--jobs`
at a time, with the CPU cores split between them (`OMP_NUM_THREADS`); checkpoints are off (`--save_strategy no`)
unless a `--save_strategy` is passed.

After every finished run the results file is rewritten, so an interrupted benchmark keeps what it finished and
`--resume` runs only the missing pairs (with the same `sdpo train` flags; other flags are an error). The file:

    {"sdpo_train_args": [...], "seeds": [0, 1, 2], ...,
     "runs": {"sdpo": {"0": {"steps": [{"step": 1, "reward": .., "entropy": .., "heldout_accuracy": null}, ..],
                             "heldout_before": .., "heldout_after": .., "wall_seconds": .., ...}, ..},
              "grpo": {...}},
     "failed": {"sdpo": {"1": "the end of its log"}}}

Each run also keeps `diagnostics`: per-step lists (aligned with `steps`) of the signals in `DIAGNOSTICS`, `null`
where the run did not log one.
`heldout_accuracy` is set at the steps that were evaluated (the last one is the evaluation after training) and
`null` elsewhere; `heldout_before` is step 0. The plot draws, per variant, the mean over seeds (thick) and each
seed (thin): held-out accuracy, sampled reward and entropy (both as running means of 5 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# "sdpo" is the demo as it is (its SDPO runs use the `guarded_sharp` preset); "guarded" is the guarded preset (half
# GRPO's loss, a slow EMA teacher), "paper" SDPOConfig() (the paper's SDPO), "sharp_teacher" the paper's SDPO with
# the teacher's logits divided by 0.9 (where benchmarks/tail_bias.py finds the pull on the student's entropy about
# neutral), "guarded_sharp" the guarded preset with that teacher (the settings of the `guarded_sharp` preset, spelled
# out as the recorded runs ran them), "grpo" the GRPO twin.
VARIANTS: dict[str, list[str]] = {"sdpo": [], "guarded": ["--preset", "guarded"], "paper": ["--preset", "paper"],
                                  "sharp_teacher": ["--preset", "paper", "--teacher_temperature", "0.9"],
                                  "guarded_sharp": ["--preset", "guarded", "--teacher_temperature", "0.9"],
                                  "grpo": ["--no_enabled"]}
DEFAULT_VARIANTS = ("sdpo", "grpo")
LABELS = {"sdpo": "SDPO", "guarded": "SDPO, guarded preset", "paper": "SDPO, paper settings",
          "sharp_teacher": "SDPO, paper settings, teacher temperature 0.9",
          "guarded_sharp": "SDPO, guarded_sharp preset (guarded, teacher temperature 0.9)", "grpo": "GRPO"}
COLORS = {"sdpo": "tab:red", "guarded": "tab:orange", "paper": "tab:purple", "sharp_teacher": "tab:green",
          "guarded_sharp": "tab:olive", "grpo": "tab:blue"}
SMOOTHING = 5
# per-step signals kept beside reward and entropy (None where a run did not log them, e.g. GRPO's teacher entropy)
DIAGNOSTICS = ("completions/mean_length", "frac_reward_zero_std", "sdpo/teacher_entropy",
               "sdpo/student_entropy_trained", "sdpo/demo_copy_overlap", "sdpo/teacher_drift", "grad_norm")


# ------------------------------------------------------------------------------------------ one run
def run_points(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's `metrics.jsonl` records as the results file keeps them (see the module docstring)."""
    from sdpo_core.app.callbacks import HELDOUT_ACCURACY, HELDOUT_ERROR, evaluation_records, training_records

    evaluations = {int(r["step"]): r for r in evaluation_records(records)}
    steps = [{"step": int(r["step"]), "reward": r.get("reward"), "entropy": r.get("entropy"),
              "heldout_accuracy": evaluations.get(int(r["step"]), {}).get(HELDOUT_ACCURACY)}
             for r in training_records(records)]
    last = steps[-1]["step"] if steps else None
    end: dict[str, Any] = next((r for r in reversed(records) if "train_runtime" in r), {})
    return {
        "steps": steps,
        "diagnostics": {key: [r.get(key) for r in training_records(records)] for key in DIAGNOSTICS},
        "heldout_before": evaluations.get(0, {}).get(HELDOUT_ACCURACY),
        "heldout_after": evaluations.get(last, {}).get(HELDOUT_ACCURACY) if last is not None else None,
        "heldout_errors": {str(s): r[HELDOUT_ERROR] for s, r in evaluations.items() if HELDOUT_ERROR in r},
        "eval_seconds": round(sum(r.get("heldout/seconds", 0.0) for r in evaluations.values()), 1),
        "train_runtime": end.get("train_runtime"),
        "mean_length": _mean([r.get("completions/mean_length") for r in training_records(records)]),
    }


def _run(variant: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """One `sdpo train` subprocess; its results, or the end of its log when it fails."""
    from sdpo_core.app.callbacks import METRICS_FILE, read_metrics

    name = f"{variant}-seed{seed}"
    output_dir = args.out_dir / "runs" / name
    log = args.out_dir / "logs" / f"{name}.log"
    shutil.rmtree(output_dir, ignore_errors=True)  # a run cut short earlier starts again from nothing
    command = [sys.executable, "-m", "sdpo_core.app.cli", "train", *extra, *VARIANTS[variant], "--seed", str(seed),
               "--output_dir", str(output_dir), "--disable_tqdm", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.monotonic()
    with log.open("w") as handle:
        try:
            code: int | str = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                             timeout=args.run_timeout, cwd=args.out_dir).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = round(time.monotonic() - start, 1)
    if code != 0:
        return {"error": f"exit {code} after {seconds} s\n" + log.read_text()[-3000:]}
    return {**run_points(read_metrics(output_dir / METRICS_FILE)), "wall_seconds": seconds}


# ------------------------------------------------------------------------------------------ results
def _mean(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(numbers) if numbers else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_lines(results: dict[str, Any], window: int = SMOOTHING) -> list[str]:
    """Per run and per variant (mean over seeds): held-out before -> after, reward and entropy over the first and
    last `window` steps, mean completion length and wall time."""
    width = max([len(LABELS[v]) + len(" seed 00") for v in results["runs"]] + [len("run")]) + 2
    head = (f"{'run':<{width}}{'held-out before -> after':>26}{'reward first -> last ' + str(window):>26}"
            f"{'entropy first -> last ' + str(window):>27}{'length':>8}{'wall s':>8}")
    lines = [head]
    for variant, seeds in results["runs"].items():
        rows: list[tuple[Any, ...]] = []
        for seed, run in sorted(seeds.items(), key=lambda item: int(item[0])):
            reward = [p["reward"] for p in run["steps"]]
            entropy = [p["entropy"] for p in run["steps"]]
            rows.append((f"{LABELS[variant]} seed {seed}", run["heldout_before"], run["heldout_after"],
                         _mean(reward[:window]), _mean(reward[-window:]), _mean(entropy[:window]),
                         _mean(entropy[-window:]), run["mean_length"], run["wall_seconds"]))
        if len(rows) > 1:
            rows.append((f"{LABELS[variant]} mean", *(_mean([r[i] for r in rows]) for i in range(1, 9))))
        for name, before, after, r0, r1, e0, e1, length, wall in rows:
            lines.append(f"{name:<{width}}{_fmt(before) + ' -> ' + _fmt(after):>26}{_fmt(r0) + ' -> ' + _fmt(r1):>26}"
                         f"{_fmt(e0) + ' -> ' + _fmt(e1):>27}{_fmt(length, 1):>8}{_fmt(wall, 0):>8}")
    for variant, seeds in results.get("failed", {}).items():
        for seed, error in seeds.items():
            lines.append(f"FAILED {LABELS[variant]} seed {seed}: {error.strip().splitlines()[-1][:200]}")
    return lines


def _rolling(values: list[float | None], window: int) -> list[float | None]:
    return [_mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Held-out accuracy, sampled reward and entropy per step: mean over seeds (thick), each seed (thin)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    figure = Figure(figsize=(13, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    for variant, seeds in results["runs"].items():
        color = COLORS[variant]
        curves: dict[str, list[dict[int, float]]] = {"heldout": [], "reward": [], "entropy": []}
        for run in seeds.values():
            heldout = {0: run["heldout_before"]} if run["heldout_before"] is not None else {}
            heldout |= {p["step"]: p["heldout_accuracy"] for p in run["steps"] if p["heldout_accuracy"] is not None}
            curves["heldout"].append(heldout)
            for key in ("reward", "entropy"):
                steps = [p["step"] for p in run["steps"]]
                smooth = _rolling([p[key] for p in run["steps"]], SMOOTHING)
                curves[key].append({s: v for s, v in zip(steps, smooth, strict=True) if v is not None})
        for axis, key in zip(axes, ("heldout", "reward", "entropy"), strict=True):
            for curve in curves[key]:
                axis.plot(sorted(curve), [curve[s] for s in sorted(curve)], color=color, alpha=0.3, linewidth=1,
                          marker="o" if key == "heldout" else None, markersize=2)
            steps = sorted({s for curve in curves[key] for s in curve})
            mean = [_mean([curve.get(s) for curve in curves[key]]) for s in steps]
            axis.plot(steps, mean, color=color, linewidth=2.2, marker="o" if key == "heldout" else None,
                      label=f"{LABELS[variant]}, mean of {len(seeds)} seed(s)")
    titles = ("held-out accuracy (greedy)", f"sampled reward ({SMOOTHING}-step mean)",
              f"entropy, nats ({SMOOTHING}-step mean)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set(title=title, xlabel="step")
        axis.grid(alpha=0.3)
    if axes[0].has_data():  # one legend for the three panels, below them, so long labels cover no curve
        figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any other flag is passed to every `sdpo train` run.")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (0, 1, ...)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads per run (default: the cores divided among the jobs; 0: let "
                             "sdpo train fit them to the idle cores)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/sdpo_demo_compare"),
                        help="where the runs' folders and logs go")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results/demo_compare.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs/img/demo_compare.png")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of --results, run the rest")
    parser.add_argument("--run-timeout", type=float, default=3600, help="seconds before a run is killed")
    args, extra = parser.parse_known_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not any(arg.split("=", 1)[0] == "--save_strategy" for arg in extra):
        extra += ["--save_strategy", "no"]
    args.out_dir = args.out_dir.resolve()
    for sub in ("runs", "logs"):
        (args.out_dir / sub).mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {"sdpo_train_args": extra, "seeds": list(range(args.seeds)), "jobs": args.jobs,
                               "threads_per_run": args.threads, "runs": {}, "failed": {}}
    if args.resume and args.results.is_file():
        previous = json.loads(args.results.read_text())
        if previous.get("sdpo_train_args") != extra:
            parser.error(f"--resume: {args.results} was made with sdpo train flags {previous.get('sdpo_train_args')}"
                         f", not {extra}; pass the same flags or another --results file")
        results["runs"] = previous.get("runs", {})
    done = {(variant, int(seed)) for variant, seeds in results["runs"].items() for seed in seeds}
    order = [(variant, seed) for seed in range(args.seeds) for variant in variants if (variant, seed) not in done]
    print(f"sdpo train {' '.join(extra)}: {len(order)} run(s) to go ({len(done)} kept), {args.jobs} at a time, "
          f"{args.threads or 'fitted'} thread(s) each; runs in {args.out_dir}", flush=True)
    started = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own process; the threads only wait for them
        futures = {pool.submit(_run, variant, seed, args, extra): (variant, seed) for variant, seed in order}
        for future in as_completed(futures):
            variant, seed = futures[future]
            outcome = future.result()
            if "error" in outcome:
                results["failed"].setdefault(variant, {})[str(seed)] = outcome["error"]
                status = "FAILED: " + outcome["error"].splitlines()[0]
            else:
                results["runs"].setdefault(variant, {})[str(seed)] = outcome
                status = (f"held-out {_fmt(outcome['heldout_before'])} -> {_fmt(outcome['heldout_after'])} "
                          f"({outcome['wall_seconds']:.0f} s)")
            print(f"[{time.monotonic() - started:6.0f} s] {LABELS[variant]} seed {seed}: {status}", flush=True)
            results["total_seconds"] = round(time.monotonic() - started, 1)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(["", *summary_lines(results)]))
    if results["runs"] and plot(results, args.plot):
        print(f"results: {args.results}; plot: {args.plot}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

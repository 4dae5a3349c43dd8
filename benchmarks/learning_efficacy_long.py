"""The long-horizon study: does SDPO keep its early lead over GRPO for 64 steps, and do the guarded presets?

    python benchmarks/learning_efficacy_long.py --jobs 2            # 3 seeds x {GRPO, SDPO, guarded_sharp}, 64 steps
    python benchmarks/learning_efficacy_long.py --jobs 2 --variants guarded --resume   # add the guarded preset
    python benchmarks/learning_efficacy_long.py --jobs 2 --resume   # finish an interrupted study
    python benchmarks/learning_efficacy_long.py --report            # targets and plot, from the results files alone
    python benchmarks/learning_efficacy_long.py --steps 400 --eval-every 25 --jobs 1 --bf16 true --model PATH  # a GPU

Every run is the embedded demo (`sdpo train`: SmolLM2-135M-Instruct on generated one-digit sums, 8 completions
of at most 48 tokens per step, greedy evaluation on 48 distinct held-out prompts that never occur in training)
with `--max_steps` and `--eval_every` set by this study; the variants differ only in their preset: `grpo` is
`--no_enabled` (TRL's GRPO loss), `paper` is `SDPOConfig()` (the paper's SDPO), `guarded` the guarded preset,
`guarded_sharp` the guarded preset with a sharper teacher (the `guarded_sharp` preset, the demo's recipe).
The runs go through `benchmarks/demo_compare.py` (its `--jobs`, `--resume`, per-run subprocesses and raw results
file with every step's reward, entropy and diagnostics: `learning_efficacy_long_runs.json`); this script then
writes the study's own file, `benchmarks/results/learning_efficacy_long.json`:

    {"curves": {variant: {seed: [{"step": 0, "heldout_accuracy": ..}, {"step": 8, ..}, ..]}},
     "targets": {guarded variant: {...}}, "total_seconds": .., "run_seconds": {variant: {seed: ..}},
     "steps": 64, "eval_every": 8}

(`total_seconds` is the wall time of the last invocation; after a `--resume`, the runs' own `run_seconds` tell
what the whole study cost.)

and prints the study's three targets for each guarded variant (`guarded`, `guarded_sharp`), checked from the curves
alone (see `study_targets`). Other flags are passed to every `sdpo train` run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks/results"
VARIANTS = ("grpo", "paper", "guarded", "guarded_sharp")
DEFAULT_VARIANTS = ("grpo", "paper", "guarded_sharp")  # the grid of the two-hour budget; `guarded` on request
BASELINE, GUARDED = "grpo", ("guarded", "guarded_sharp")  # the targets are checked for each guarded recipe
TIE = 1e-9  # means of the same counts summed in another order differ in the last bits: equal is not below


def _demo_compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_compare", Path(__file__).with_name("demo_compare.py"))
    assert spec is not None  # a .py path always gets a spec, with a source loader
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def heldout_curves(raw: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """variant -> seed -> the evaluated steps of that run, step 0 (before training) first."""
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for variant, seeds in raw.get("runs", {}).items():
        for seed, run in seeds.items():
            before = run["heldout_before"]
            points = [{"step": 0, "heldout_accuracy": before}] if before is not None else []
            points += [{"step": p["step"], "heldout_accuracy": p["heldout_accuracy"]}
                       for p in run["steps"] if p["heldout_accuracy"] is not None]
            curves.setdefault(variant, {})[seed] = points
    return curves


def mean_curve(seeds: dict[str, list[dict[str, Any]]]) -> dict[int, float]:
    """step -> mean held-out accuracy over the seeds evaluated at that step."""
    values: dict[int, list[float]] = {}
    for points in seeds.values():
        for p in points:
            values.setdefault(p["step"], []).append(p["heldout_accuracy"])
    return {step: statistics.fmean(v) for step, v in sorted(values.items())}


def largest_fall_below_peak(points: list[dict[str, Any]]) -> float:
    """How far the run's accuracy ever fell below its own best earlier (or equal) evaluation."""
    peak, fall = float("-inf"), 0.0
    for p in points:
        peak = max(peak, p["heldout_accuracy"])
        fall = max(fall, peak - p["heldout_accuracy"])
    return fall


def study_targets(curves: dict[str, dict[str, list[dict[str, Any]]]], guarded: str = "guarded", from_step: int = 8,
                  max_fall: float = 0.1) -> dict[str, Any]:
    """The study's targets for one guarded variant against GRPO, from the held-out curves:

    - `at_or_above_grpo`: the variant's mean is >= GRPO's mean at every evaluation from `from_step` on
      (`below_at` lists the steps where it is not);
    - `half_the_steps`: the first evaluated step at which the variant's mean reaches GRPO's final mean is at most
      half of the last step;
    - `no_seed_falls`: no seed of the variant falls more than `max_fall` below its own peak (`fall_per_seed`).
    """
    if BASELINE not in curves or guarded not in curves:
        return {"complete": False, "missing": [v for v in (BASELINE, guarded) if v not in curves]}
    grpo, ours = mean_curve(curves[BASELINE]), mean_curve(curves[guarded])
    shared = [s for s in ours if s in grpo and s >= from_step]
    below = [s for s in shared if ours[s] < grpo[s] - TIE]
    last = max(grpo)
    reached = next((s for s in ours if ours[s] >= grpo[last] - TIE), None)
    falls = {seed: round(largest_fall_below_peak(points), 4) for seed, points in curves[guarded].items()}
    return {
        "complete": True,
        "steps_compared": shared,
        "at_or_above_grpo": not below,
        "below_at": below,
        "grpo_final_mean": grpo[last],
        "reaches_grpo_final_at": reached,
        "half_the_steps": reached is not None and reached <= last / 2,
        "fall_per_seed": falls,
        "no_seed_falls": all(f <= max_fall for f in falls.values()),
    }


def report_lines(curves: dict[str, dict[str, list[dict[str, Any]]]],
                 targets: dict[str, dict[str, Any]]) -> list[str]:
    """The mean held-out curve of each variant (seeds in brackets) and each guarded variant's targets, as printed
    lines."""
    steps = sorted({p["step"] for seeds in curves.values() for points in seeds.values() for p in points})
    lines = [f"{'held-out accuracy':<26}" + "".join(f"{s:>7}" for s in steps)]
    for variant, seeds in curves.items():
        mean = mean_curve(seeds)
        lines.append(f"{variant + ' (' + str(len(seeds)) + ' seeds)':<26}"
                     + "".join(f"{mean[s]:>7.3f}" if s in mean else f"{'-':>7}" for s in steps))
    for variant, checked in targets.items():
        if not checked.get("complete"):
            lines.append(f"{variant} targets: not checked, missing {checked.get('missing')}")
            continue
        lines += [
            f"{variant} >= GRPO (mean) at every evaluation from step 8: {checked['at_or_above_grpo']}"
            + (f" (below at {checked['below_at']})" if checked["below_at"] else ""),
            f"{variant} reaches GRPO's final {checked['grpo_final_mean']:.3f} at step "
            f"{checked['reaches_grpo_final_at']}: within half the steps: {checked['half_the_steps']}",
            f"largest fall below its own peak per {variant} seed: {checked['fall_per_seed']}: none > 0.1: "
            f"{checked['no_seed_falls']}",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any other flag is passed to every `sdpo train` run.")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated subset of "
                        + ", ".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report", action="store_true",
                        help="only print the targets and draw the plot, from the results files")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/sdpo_learning_efficacy_long"))
    parser.add_argument("--results", type=Path, default=RESULTS / "learning_efficacy_long.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs/img/learning_efficacy_long.png")
    args, extra = parser.parse_known_args(argv)
    raw_path = args.results.with_name(args.results.stem + "_runs.json")
    code = 0
    if not args.report:
        code = _demo_compare().main([
            "--variants", args.variants, "--seeds", str(args.seeds), "--jobs", str(args.jobs),
            "--out-dir", str(args.out_dir), "--results", str(raw_path), "--plot", str(args.plot),
            *(["--resume"] if args.resume else []),
            "--max_steps", str(args.steps), "--eval_every", str(args.eval_every), *extra])
    if not raw_path.is_file():
        parser.error(f"no results yet: {raw_path}")
    raw = json.loads(raw_path.read_text())
    if args.report and raw.get("runs"):
        _demo_compare().plot(raw, args.plot)  # the runs finished so far (a full run draws it at its end)
    curves = heldout_curves(raw)
    targets = {variant: study_targets(curves, variant) for variant in GUARDED}
    args.results.write_text(json.dumps({
        "steps": args.steps, "eval_every": args.eval_every, "sdpo_train_args": raw.get("sdpo_train_args"),
        "total_seconds": raw.get("total_seconds"), "jobs": raw.get("jobs"),
        "run_seconds": {variant: {seed: run["wall_seconds"] for seed, run in seeds.items()}
                        for variant, seeds in raw["runs"].items()},
        "curves": curves, "targets": targets,
    }, indent=1) + "\n")
    print("\n".join(["", *report_lines(curves, targets)]))
    return code


if __name__ == "__main__":
    sys.exit(main())

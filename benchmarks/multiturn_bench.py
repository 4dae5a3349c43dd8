"""Multi-turn episodes on the demo model: what a second and third attempt buy, what a turn costs, and a short
SDPO vs GRPO run on multi-turn math.

    python benchmarks/multiturn_bench.py             # everything (about 35 min on 2 CPU cores)
    python benchmarks/multiturn_bench.py --resume    # finish an interrupted benchmark
    python benchmarks/multiturn_bench.py --parts code --code_tasks 10   # a part, smaller

Part `code`: `sdpo eval --env code --max_turns T --num_tasks N` (greedy, the demo model SmolLM2-135M-Instruct)
for T = 1 and T = 3. Reports pass@1 within 1, 2 and 3 turns, the attempts played, and the cost of a turn: the
wall time of the 3-turn evaluation over its attempts (model loading included), and the marginal cost of an
extra attempt, (time(T=3) - time(T=1)) / (attempts(T=3) - attempts(T=1)).

Part `math`: for seeds 0, 1, 2, `sdpo train --env math --max_turns 2` (SDPO, the demo's settings) and the same
with `--no_enabled` (GRPO), `--max_steps` steps each; the held-out accuracy within 2 turns (greedy, on prompts
never trained on) before and after training, from the runs' `eval_before.json` / `eval_after.json`. The math
environment has the demo's settings (one-digit additions, `unformatted_scale=1`: a right final number earns the
full reward, but the environment still asks for the `\\boxed{}` format on the next turn); a task counts as solved
within 2 turns when one of its first two attempts reaches reward 1.

Every finished item rewrites the results file (default benchmarks/results/multiturn_bench.json); `--resume` keeps
the finished ones and runs the rest, with the same settings (other settings are an error). Each item is one
subprocess of the `sdpo` CLI, so the numbers are what a user of `sdpo eval` / `sdpo train` sees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "multiturn_bench.json"
VARIANTS = {"sdpo": [], "grpo": ["--no_enabled"]}
BATCH = 8  # episodes per step: the demo's per_device_train_batch_size


def _sdpo(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "sdpo"), *args]


def _run(command: list[str], log: Path, timeout: float) -> tuple[int | str, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as handle:
        try:
            code: int | str = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                             timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout:.0f} s"
    return code, time.monotonic() - start


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def code_item(turns: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One `sdpo eval --env code --max_turns turns` run: its eval JSON fields and wall time."""
    out = work / f"code-eval-{turns}.json"
    log = work / f"code-eval-{turns}.log"
    code, seconds = _run(_sdpo("eval", "--env", "code", "--max_turns", str(turns), "--num_tasks", str(args.code_tasks),
                               "--max_new_tokens", str(args.code_tokens), "--json", str(out)), log, args.timeout)
    if code != 0 or not out.is_file():
        return {"error": f"exit {code}", "log": _tail(log)}
    data = json.loads(out.read_text())
    data.pop("samples", None)
    return {**data, "wall_seconds": seconds}


def math_item(variant: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One short multi-turn math training run: held-out accuracy within 2 turns before and after."""
    out = work / f"math-{variant}-{seed}"
    log = work / f"math-{variant}-{seed}.log"
    command = _sdpo("train", "--env", "math", "--max_turns", "2",
                    "--max_steps", str(args.math_steps), "--eval_size", str(args.math_eval_size), "--eval_every", "0",
                    "--seed", str(seed), "--output_dir", str(out), "--save_strategy", "no", "--disable_tqdm", "true",
                    *(["--max_completion_length", str(args.math_tokens)] if args.math_tokens else []),
                    *VARIANTS[variant])
    code, seconds = _run(command, log, args.timeout)
    before, after = out / "eval_before.json", out / "eval_after.json"
    if code != 0 or not before.is_file() or not after.is_file():
        return {"error": f"exit {code}", "log": _tail(log)}
    results = {when: json.loads(path.read_text()) for when, path in (("before", before), ("after", after))}
    return {
        **training_costs(out / "metrics.jsonl"),
        **{f"heldout_{when}_within_{t}": data["pass_within_turns"].get(str(t)) for when, data in results.items()
           for t in (1, 2)},
        **{f"heldout_{when}_mean_reward": data["mean_reward"] for when, data in results.items()},
        "wall_seconds": seconds,
    }


def training_costs(metrics: Path) -> dict[str, float | None]:
    """Means over a run's logged steps: seconds per step, attempts per episode, the fraction of episodes cut short
    by the token budget, and seconds per attempt (a step plays `per_device_train_batch_size` episodes)."""
    steps = [row for row in map(json.loads, metrics.read_text().splitlines()) if "step_time" in row]
    seconds = _mean([row["step_time"] for row in steps])
    turns = _mean([row["episodes/turns_mean"] for row in steps if "episodes/turns_mean" in row])
    stopped = _mean([row["episodes/stopped_fraction"] for row in steps if "episodes/stopped_fraction" in row])
    per_attempt = seconds / (turns * BATCH) if seconds is not None and turns else None
    return {"step_seconds_mean": seconds, "turns_mean": turns, "stopped_fraction_mean": stopped,
            "seconds_per_attempt": per_attempt}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    code = results["items"].get("code", {})
    if "3" in code and "error" not in code["3"]:
        within = code["3"]["pass_within_turns"]
        lines.append(f"code, {code['3']['num_tasks']} tasks, greedy: pass@1 within 1/2/3 turns "
                     f"{within['1']:.3f} / {within['2']:.3f} / {within['3']:.3f}; "
                     f"{code['3']['turns_played']} attempts in {code['3']['wall_seconds']:.0f} s "
                     f"({code['3']['wall_seconds'] / max(code['3']['turns_played'], 1):.1f} s per attempt)")
        if "1" in code and "error" not in code["1"]:
            extra = code["3"]["turns_played"] - code["1"]["turns_played"]
            if extra > 0:
                marginal = (code["3"]["wall_seconds"] - code["1"]["wall_seconds"]) / extra
                lines.append(f"code, 1-turn evaluation: pass@1 {code['1']['pass_at_k']['1']:.3f} in "
                             f"{code['1']['wall_seconds']:.0f} s; marginal cost of an extra attempt {marginal:.1f} s")
    math_runs = results["items"].get("math", {})
    for variant in VARIANTS:
        runs = [r for r in math_runs.get(variant, {}).values() if "error" not in r]
        if runs:
            before = _mean([r["heldout_before_within_2"] for r in runs])
            after = _mean([r["heldout_after_within_2"] for r in runs])
            per_seed = ", ".join(f"{r['heldout_before_within_2']:.3f}->{r['heldout_after_within_2']:.3f}"
                                 for r in runs)
            lines.append(f"math, {variant}, {len(runs)} seeds: held-out within 2 turns {before:.3f} -> {after:.3f} "
                         f"(per seed {per_seed})")
            costs = [r for r in runs if r.get("seconds_per_attempt") is not None]
            if costs:
                lines.append(f"math, {variant}: {_mean([r['step_seconds_mean'] for r in costs]):.1f} s per step, "
                             f"{_mean([r['turns_mean'] for r in costs]):.2f} attempts per episode, "
                             f"{_mean([r['stopped_fraction_mean'] for r in costs]):.2f} of episodes cut by the token "
                             f"budget, {_mean([r['seconds_per_attempt'] for r in costs]):.2f} s per attempt")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "multiturn_bench", help="logs and run folders")
    parser.add_argument("--parts", default="code,math", help="comma-separated: code, math")
    parser.add_argument("--resume", action="store_true", help="keep the finished items of --results, run the rest")
    parser.add_argument("--code_tasks", type=int, default=30)
    parser.add_argument("--code_tokens", type=int, default=256)
    parser.add_argument("--math_steps", type=int, default=12)
    parser.add_argument("--math_eval_size", type=int, default=32)
    parser.add_argument("--math_tokens", type=int, default=None,
                        help="max_completion_length of the math runs: the whole episode's budget (default: the "
                             "demo's 48, which few second turns fit into)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    args = parser.parse_args(argv)
    settings = {"code_tasks": args.code_tasks, "code_tokens": args.code_tokens, "math_steps": args.math_steps,
                "math_eval_size": args.math_eval_size, "seeds": args.seeds}
    if args.math_tokens:
        settings["math_tokens"] = args.math_tokens
    results: dict[str, Any] = {"settings": settings, "items": {"code": {}, "math": {}}}
    if args.resume and args.results.is_file():
        previous = json.loads(args.results.read_text())
        if previous["settings"] != settings:
            parser.error(f"--resume: {args.results} was made with {previous['settings']}, not {settings}")
        results = previous
    parts = args.parts.split(",")

    def save() -> None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        results["summary"] = summary_lines(results)
        args.results.write_text(json.dumps(results, indent=2) + "\n")

    def done(item: dict[str, Any] | None) -> bool:
        return item is not None and "error" not in item

    if "code" in parts:
        for turns in (1, 3):
            if not done(results["items"]["code"].get(str(turns))):
                print(f"code: sdpo eval --max_turns {turns} ...", flush=True)
                results["items"]["code"][str(turns)] = code_item(turns, args, args.work)
                save()
    if "math" in parts:
        for seed in args.seeds:
            for variant in VARIANTS:
                runs = results["items"]["math"].setdefault(variant, {})
                if not done(runs.get(str(seed))):
                    print(f"math: {variant} seed {seed} ...", flush=True)
                    runs[str(seed)] = math_item(variant, seed, args, args.work)
                    save()
    save()
    print("\n".join(results["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

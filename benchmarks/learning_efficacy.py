"""Held-out accuracy per step of SDPO against GRPO, same budget, several seeds, and SDPO without feedback.

    python benchmarks/learning_efficacy.py                 # demo model, math, 3 seeds x 3 variants (< 1 h, 2 CPUs)
    python benchmarks/learning_efficacy.py --task code     # code environment on the bundled problems (slower)
    python benchmarks/learning_efficacy.py --steps 200 --seeds 5 --num-generations 16 --bf16 --model PATH  # a GPU
    python benchmarks/learning_efficacy.py --tiny --steps 2 --seeds 1 --eval-every 1 --eval-size 4   # smoke test

Variants, all with the same steps, generations, batch, learning rate and seed set:

- `grpo`: `SDPOConfig(enabled=False)`, i.e. TRL's GRPO loss;
- `sdpo`: `SDPOConfig()` defaults (demonstrations from successful siblings, else the environment's feedback);
- `sdpo_no_feedback`: `SDPOConfig(include_environment_feedback=False)`: demonstrations only, the scalar-reward
  ablation of the paper.

Why subprocesses: each run is its own process, so runs cannot leak state (teacher copies, RNG, caches)
into each other, and a crash or time-out of one run is recorded in the results instead of ending the
benchmark. Runs start seed-major (every variant of seed 0, then seed 1, ...), `--jobs` at a time (by default
one per idle core, each on one torch thread), and the JSON and plot are rewritten after every run, so a
benchmark cut short still compares the variants on the seeds it finished.

Evaluation is greedy on a fixed held-out set (problems whose prompts never appear in training), every
`--eval-every` steps; the untrained model is scored once (step 0 is the same for every run). A sample is
solved when its reward reaches SDPO's `success_reward_threshold`. Per run the JSON also keeps the training
success fraction (rollouts at the threshold) and, for SDPO, the fraction of rollouts with a teacher signal
(`sdpo/reprompt_sample_fraction`), which is what SDPO can learn from.

Default task: the embedded demo (`sdpo train`): SmolLM2-135M-Instruct on one-digit sums from the `math`
environment, where a right final number earns the full reward (`unformatted_scale=1.0`: the 135M model
ignores `\\boxed{}`), sampled accuracy about 0.3, so some rollouts of most groups succeed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

VARIANTS = ("grpo", "sdpo", "sdpo_no_feedback")
LABELS = {"grpo": "GRPO", "sdpo": "SDPO", "sdpo_no_feedback": "SDPO, no feedback (demos only)"}
COLORS = {"grpo": "tab:blue", "sdpo": "tab:red", "sdpo_no_feedback": "tab:orange"}
LOG_KEYS = ("reward", "sdpo/reprompt_sample_fraction", "sdpo/success_group_fraction", "sdpo/feedback_used_fraction",
            "sdpo/distillation_loss", "sdpo/teacher_student_kl", "loss", "grad_norm", "completions/mean_length",
            "step_time")
SUCCESS_THRESHOLD = 1.0  # SDPOConfig().success_reward_threshold; also the evaluation's "solved"

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # one prompt x 8 completions of <= 32 tokens per step. Measured on 2 shared CPUs with 1 thread: 17-23 s a
    # step, 15-20 s an evaluation of 40 problems, so a run takes about 6 min and the 9 runs just under an hour
    "math": {"steps": 16, "num_generations": 8, "batch_size": 8, "completion_length": 32, "eval_size": 40,
             "eval_every": 8, "learning_rate": 1e-5, "difficulty": 0},
    # programs need room: 2 prompts x 4 completions of <= 128 tokens, 4 held-out problems. 10 steps of 192
    # tokens took ~2.5 h for the 9 runs on 2 CPUs; this size is the one recorded in docs/benchmarks.md
    "code": {"steps": 6, "num_generations": 4, "batch_size": 8, "completion_length": 128, "eval_size": 4,
             "eval_every": 3, "learning_rate": 1e-5, "difficulty": 0},
}


# ------------------------------------------------------------------------------------------------ worker
def _load_model(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.tiny:
        from sdpo_core.testing import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_model(tokenizer, seed=0), tokenizer  # same initial weights for every run and seed
    from sdpo_core.app.demo_model import resolve_model

    path = resolve_model(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def _task(args: argparse.Namespace):
    """The environment, the training rows and the held-out evaluation rows (fixed: independent of the run seed)."""
    from datasets import Dataset

    import sdpo_envs
    from sdpo_core.app.runs import split_rows

    if args.task == "math":
        env = sdpo_envs.make("math", difficulty=args.difficulty, unformatted_scale=1.0, size=1000, seed=0)
        assert env.dataset is not None  # the math environment has its own problem set
        rows = Dataset.from_list(env.dataset(as_dataset=False))
    else:
        from sdpo_code import load_bundled

        env = sdpo_envs.make("code", backend="auto", time_limit=2.0)
        rows = Dataset.from_list(load_bundled())  # plain-text prompts, as `sdpo train --env code` uses them
    train, held_out = split_rows(rows, env, eval_size=args.eval_size, eval_on="heldout", seed=12345)
    return env, train, held_out


def _evaluate(model, tokenizer, env, tasks, args: argparse.Namespace) -> dict[str, float]:
    from sdpo_core.app.evaluation import evaluate_model

    start = time.monotonic()
    result = evaluate_model(model, tokenizer, env, tasks, max_new_tokens=args.completion_length, temperature=0.0,
                            batch_size=args.eval_batch_size, success_threshold=SUCCESS_THRESHOLD, show=0)
    return {"accuracy": result.success_rate, "mean_reward": result.mean_reward,
            "seconds": round(time.monotonic() - start, 2)}


def _worker(args: argparse.Namespace) -> None:
    """One run (or, for `--worker baseline`, the untrained model's evaluation); writes JSON to `--out`."""
    import torch
    from transformers import TrainerCallback, set_seed
    from trl import GRPOConfig

    from sdpo_core import SDPOConfig, SDPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    else:  # the cores other processes leave idle now (before this process gets busy)
        from sdpo_core.app.cpu_threads import start_fitting

        start_fitting()
    set_seed(args.seed)
    model, tokenizer = _load_model(args)
    env, train_rows, held_out = _task(args)
    if args.worker == "baseline":
        result = {"evals": [{"step": 0, **_evaluate(model, tokenizer, env, held_out, args)}],
                  "train_rows": len(train_rows), "eval_rows": len(held_out)}
        Path(args.out).write_text(json.dumps(result))
        return

    sdpo_config = {
        "grpo": SDPOConfig(enabled=False),
        "sdpo": SDPOConfig(),
        "sdpo_no_feedback": SDPOConfig(include_environment_feedback=False),
    }[args.worker]
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, num_generations=args.num_generations,
            max_completion_length=args.completion_length, max_steps=args.steps, learning_rate=args.learning_rate,
            lr_scheduler_type="constant", temperature=1.0, activation_checkpointing=False, use_cpu=not cuda,
            bf16=args.bf16, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, seed=args.seed,
        )
        trainer = SDPOTrainer(model=model, reward_funcs=[env], args=config, sdpo_config=sdpo_config,
                              train_dataset=train_rows, processing_class=tokenizer)
        success: list[float] = []
        calculate_rewards = trainer._calculate_rewards

        def recording_rewards(*call_args):
            """Success fraction of each generation batch, the same way for every variant."""
            per_func = calculate_rewards(*call_args)
            total = (per_func * trainer.reward_weights.to(per_func.device)).nansum(dim=1)
            success.append((total >= SUCCESS_THRESHOLD).float().mean().item())
            return per_func

        trainer._calculate_rewards = recording_rewards
        evals: list[dict[str, Any]] = []
        run_args = args  # inside the callback, `args` are the trainer's

        class HeldOutEval(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % run_args.eval_every == 0 or state.global_step == run_args.steps:
                    evals.append({"step": state.global_step,
                                  **_evaluate(trainer.model, tokenizer, env, held_out, run_args)})
                    print(f"step {state.global_step}: held-out accuracy {evals[-1]['accuracy']:.3f}", flush=True)

        trainer.add_callback(HeldOutEval())
        start = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - start
    logs = [{k: r[k] for k in ("step", *LOG_KEYS) if k in r} for r in trainer.state.log_history if "loss" in r]
    result = {
        "evals": evals,
        "success_fraction": success,
        "logs": logs,
        "train_seconds": round(seconds - sum(e["seconds"] for e in evals), 1),
        "eval_seconds": round(sum(e["seconds"] for e in evals), 1),
        "train_rows": len(train_rows),
        "eval_rows": len(held_out),
        "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values: list[float | None]) -> float:
    numbers = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(numbers) if numbers else math.nan


def aggregate(runs: list[dict[str, Any]], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Per variant: accuracy mean and std over seeds at each evaluated step, and the explanatory fractions."""
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        done = [r for r in runs if r["variant"] == variant and "evals" in r]
        if not done:
            continue
        steps = sorted({e["step"] for r in done for e in r["evals"]})
        curve = []
        if baseline:
            curve.append({"step": 0, "mean": baseline["evals"][0]["accuracy"], "std": 0.0, "n": len(done)})
        for step in steps:
            values = [e["accuracy"] for r in done for e in r["evals"] if e["step"] == step]
            mean, std = _mean_std(values)
            curve.append({"step": step, "mean": mean, "std": std, "n": len(values)})
        third = max(1, len(done[0]["success_fraction"]) // 3)
        summary[variant] = {
            "seeds": [r["seed"] for r in done],
            "accuracy": curve,
            "final_accuracy": _mean_std([r["evals"][-1]["accuracy"] for r in done]),
            "train_success_first_third": _mean([_mean(r["success_fraction"][:third]) for r in done]),
            "train_success_last_third": _mean([_mean(r["success_fraction"][-third:]) for r in done]),
            "reprompt_sample_fraction": _mean([_mean([x.get("sdpo/reprompt_sample_fraction") for x in r["logs"]])
                                               for r in done]),
            "feedback_used_fraction": _mean([_mean([x.get("sdpo/feedback_used_fraction") for x in r["logs"]])
                                             for r in done]),
            "seconds_per_step": _mean([r["train_seconds"] / max(1, len(r["success_fraction"])) for r in done]),
        }
    return summary


def print_table(summary: dict[str, Any], failed: list[dict[str, Any]]) -> None:
    if not summary:
        print("no finished runs")
        return
    steps = sorted({p["step"] for s in summary.values() for p in s["accuracy"]})
    head = f"{'held-out accuracy':<36}" + "".join(f"{'step ' + str(st):>15}" for st in steps)
    print("\n" + head)
    for variant, s in summary.items():
        cells = {p["step"]: f"{p['mean']:.3f}±{p['std']:.3f}" for p in s["accuracy"]}
        print(f"{LABELS[variant] + ' (' + str(len(s['seeds'])) + ')':<36}"
              + "".join(f"{cells.get(st, '-'):>15}" for st in steps))
    print(f"\n{'per run, mean over seeds':<32}{'success 1st/3':>14}{'success 3rd/3':>14}{'with teacher':>13}"
          f"{'feedback used':>14}{'s/step':>8}")
    for variant, s in summary.items():
        print(f"{LABELS[variant]:<32}{s['train_success_first_third']:>14.3f}{s['train_success_last_third']:>14.3f}"
              f"{s['reprompt_sample_fraction']:>13.3f}{s['feedback_used_fraction']:>14.3f}"
              f"{s['seconds_per_step']:>8.1f}")
    for run in failed:
        print(f"FAILED {run['variant']} seed {run['seed']}: {run['error'].strip().splitlines()[-1][:200]}")


def plot(summary: dict[str, Any], runs: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Accuracy (mean ± std over seeds) and the training success fraction per variant, into a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    acc, train = fig.subplots(1, 2)
    for variant, s in summary.items():
        xs = [p["step"] for p in s["accuracy"]]
        mean = [p["mean"] for p in s["accuracy"]]
        std = [p["std"] for p in s["accuracy"]]
        label = f"{LABELS[variant]} (n={len(s['seeds'])})"
        acc.plot(xs, mean, marker="o", color=COLORS[variant], label=label)
        acc.fill_between(xs, [m - d for m, d in zip(mean, std, strict=True)],
                         [m + d for m, d in zip(mean, std, strict=True)], color=COLORS[variant], alpha=0.15)
        curves = [r["success_fraction"] for r in runs if r["variant"] == variant and "success_fraction" in r]
        length = min(len(c) for c in curves)
        window = 5
        smoothed = [statistics.fmean(c[max(0, i - window + 1):i + 1]) for c in curves for i in range(length)]
        per_step = [statistics.fmean(smoothed[k * length + i] for k in range(len(curves))) for i in range(length)]
        train.plot(range(1, length + 1), per_step, color=COLORS[variant], label=LABELS[variant])
    acc.set(xlabel="training step", ylabel="held-out accuracy (greedy)", title=title)
    acc.legend(fontsize=8)
    acc.grid(alpha=0.3)
    train.set(xlabel="training step", ylabel="rollouts solved (5-step mean, over seeds)",
              title="training success fraction")
    train.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _run(kind: str, seed: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One subprocess; its result, or its error (stderr tail) when it fails or times out."""
    out = out_dir / "runs" / f"{kind}_seed{seed}.json"
    log = out_dir / "logs" / f"{kind}_seed{seed}.log"
    if args.resume and out.is_file():
        return {"variant": kind, "seed": seed, "wall_seconds": None, "resumed": True, **json.loads(out.read_text())}
    cmd = [sys.executable, __file__, *_worker_argv(args), "--worker", kind, "--seed", str(seed), "--out", str(out)]
    start = time.monotonic()
    with open(log, "w") as handle:
        try:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, timeout=args.run_timeout,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record: dict[str, Any] = {"variant": kind, "seed": seed, "wall_seconds": round(time.monotonic() - start, 1)}
    if code == 0 and out.is_file():
        return {**record, **json.loads(out.read_text())}
    return {**record, "error": f"exit {code}\n" + log.read_text()[-4000:]}


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--task", args.task, "--steps", str(args.steps), "--num-generations", str(args.num_generations),
            "--batch-size", str(args.batch_size), "--completion-length", str(args.completion_length),
            "--eval-size", str(args.eval_size), "--eval-every", str(args.eval_every),
            "--eval-batch-size", str(args.eval_batch_size), "--learning-rate", str(args.learning_rate),
            "--difficulty", str(args.difficulty), "--threads", str(args.threads)]
    if args.model:
        argv += ["--model", args.model]
    return argv + [flag for flag, on in (("--tiny", args.tiny), ("--bf16", args.bf16)) if on]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=tuple(TASK_DEFAULTS), default="math")
    parser.add_argument("--model", help="model folder, .gguf or hub id (default: the demo SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test; learns nothing)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (0, 1, ...)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ", ".join(VARIANTS))
    for name in ("steps", "num_generations", "batch_size", "completion_length", "eval_size", "eval_every",
                 "difficulty"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help="default: per task (see TASK_DEFAULTS)")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads per run (default 1: torch's threads spin-wait, so when other "
                             "processes take a core, 2 threads are several times slower than 1); 0: as many as "
                             "cores are idle when the run starts (a dedicated machine or a GPU)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs at once (default: with --threads 1, one per core idle at the start; else 1)")
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--out-dir", default=None, help="default: /tmp/sdpo_learning_efficacy_<task>")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs (and baseline) already finished in --out-dir instead of rerunning them")
    parser.add_argument("--worker", choices=(*VARIANTS, "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads is None:
        args.threads = 1
    if args.batch_size % args.num_generations:
        parser.error("--batch-size must be a multiple of --num-generations")
    if args.worker:
        _worker(args)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    out_dir = Path(args.out_dir or f"{tempfile.gettempdir()}/sdpo_learning_efficacy_{args.task}")
    for sub in ("runs", "logs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    title = (f"{args.task}: {'tiny' if args.tiny else args.model or 'SmolLM2-135M-Instruct'}, {args.steps} steps x "
             f"{args.batch_size} rollouts, lr {args.learning_rate:g}")
    print(f"{title}; {args.seeds} seeds x {len(variants)} variants; results in {out_dir}", flush=True)
    started = time.monotonic()
    baseline: dict[str, Any] | None  # None when its evaluation failed
    baseline = _run("baseline", 0, args, out_dir)
    if "error" in baseline:
        print(f"baseline evaluation failed:\n{baseline['error']}")
        baseline = None
    else:
        print(f"untrained: held-out accuracy {baseline['evals'][0]['accuracy']:.3f} on {baseline['eval_rows']} "
              f"problems ({baseline['train_rows']} training rows)", flush=True)
    runs: list[dict[str, Any]] = []
    order = [(seed, v) for seed in range(args.seeds) for v in variants]
    if args.jobs:
        jobs = args.jobs
    else:
        from sdpo_core.app.cpu_threads import idle_cores

        jobs = (idle_cores() or 1) if args.threads == 1 else 1
    print(f"{jobs} run(s) at a time, {args.threads or 'all idle'} thread(s) each", flush=True)
    with ThreadPoolExecutor(jobs) as pool:  # each run is its own process; threads only wait for them
        pending = [pool.submit(_run, variant, seed, args, out_dir) for seed, variant in order]
        for future in as_completed(pending):
            run = future.result()
            runs.append(run)
            runs.sort(key=lambda r: order.index((r["seed"], r["variant"])))
            status = "FAILED" if "error" in run else f"final accuracy {run['evals'][-1]['accuracy']:.3f}"
            took = "resumed" if run.get("resumed") else f"{run['wall_seconds']:.0f} s"
            print(f"[{time.monotonic() - started:6.0f} s] {run['variant']} seed {run['seed']}: {status} ({took})",
                  flush=True)
            finished = [r for r in runs if "error" not in r]
            summary = aggregate(finished, baseline)
            results = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "seed")},
                       "baseline": baseline, "summary": summary, "runs": runs}
            (out_dir / "learning_efficacy.json").write_text(json.dumps(results, indent=1))
            if summary:
                plot(summary, finished, out_dir / "learning_efficacy.png", title)
    print_table(aggregate([r for r in runs if "error" not in r], baseline), [r for r in runs if "error" in r])
    print(f"\nwrote {out_dir / 'learning_efficacy.json'} and {out_dir / 'learning_efficacy.png'} "
          f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()

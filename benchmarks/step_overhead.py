"""Step time of `SDPOTrainer` against TRL's `GRPOTrainer` on the same model, batch and generation settings.

    python benchmarks/step_overhead.py                  # tiny Llama (hidden 256, 4 layers), 3 rounds x 6 steps
    python benchmarks/step_overhead.py --model demo --rounds 2 --steps 5 --warmup 1   # SmolLM2-135M, ~8 min
    python benchmarks/step_overhead.py --tiny --rounds 1 --steps 2 --warmup 1   # seconds; the smoke test

Why steps interleave: the machine is shared and its load drifts by a factor of two within minutes, so the
two variants must see the same load. Each round is a fresh process holding a GRPO and an SDPO trainer
(same model, data, seed and settings), each in its own thread; a baton lets one optimizer step run at a
time, in the order GRPO, SDPO, SDPO, GRPO, ... The first `--warmup` steps of each are dropped (lazy
initialisation, and the other trainer's set-up running beside them); medians over the kept steps of all
rounds are compared.

The split comes from timers the worker wraps around the trainers' seams (instance attributes and
`sdpo_core.loss` functions, patched in the worker process only; the trainers' code is not modified):

| row | measured as |
|---|---|
| generation | `_generate` (TRL's sampling) |
| scoring | `_calculate_rewards` (reward functions; SDPO also reads and gathers feedback) |
| batch prep (other) | `_generate_and_score_completions` minus the two above (SDPO: teacher prompts) |
| teacher forward | `teacher.logits` or `teacher.hidden_states` (no grad, prompt + completion) |
| student fwd (+ misc) | `_compute_loss` minus the teacher forward and the two rows below |
| token stats (no grad) | `token_stats_from_hidden` (hidden-state path, micro-batches without a teacher signal) |
| distillation loss fn | `weighted_distillation_loss` (forward + gradient) / `chunked_per_token_distillation_loss` |
| backward | `training_step` minus `_prepare_inputs` and `_compute_loss` |
| teacher update | `teacher.update` (EMA, once per generation batch) |
| optimizer, callbacks | `on_step_begin` to the last `on_step_end`, minus `training_step` and teacher update |

The floor of SDPO's overhead was one extra forward of the teacher over teacher prompt + completion. The
worker measures such a plain no-grad forward of the teacher module, with logits, on the last teacher batch,
and the table reports `(GRPO step + that) / GRPO step` beside the measured ratio. The trainer's teacher pass
goes once through prompts that rows share, so it can now cost less than that probe.
GRPO gets sampled-token log-probs from TRL's fused LM head; SDPO's top-K distillation needs the student's
logits over the vocabulary (materialised, or chunk by chunk from hidden states), which the floor leaves out.

The default reward is synthetic: half of every group succeeds and the others get a feedback line, so every
row has a demonstration and the teacher runs on the whole batch (SDPO's worst case). `--reward math` uses the
`math` environment instead (the realistic case; the teacher is skipped only when no row of a micro-batch
has a signal).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdpo_envs import Environment

VARIANTS = ("GRPO", "SDPO")
LOSS_FUNCTIONS = ("weighted_distillation_loss", "chunked_per_token_distillation_loss",
                  "token_stats_from_hidden")  # what the trainer calls
ROWS = (
    ("generation", "generate"),
    ("scoring", "score"),
    ("batch prep (other)", "prep_other"),
    ("teacher forward", "teacher_forward"),
    ("student fwd (+ misc)", "student_loss"),
    ("token stats (no grad)", "token_stats"),
    ("distillation loss fn", "loss_fn"),
    ("backward", "backward"),
    ("teacher update", "teacher_update"),
    ("optimizer, callbacks", "optimizer_rest"),
    ("training_step", "training_step"),
    ("whole step", "step"),
)


# ------------------------------------------------------------------------------------------------ worker
class SyntheticReward:
    """Reward 1 on even rows, 0 with a feedback line on odd ones: every group has demonstrations."""

    __name__ = "synthetic_reward"

    def __init__(self) -> None:
        self.last_feedback: list[str] | None = None

    def __call__(self, prompts, completions, **kwargs):
        rewards = [1.0 if i % 2 == 0 else 0.0 for i in range(len(prompts))]
        self.last_feedback = ["" if r else "Your final answer is not correct." for r in rewards]
        return rewards


class SeamTimer:
    """Accumulates wall time per seam and step; wraps bound methods as instance attributes."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self._step_start = 0.0

    def wrap(self, owner: Any, method: str, key: str, on_call=None) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            if on_call is not None:
                on_call(self.current, *args)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[key] += time.perf_counter() - start

        setattr(owner, method, timed)

    def begin_step(self) -> None:
        self.current = defaultdict(float)
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        c = self.current
        c["step"] = time.perf_counter() - self._step_start
        c["prep_other"] = c["generate_and_score"] - c["generate"] - c["score"]
        c["student_loss"] = c["compute_loss"] - c["teacher_forward"] - c["token_stats"] - c["loss_fn"]
        c["backward"] = c["training_step"] - c["prepare_inputs"] - c["compute_loss"]
        c["optimizer_rest"] = c["step"] - c["training_step"] - c["teacher_update"]
        self.steps.append(dict(c))


def _full_teacher_forward(teacher: Any, teacher_input: list[Any], repeats: int = 3) -> float | None:
    """Median time of one plain no-grad forward of the teacher, with logits, over its last input: the floor."""
    import torch

    module = getattr(teacher, "module", None)
    if module is None:
        return None
    input_ids, attention_mask, keep = teacher_input
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            module(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _build_model(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "tiny":
        from sdpo_core.testing import tiny_model, tiny_tokenizer

        tiny = tiny_tokenizer()
        model = tiny_model(tiny, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers)
        return model, tiny
    from sdpo_core.app.demo_model import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer


class Baton:
    """Lets trainers, each in its own thread, take their optimizer steps one at a time in a fixed order."""

    def __init__(self, schedule: list[str]) -> None:
        self._cond = threading.Condition()
        self._schedule = schedule
        self._next = 0
        self._aborted = False

    def wait_turn(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._aborted or self._next >= len(self._schedule)
                                or self._schedule[self._next] == name)
            if self._aborted:
                raise RuntimeError("the other trainer failed")

    def pass_on(self) -> None:
        with self._cond:
            self._next += 1
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


def _make_trainer(variant: str, args: argparse.Namespace, out: str) -> tuple[Any, SeamTimer, dict[str, Any]]:
    """A trainer of `variant` with timers on its seams; `info` collects token counts and the last teacher input."""
    from sdpo_math.data import generate_problems
    from trl import GRPOConfig, GRPOTrainer

    from sdpo_core import SDPOConfig, SDPOTrainer
    from sdpo_core import loss as sdpo_loss

    model, tokenizer = _build_model(args)
    prompts_per_step = args.batch_size // args.num_generations
    dataset = generate_problems(n=max(64, prompts_per_step * args.steps * 2), difficulty=args.difficulty, seed=0)
    reward: Environment | SyntheticReward
    if args.reward == "math":
        import sdpo_envs

        reward = sdpo_envs.make("math")
    else:
        reward = SyntheticReward()
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, num_generations=args.num_generations,
        max_completion_length=args.completion_length, max_steps=args.steps, learning_rate=1e-6,
        temperature=1.0, use_cpu=True, bf16=args.bf16, report_to="none", logging_steps=1,
        activation_checkpointing=args.activation_checkpointing,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
    )
    if variant == "SDPO":
        trainer = SDPOTrainer(model=model, reward_funcs=[reward], args=config, sdpo_config=SDPOConfig(),
                              train_dataset=dataset, processing_class=tokenizer)
    else:
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                              processing_class=tokenizer)
    timer = SeamTimer()
    info: dict[str, Any] = {"shapes": defaultdict(list), "teacher_input": []}

    def note_student(current, model, inputs):
        info["shapes"]["student_tokens"].append(inputs["prompt_ids"].size(1) + inputs["completion_ids"].size(1))
        info["shapes"]["completion_tokens"].append(int(inputs["completion_mask"].sum()))

    def note_teacher(current, student, input_ids, attention_mask, keep):
        info["shapes"]["teacher_tokens"].append(input_ids.size(1))
        info["teacher_input"] = [input_ids, attention_mask, keep]

    timer.wrap(trainer, "training_step", "training_step")
    timer.wrap(trainer, "_prepare_inputs", "prepare_inputs")
    timer.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
    timer.wrap(trainer, "_generate", "generate")
    timer.wrap(trainer, "_calculate_rewards", "score")
    timer.wrap(trainer, "_compute_loss", "compute_loss", on_call=note_student)
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None:
        for method in ("logits", "hidden_states"):  # the full-logits path or the hidden-state path
            if hasattr(teacher, method):
                timer.wrap(teacher, method, "teacher_forward", on_call=note_teacher)
        timer.wrap(teacher, "update", "teacher_update")
        for name in LOSS_FUNCTIONS:  # the trainer calls them as `sdpo_loss.<name>`; only SDPO calls them
            if hasattr(sdpo_loss, name):
                timer.wrap(sdpo_loss, name, "token_stats" if name == "token_stats_from_hidden" else "loss_fn")
    return trainer, timer, info


def _worker(args: argparse.Namespace) -> None:
    """One round: both trainers in one process, steps alternating GRPO, SDPO, SDPO, GRPO, ...; JSON to `--out`.

    Each trainer runs `train()` in its own thread, and a callback holds it at `on_step_begin` until its turn,
    so exactly one step runs at a time and neighbouring GRPO and SDPO steps see the same machine load.
    """
    import torch
    from transformers import TrainerCallback

    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = [v for i in range(args.steps) for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1])]
    baton = Baton(schedule)
    with tempfile.TemporaryDirectory() as out:
        built = {v: _make_trainer(v, args, f"{out}/{v}") for v in VARIANTS}

        class StepClock(TrainerCallback):
            """Added last, so its `on_step_end` follows SDPO's teacher-update callback."""

            def __init__(self, name: str, timer: SeamTimer) -> None:
                self.name, self.timer = name, timer

            def on_step_begin(self, *a, **k):
                baton.wait_turn(self.name)
                self.timer.begin_step()

            def on_step_end(self, *a, **k):
                self.timer.end_step()
                baton.pass_on()

        errors: dict[str, BaseException] = {}

        def train(name: str) -> None:
            try:
                built[name][0].train()
            except BaseException as exc:
                errors[name] = exc
                baton.abort()

        for name, (trainer, timer, _) in built.items():
            trainer.add_callback(StepClock(name, timer))
        threads = [threading.Thread(target=train, args=(name,), name=name) for name in VARIANTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise next(iter(errors.values()))
        results = {}
        for name, (trainer, timer, info) in built.items():
            teacher = getattr(trainer, "teacher", None)
            active = [r["sdpo/reprompt_sample_fraction"] for r in trainer.state.log_history
                      if "sdpo/reprompt_sample_fraction" in r]
            results[name] = {
                "variant": name,
                "steps": timer.steps[args.warmup:],
                "mean_shapes": {k: statistics.fmean(v) for k, v in info["shapes"].items()},
                "reprompt_sample_fraction": statistics.fmean(active) if active else None,
                "teacher_full_forward": _full_teacher_forward(teacher, info["teacher_input"])
                if info["teacher_input"] else None,
                "hidden_state_path": getattr(trainer, "_hidden_state_path", None),
                "params": sum(p.numel() for p in trainer.model.parameters()),
                "vocab": trainer.model.config.vocab_size,
            }
    Path(args.out).write_text(json.dumps(results))


# ------------------------------------------------------------------------------------------------ driver
def _run_round(args: argparse.Namespace, argv: list[str]) -> dict[str, dict[str, Any]]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [sys.executable, __file__, *argv, "--worker", "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"round failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--model", args.model, "--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers),
            "--batch-size", str(args.batch_size), "--num-generations", str(args.num_generations),
            "--completion-length", str(args.completion_length), "--difficulty", str(args.difficulty),
            "--reward", args.reward, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--seed", str(args.seed)]
    return argv + [flag for flag, on in (("--bf16", args.bf16),
                                         ("--activation-checkpointing", args.activation_checkpointing)) if on]


def _median(steps: list[dict[str, float]], key: str) -> float:
    values = [s.get(key, 0.0) for s in steps]
    return statistics.median(values) if values else float("nan")


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and return its numbers (medians in seconds, ratios)."""
    steps = {v: [s for r in results[v] for s in r["steps"]] for v in VARIANTS}
    medians = {v: {key: _median(steps[v], key) for _, key in ROWS} for v in VARIANTS}
    first = results["SDPO"][0]
    shapes = first["mean_shapes"]
    print(f"\nmodel {args.model} ({first['params'] / 1e6:.1f} M params, vocab {first['vocab']}, "
          f"{args.threads or 'default'} threads), "
          f"batch {args.batch_size} = {args.batch_size // args.num_generations} prompts x {args.num_generations}, "
          f"<= {args.completion_length} new tokens, reward {args.reward}, {'bf16' if args.bf16 else 'fp32'}")
    print(f"rounds {args.rounds} x {args.steps} steps per variant, first {args.warmup} of each dropped: "
          f"{len(steps['GRPO'])} GRPO and {len(steps['SDPO'])} SDPO steps kept")
    completion = shapes.get("completion_tokens", 0) / args.batch_size
    print(f"mean tokens per row: student input {shapes.get('student_tokens', 0):.0f}, teacher input "
          f"{shapes.get('teacher_tokens', 0):.0f}, completion {completion:.1f}; "
          f"SDPO rows with a teacher {first.get('reprompt_sample_fraction')}")
    print(f"\n{'median ms per step':<22}{'GRPO':>9}{'SDPO':>9}{'SDPO/GRPO':>11}{'Δ ms':>9}")
    for label, key in ROWS:
        g, s = medians["GRPO"][key], medians["SDPO"][key]
        ratio_cell = f"{s / g:10.2f}x" if g > 1e-4 else f"{'-':>11}"
        print(f"{label:<22}{_fmt(g)}{_fmt(s)}{ratio_cell}{_fmt(s - g)}")
    grpo_step, sdpo_step = medians["GRPO"]["step"], medians["SDPO"]["step"]
    probes = [r["teacher_full_forward"] for r in results["SDPO"] if r.get("teacher_full_forward") is not None]
    teacher = statistics.median(probes) if probes else medians["SDPO"]["teacher_forward"]
    ratio = sdpo_step / grpo_step
    floor = (grpo_step + teacher) / grpo_step
    path = "hidden-state" if first.get("hidden_state_path") else "full-logits"
    print(f"\nSDPO loss path: {path}; one plain teacher forward with logits (probe): {teacher * 1000:.1f} ms")
    print(f"SDPO / GRPO step: {ratio:.2f}x (target <= 1.0x: {'met' if ratio <= 1.0 else 'NOT met'})")
    print(f"plain-teacher floor (GRPO step + one unshared teacher forward): {floor:.2f}x; "
          f"measured is {ratio - floor:+.2f} above it, "
          f"{(sdpo_step - grpo_step - teacher) * 1000:+.0f} ms/step beyond the teacher forward")
    spread = {v: (min(s["step"] for s in steps[v]), max(s["step"] for s in steps[v])) for v in VARIANTS}
    print("step range ms: " + ", ".join(f"{v} {a * 1000:.0f}-{b * 1000:.0f}" for v, (a, b) in spread.items()))
    return {"medians_s": medians, "ratio": ratio, "floor_ratio": floor, "teacher_forward_probe_s": teacher,
            "loss_path": path, "shapes": shapes,
            "reprompt_sample_fraction": first.get("reprompt_sample_fraction")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random Llama), 'demo' (SmolLM2-135M) or a path")
    parser.add_argument("--tiny", action="store_true", help="the smallest setting (hidden 64, 2 layers)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--difficulty", type=int, default=0, help="math problem difficulty (prompts)")
    parser.add_argument("--reward", choices=("synthetic", "math"), default="synthetic")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes, each running both")
    parser.add_argument("--steps", type=int, default=6, help="steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each round")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 because spin-waiting threads collapse when "
                             "another process takes a core")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="TRL's default; off by default here as in `sdpo train`")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.hidden_size, args.num_layers = 64, 2
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    if args.worker:
        _worker(args)
        return
    argv = _worker_argv(args)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    started = time.monotonic()
    for r in range(args.rounds):
        for variant, result in _run_round(args, argv).items():
            results[variant].append(result)
        medians = ", ".join(f"{v} {_median(results[v][-1]['steps'], 'step') * 1000:.0f} ms" for v in VARIANTS)
        print(f"round {r + 1}/{args.rounds}: median step {medians} ({time.monotonic() - started:.0f} s elapsed)",
              flush=True)
    summary = report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "rounds": results}, indent=1))


if __name__ == "__main__":
    main()

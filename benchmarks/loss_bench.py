"""Forward+backward time and peak memory of SDPO's distillation loss, ours against two peers.

    python benchmarks/loss_bench.py            # from logits, then from hidden states at 4x1024 and 8x2048 tokens
    python benchmarks/loss_bench.py --no-logits --profile 4x1024x49152   # the hidden-state section + a profile
    python benchmarks/loss_bench.py --quick    # small shapes (chunk 64 so chunking shows), about a minute

What is compared (top-K=100 + tail, α ∈ {0.5, 1.0}, the same fp32 inputs, logits already tempered):

- `ours_chunked`: `sdpo_core.loss.chunked_per_token_distillation_loss` (chunk 1024), the trainer's path.
- `ours_plain`: `sdpo_core.loss.per_token_distillation_loss`, plain autograd, the reference for the checks.
- `trl`: `trl.experimental.sdpo.loss_utils.compute_topk_self_distillation_loss` (trl 1.16.0), called with
  `distillation_topk=100, distillation_add_tail=True`. Same semantics as ours (a port of lasgroup/SDPO); TRL's
  *config* defaults differ (`distillation_mode="sampled_token"`, no tail), so it is configured explicitly.
- `sdpo_rl`: PyPI `sdpo-rl` 0.0.3, `sdpo_rl.distillation.top_k_kl_divergence` fed the way its trainer feeds it
  (`trainer.py`: full `log_softmax` of the student, `topk` on it, teacher `log_softmax` under `no_grad` gathered
  at the student's indices). Same semantics; its trainer does not divide logits by the temperature (docs/peers.md
  SDPO-RL-5), which does not matter here since inputs are already tempered. Measuring only: install it with
  `pip install --no-deps sdpo-rl`; it is never a dependency of sdpo-gym. Skipped with a message if absent.

A second section starts from hidden states `[B, T, H]` (H 576, the demo model's) and LM heads `[V, H]` at
4x1024 and 8x2048 tokens, V 49152 and 151936 (`--sweep`), one forward+backward down to the student's hidden
states and head weight, the loss a token mean:

- `ours_fused`: `sdpo_core.loss.weighted_distillation_loss`, the trainer's path. The token weights are known
  before the loss, so each chunk's logit gradient is contracted with the head in forward, while its logits exist.
- `ours_hidden`: `sdpo_core.loss.chunked_distillation_loss`, the per-token function; its backward recomputes
  each chunk's logits.
- the peers get full logits `hidden @ W.T` (and the teacher's under `no_grad`) and backpropagate through them.
  A peer whose logits cannot fit the free memory (estimated from its measured copies of `[B, T, V]`) is
  skipped with the estimate, not run into the OOM killer.

`--profile BxTxV` times `ours_fused`'s phases one by one over the same chunks with the loss module's own helpers
(head matmuls, logsumexp/top-K/gathers, the logit gradient, the two gradient matmuls) and what backward's
recompute adds to the per-token path.

How memory is measured. Each case (device, shape, α) runs in a fresh interpreter that first runs every
implementation once on a tiny input (imports and lazy initialisation are not the loss's memory), then
measures the implementations one after another on the same inputs:

- CPU: Linux peak RSS. Before each run the worker reads `VmRSS` and resets the high-water mark by writing
  `5` to `/proc/self/clear_refs`; after forward+backward it reports `VmHWM − baseline`, the extra resident
  memory at the peak, including the student's `[B, T, V]` gradient and every temporary. torch's CPU
  allocator does not cache, and the worker runs with `MALLOC_MMAP_THRESHOLD_=131072`, so glibc returns every
  freed block above 128 KiB to the OS: RSS follows live tensors and one implementation cannot reuse pages
  another freed. `tracemalloc` cannot see torch's allocations, hence RSS.
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory allocated
  before the run.
- As a trainer does, the harness keeps no reference to the teacher's logits once the loss is computed, so a
  loss that does not keep them for backward gets the benefit.

Time is the median wall-clock of `--repeats` forward+backward runs after the memory run (which warms
caches); the fixed mmap threshold makes every large allocation pay its page faults, as torch's CPU
allocator does anyway for tensors above 32 MiB. On a shared machine times are noisy; memory is not. The
check reruns every implementation on the same inputs and compares the per-token loss and the student-logit
gradient with `ours_plain`, and the loss with a float64 evaluation of the same formula: where an fp32
implementation disagrees with ours, that column says which one rounding moved (sdpo-rl's `log_softmax`
path drifts ~1e-4 at α=1 on 49k-token vocabularies; ours and TRL's `logits − logsumexp` stay ~1e-5).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdpo_core import loss as sdpo_loss

TOPK = 100
CHUNK_SIZE = 1024
_settings = {"chunk_size": CHUNK_SIZE}  # set by the worker from --chunk-size
ALPHAS = (0.5, 1.0)
LOGIT_SCALE = 3.0
TOLERANCE = 1e-5
MIB = 2**20

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


# ------------------------------------------------------------------------------------------------ implementations
def _ours_chunked(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    return sdpo_loss.chunked_per_token_distillation_loss(
        student_logits, teacher_logits, alpha=alpha, topk=TOPK, add_tail=True, chunk_size=_settings["chunk_size"]
    )


def _ours_plain(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    return sdpo_loss.per_token_distillation_loss(student_logits, teacher_logits, alpha=alpha, topk=TOPK, add_tail=True)


def _trl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.sdpo.loss_utils import compute_topk_self_distillation_loss

    return compute_topk_self_distillation_loss(
        student_logits, teacher_logits, distillation_topk=TOPK, distillation_alpha=alpha, distillation_add_tail=True
    )


def _sdpo_rl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    from sdpo_rl.distillation import top_k_kl_divergence

    # the feeding done by sdpo_rl/trainer.py before its loss call
    student_logps = torch.log_softmax(student_logits, dim=-1)  # [B, T, V]
    student_topk_logps, topk_indices = torch.topk(student_logps, k=TOPK, dim=-1)  # [B, T, K]
    with torch.no_grad():
        teacher_topk_logps = torch.log_softmax(teacher_logits, dim=-1).gather(-1, topk_indices)  # [B, T, K]
    return top_k_kl_divergence(student_topk_logps, teacher_topk_logps, alpha=alpha, add_tail=True)


IMPLS: dict[str, LossFn] = {"ours_chunked": _ours_chunked, "ours_plain": _ours_plain, "trl": _trl,
                            "sdpo_rl": _sdpo_rl}
OURS = "ours_chunked"


def _peer_missing(name: str) -> str | None:
    """Why a peer cannot run, or None."""
    if name == "trl" and importlib.util.find_spec("trl.experimental.sdpo") is None:
        return "trl.experimental.sdpo not found (needs trl 1.16)"
    if name == "sdpo_rl" and importlib.util.find_spec("sdpo_rl") is None:
        return "sdpo-rl is not installed; for measuring only: pip install --no-deps sdpo-rl"
    return None


# ------------------------------------------------------------------------------------------------ measuring
class _Memory:
    """Peak extra memory of one run: CUDA allocator stats, or Linux RSS high-water mark (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0

    @staticmethod
    def _status(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"{field} missing from /proc/self/status")
        return int(match.group(1)) * 1024

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = self._status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return self._status("VmHWM") - self.baseline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _randn(shape: tuple[int, ...], seed: int, device: torch.device, scale: float = LOGIT_SCALE) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    out = torch.randn(shape, generator=generator, device=device)
    return out.mul_(scale)


def _logits_inputs(case: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (case["B"], case["T"], case["V"])
    return _randn(shape, 1, device).requires_grad_(), _randn(shape, 2, device)


def _measure(run: Callable[[], None], device: torch.device) -> tuple[float, int]:
    """Wall time and peak extra memory of one `run()`."""
    memory = _Memory(device)
    memory.start()
    start = time.perf_counter()
    run()
    _sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, memory.peak()


def _logits_case(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every implementation on one `B x T x V` case: memory of a first run, median time, agreement."""
    alpha = case["alpha"]
    results: dict[str, Any] = {}
    student = _randn((case["B"], case["T"], case["V"]), 1, device).requires_grad_()
    for name in case["impls"]:
        fn = IMPLS[name]
        teacher = [_randn(student.shape, 2, device)]

        def run(fn: LossFn = fn, teacher: list[torch.Tensor] = teacher) -> None:
            loss = fn(student, teacher.pop(), alpha)  # the harness keeps no teacher reference, like the trainer
            loss.mean().backward()

        try:
            first, peak = _measure(run, device)
            student.grad = None
            times = []
            for _ in range(case["repeats"]):
                teacher.append(_randn(student.shape, 2, device))
                times.append(_measure(run, device)[0])
                student.grad = None
            results[name] = {"time": statistics.median(times) if times else first, "peak": peak}
        except Exception as error:  # an OOM in one implementation must not hide the others
            results[name] = {"error": f"{type(error).__name__}: {error}"[:200]}
        student.grad = None
    results["check"] = _check_logits(student, alpha, case["impls"], device)
    return results


def _fp64_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float, rows: int = 128) -> torch.Tensor:
    """The top-K + tail loss in float64, row chunk by row chunk: the yardstick for fp32 rounding."""
    student_rows, teacher_rows = student.detach().flatten(0, -2), teacher.flatten(0, -2)  # [N, V]
    out = []
    for start in range(0, student_rows.size(0), rows):
        z_s, z_t = student_rows[start:start + rows].double(), teacher_rows[start:start + rows].double()
        index = z_s.topk(TOPK, dim=-1).indices  # [n, K]
        buckets = []
        for z in (z_s, z_t):
            topk_logps = z.gather(-1, index) - z.logsumexp(-1, keepdim=True)  # [n, K]
            mass = topk_logps.logsumexp(-1, keepdim=True).clamp(max=-1e-7)
            buckets.append(torch.cat([topk_logps, torch.log(-torch.expm1(mass))], dim=-1))  # [n, K+1]
        log_s, log_t = buckets

        def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
            return (log_p.exp() * (log_p - log_q)).sum(-1)

        if alpha == 1.0:
            out.append(kl(log_s, log_t))
        else:  # the benchmark's α are 0.5 and 1.0
            log_m = torch.logaddexp(log_s + math.log1p(-alpha), log_t + math.log(alpha))
            out.append((1 - alpha) * kl(log_s, log_m) + alpha * kl(log_t, log_m))
    return torch.cat(out).view(student.shape[:-1])


def _grad(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.grad`, which the backward pass just run has set."""
    assert tensor.grad is not None
    return tensor.grad


def _check_logits(student: torch.Tensor, alpha: float, impls: list[str], device: torch.device) -> dict[str, Any]:
    """Max |Δ| of loss and student-logit gradient vs `ours_plain`, and of the loss vs a float64 reference."""
    teacher = _randn(student.shape, 2, device)
    exact = _fp64_loss(student, teacher, alpha)
    reference = _ours_plain(student, teacher, alpha)
    reference.mean().backward()
    ref_loss, ref_grad = reference.detach(), _grad(student)
    student.grad = None
    report: dict[str, Any] = {"ours_plain": {"fp64_diff": (ref_loss.double() - exact).abs().max().item()}}
    for name in impls:
        if name == "ours_plain":
            continue
        try:
            out = IMPLS[name](student, teacher, alpha)
            out.mean().backward()
        except Exception as error:
            report[name] = {"error": f"{type(error).__name__}: {error}"[:200]}
            continue
        report[name] = {
            "loss_diff": (out.detach() - ref_loss).abs().max().item(),
            "grad_diff": (_grad(student) - ref_grad).abs().max().item(),
            "fp64_diff": (out.detach().double() - exact).abs().max().item(),
            "agree": torch.allclose(out.detach(), ref_loss, rtol=TOLERANCE, atol=TOLERANCE)
            and torch.allclose(_grad(student), ref_grad, rtol=TOLERANCE, atol=TOLERANCE),
        }
        student.grad = None
        del out
    return report


HIDDEN_IMPLS = ("ours_fused", "ours_hidden", "trl", "sdpo_rl")
# extra peak of a peer from logits, in units of one fp32 [B, T, V] tensor (measured: TRL 5.0, sdpo-rl 4.0)
PEER_LOGIT_COPIES = {"trl": 5.5, "sdpo_rl": 4.5}


def _hidden_inputs(case: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    batch, length, vocab, hidden = case["B"], case["T"], case["V"], case["H"]
    return {
        "student_hidden": _randn((batch, length, hidden), 3, device, scale=1.0).requires_grad_(),
        "teacher_hidden": _randn((batch, length, hidden), 4, device, scale=1.0),
        # scaled so the logits have std ~LOGIT_SCALE, like the logits section
        "student_head": _randn((vocab, hidden), 5, device, scale=LOGIT_SCALE / hidden**0.5).requires_grad_(),
        "teacher_head": _randn((vocab, hidden), 6, device, scale=LOGIT_SCALE / hidden**0.5),
    }


def _hidden_run(name: str, inputs: dict[str, torch.Tensor], alpha: float, chunk_size: int) -> None:
    """One forward + backward of `name` down to the student's hidden states and LM-head weight, loss = token mean."""
    student_hidden, student_head = inputs["student_hidden"], inputs["student_head"]
    options: dict[str, Any] = {"temperature": 1.0, "alpha": alpha, "topk": TOPK, "add_tail": True,
                               "chunk_size": chunk_size}
    if name == "ours_fused":  # the trainer's path: the token weights are known up front
        weights = torch.full(student_hidden.shape[:-1], 1.0 / student_hidden.shape[:-1].numel(),
                             device=student_hidden.device)
        loss = sdpo_loss.weighted_distillation_loss(student_hidden, inputs["teacher_hidden"], student_head,
                                                    inputs["teacher_head"], weights, **options).loss
    elif name == "ours_hidden":  # the per-token function, whose backward recomputes each chunk's logits
        loss = sdpo_loss.chunked_distillation_loss(student_hidden, inputs["teacher_hidden"], student_head,
                                                   inputs["teacher_head"], **options).mean()
    else:
        student_logits = student_hidden @ student_head.T  # [B, T, V]
        with torch.no_grad():
            teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head"].T  # [B, T, V]
        loss = IMPLS[name](student_logits, teacher_logits, alpha).mean()
        del student_logits, teacher_logits
    loss.backward()


def _hidden_case(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Each implementation once from hidden states `[B, T, H]` and LM heads `[V, H]`: time and extra peak memory."""
    inputs = _hidden_inputs(case, device)
    results: dict[str, Any] = {}
    for name in case["impls"]:
        if name in case.get("skip", {}):
            results[name] = {"error": case["skip"][name]}
            continue
        def run(name: str = name) -> None:
            _hidden_run(name, inputs, case["alpha"], case["chunk_size"])
            inputs["student_hidden"].grad = inputs["student_head"].grad = None

        try:
            elapsed, peak = _measure(run, device)  # memory of a first run, then the median of timed reruns
            times = [_measure(run, device)[0] for _ in range(case["repeats"])]
            results[name] = {"time": statistics.median(times) if times else elapsed, "peak": peak}
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"[:200]}
        inputs["student_hidden"].grad = inputs["student_head"].grad = None
    return results


def _profile_case(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Where ours_fused's time goes, phase by phase over the same chunks (the loss module's own helpers), and
    what backward's recompute costs the per-token path on top."""
    from sdpo_core.loss import _chunk_forward, _DistillSpec, _topk_logit_grad

    inputs = _hidden_inputs(case, device)
    rows = inputs["student_hidden"].detach().flatten(0, 1)
    teacher_rows = inputs["teacher_hidden"].flatten(0, 1)
    head, teacher_head = inputs["student_head"].detach(), inputs["teacher_head"]
    chunk = case["chunk_size"]
    spec = _DistillSpec(alpha=case["alpha"], topk=TOPK, add_tail=True, chunk_size=chunk, temperature=1.0,
                        vocab_size=case["V"], needs_grad=True)
    phases: dict[str, float] = {}

    # `...`, not `[]`: mypy cannot infer the lambdas below, whose defaults bind the loop variables (mypy#12557)
    def timed(phase: str, fn: Callable[..., Any]) -> Any:
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start
        return out

    workspace = torch.empty(chunk, case["V"], device=device)
    grad_head = torch.zeros_like(head)
    for start in range(0, rows.size(0), chunk):
        x, x_teacher = rows[start:start + chunk], teacher_rows[start:start + chunk]
        student_logits = timed("student head matmul (forward)", lambda x=x: x @ head.T)
        teacher_logits = timed("teacher head matmul", lambda x=x_teacher: x @ teacher_head.T)
        out = timed("logsumexp x2, top-K, gathers, K-sized autograd",
                    lambda s=student_logits, t=teacher_logits: _chunk_forward(spec, slice(0, None), s, t, None,
                                                                              workspace))
        scale = torch.full((x.size(0), 1), 1.0 / rows.size(0), device=device)
        logit_grad = timed("logit gradient (one exp over V)",
                           lambda s=student_logits, o=out, sc=scale: _topk_logit_grad(
                               s, o.topk.student_logsumexp, o.topk.indices, o.topk.logps_grad, sc,
                               out=workspace[: s.size(0)]))
        timed("gradient matmul to the hidden states", lambda g=logit_grad: g @ head)
        timed("gradient matmul to the head", lambda g=logit_grad, x=x: grad_head.addmm_(g.T, x))
        timed("per-token path only: backward's recompute matmul", lambda x=x: x @ head.T)
    return {"phases": phases}


def _worker(job: dict[str, Any]) -> None:
    """Subprocess entry: warm every implementation up on a tiny case, run the job, print JSON last."""
    _settings["chunk_size"] = job["chunk_size"]
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    case_fn = {"logits": _logits_case, "hidden": _hidden_case, "profile": _profile_case}[job["kind"]]
    case_fn({**job, "B": 1, "T": 4, "V": 4 * TOPK, "H": 8, "repeats": 0, "skip": {}}, device)  # imports, lazy init
    print(json.dumps(case_fn(job, device)))


def _spawn(job: dict[str, Any]) -> dict[str, Any]:
    """Run one case in a fresh interpreter; glibc returns every freed block above 128 KiB to the OS."""
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ report
def _fmt_ratio(ours: dict[str, Any], peer: dict[str, Any], key: str) -> str:
    if "error" in ours or "error" in peer or not peer[key]:
        return "-"
    return f"{ours[key] / peer[key]:.2f}"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def _logits_section(args: argparse.Namespace, devices: list[str], impls: list[str]) -> None:
    print(f"\n== Loss from logits: forward+backward, top-K={TOPK} + tail, fp32, chunk {args.chunk_size} ==")
    print("peak = extra memory at the peak over the inputs, incl. the student's [B,T,V] gradient; the teacher's"
          " logits are released after the forward, as in the trainer;"
          f" ratios are {OURS} / impl (< 1: ours is faster / smaller)")
    rows = []
    for device in devices:
        for batch, length, vocab in args.shapes:
            for alpha in ALPHAS:
                results = _spawn({"kind": "logits", "device": device, "threads": args.threads, "B": batch,
                                  "T": length, "V": vocab, "alpha": alpha, "repeats": args.repeats,
                                  "impls": impls, "chunk_size": args.chunk_size})
                label = [device, f"{batch}x{length}x{vocab}", str(alpha)]
                if "error" in results:
                    rows.append([*label, "all", "-", "-", "-", "-", results["error"]])
                    continue
                ours, check = results[OURS], results["check"]
                for name in impls:
                    res, c = results[name], check.get(name, {})
                    agree, exact = "-", f"{c['fp64_diff']:.1e}" if "fp64_diff" in c else "-"
                    if "error" in c:
                        agree = c["error"]
                    elif name == "ours_plain":
                        agree = "reference"
                    elif c:
                        agree = f"{'OK' if c['agree'] else 'DIFF'} loss {c['loss_diff']:.1e} grad {c['grad_diff']:.1e}"
                    if "error" in res:
                        rows.append([*label, name, "-", "-", "-", "-", agree, exact, res["error"]])
                        continue
                    rows.append([*label, name, f"{res['time']:.3f}", f"{res['peak'] / MIB:.0f}",
                                 _fmt_ratio(ours, res, "time"), _fmt_ratio(ours, res, "peak"), agree, exact])
    _table(rows, ["device", "BxTxV", "alpha", "impl", "time s", "peak MiB", "t ratio", "mem ratio",
                  f"vs ours_plain (rtol=atol={TOLERANCE:g})", "loss |Δ| vs fp64"])


def _available_memory() -> int:
    """MemAvailable in bytes (Linux), or 0 when unknown."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE) \
        if Path("/proc/meminfo").exists() else None
    return int(match.group(1)) * 1024 if match else 0


def _peer_skips(batch: int, length: int, vocab: int, device: str, impls: list[str]) -> dict[str, str]:
    """Peers whose full-size logits cannot fit this machine's free memory: skipped with the reason, not run into
    the OOM killer."""
    available = _available_memory() if device == "cpu" else 0
    logits_bytes = batch * length * vocab * 4
    return {name: f"skipped: needs ~{PEER_LOGIT_COPIES[name] * logits_bytes / 2**30:.0f} GiB (est.), "
                  f"{available / 2**30:.0f} GiB free"
            for name in impls if name in PEER_LOGIT_COPIES and available
            and PEER_LOGIT_COPIES[name] * logits_bytes > 0.9 * available}


def _hidden_section(args: argparse.Namespace, devices: list[str], impls: list[str]) -> None:
    names = [n for n in HIDDEN_IMPLS if n in ("ours_fused", "ours_hidden") or n in impls]
    print(f"\n== From hidden states (H={args.hidden}, alpha=0.5, top-K={TOPK} + tail, fp32,"
          f" chunk {args.sweep_chunk_size}): one forward+backward to the hidden states and the LM-head weight;"
          " the peers get full logits hidden @ W.T ==")
    print("ours_fused: weighted_distillation_loss (the trainer's path); ours_hidden: chunked_distillation_loss;"
          " ratios are ours_fused / TRL")
    rows = []
    for device in devices:
        for batch, length, vocab in args.sweep:
            results = _spawn({"kind": "hidden", "device": device, "threads": args.threads, "B": batch, "T": length,
                              "V": vocab, "H": args.hidden, "alpha": 0.5, "impls": names,
                              "chunk_size": args.sweep_chunk_size, "repeats": args.sweep_repeats,
                              "skip": _peer_skips(batch, length, vocab, device, names)})
            row = [device, f"{batch}x{length}x{vocab}"]
            for name in names:
                res = results.get(name, results)
                row.append("-" if "error" in res else f"{res['peak'] / MIB:.0f} MiB / {res['time']:.2f}s")
                if "error" in res:
                    print(f"  {name} at {batch}x{length}x{vocab}: {res['error']}")
            fused, trl = results.get("ours_fused", {}), results.get("trl", {"error": "absent"})
            row += [_fmt_ratio(fused, trl, "time"), _fmt_ratio(fused, trl, "peak")] if "error" not in fused \
                else ["-", "-"]
            rows.append(row)
    _table(rows, ["device", "BxTxV", *[f"{n} peak / time" for n in names], "t ratio", "mem ratio"])


def _profile_section(args: argparse.Namespace) -> None:
    batch, length, vocab = args.profile
    print(f"\n== Where ours_fused's time goes at {batch}x{length}x{vocab}, H={args.hidden}, chunk"
          f" {args.sweep_chunk_size} (phases timed one by one over every chunk) ==")
    results = _spawn({"kind": "profile", "device": "cpu", "threads": args.threads, "B": batch, "T": length,
                      "V": vocab, "H": args.hidden, "alpha": 0.5, "impls": [], "chunk_size": args.sweep_chunk_size})
    if "error" in results:
        print(f"  {results['error']}")
        return
    phases = results["phases"]
    fused_total = sum(v for k, v in phases.items() if not k.startswith("per-token"))
    _table([[phase, f"{seconds:.3f}", f"{seconds / fused_total:.0%}" if not phase.startswith("per-token") else "-"]
            for phase, seconds in phases.items()], ["phase", "s", "share of ours_fused"])


def _parse_shape(text: str) -> tuple[int, int, int]:
    batch, length, vocab = (int(x) for x in text.lower().split("x"))
    return batch, length, vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, help="BxTxV cases for the logits section")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after the memory run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of our chunked losses")
    parser.add_argument("--sweep", nargs="+", type=_parse_shape, help="BxTxV cases of the hidden-state section")
    parser.add_argument("--sweep-chunk-size", type=int, default=None, help="chunk of the hidden-state section")
    parser.add_argument("--sweep-repeats", type=int, default=1,
                        help="timed runs per implementation after the memory run in the hidden-state section")
    parser.add_argument("--hidden", type=int, default=None, help="H of the hidden-state section")
    parser.add_argument("--no-sweep", action="store_true", help="skip the hidden-state section")
    parser.add_argument("--no-logits", action="store_true", help="skip the loss-from-logits section")
    parser.add_argument("--profile", type=_parse_shape, default=None,
                        help="BxTxV: also time ours_fused phase by phase (--quick: a small default)")
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return

    if args.quick:
        args.shapes = args.shapes or [(2, 128, 8192), (1, 128, 32768)]
        args.repeats = 1 if args.repeats is None else args.repeats
        args.chunk_size = args.chunk_size or 64
        args.sweep_chunk_size = args.sweep_chunk_size or 64
        args.hidden = args.hidden or 64
        args.sweep = args.sweep or [(1, 128, 8192), (1, 256, 16384)]
        args.profile = args.profile or (1, 128, 8192)
    else:
        args.shapes = args.shapes or [(8, 512, 49152), (4, 512, 151936)]
        args.repeats = 2 if args.repeats is None else args.repeats
        args.chunk_size = args.chunk_size or CHUNK_SIZE
        args.sweep_chunk_size = args.sweep_chunk_size or CHUNK_SIZE
        args.hidden = args.hidden or 576
        args.sweep = args.sweep or [(4, 1024, 49152), (4, 1024, 151936), (8, 2048, 49152), (8, 2048, 151936)]
    if args.no_sweep:
        args.sweep = []

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # find_spec imports trl.experimental
    devices = ["cpu"]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append("cuda")
    if not sys.platform.startswith("linux"):
        print("note: CPU peak memory needs Linux /proc; CPU memory columns will be errors elsewhere")
    impls = []
    for name in IMPLS:
        reason = _peer_missing(name)
        if reason:
            print(f"skipping {name}: {reason}")
        else:
            impls.append(name)
    with contextlib.suppress(Exception):
        import trl

        print(f"torch {torch.__version__}, trl {trl.__version__}, threads {args.threads or torch.get_num_threads()}")
    if not args.no_logits:
        _logits_section(args, devices, impls)
    if args.sweep:
        _hidden_section(args, devices, impls)
    if args.profile:
        _profile_section(args)


if __name__ == "__main__":
    main()

"""The trainer benchmarks run end to end at a microscopic size on the tiny model (about 10 s, 70 s and 60 s
on idle cores).

Why: they drive the trainers through private seams (timers on instance methods, subprocess workers) or read
`sdpo train`'s output files, so a change in the trainer, the CLI or TRL can break them silently; this runs each
once, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *argv: str, cwd: Path) -> str:
    env = {**os.environ, "SDPO_LOAD_PLUGINS": "math", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_step_overhead_prints_its_table(tmp_path):
    out = tmp_path / "overhead.json"
    stdout = _run("step_overhead.py", "--tiny", "--rounds", "1", "--steps", "2", "--warmup", "1", "--threads", "1",
                  "--completion-length", "8", "--json", str(out), cwd=tmp_path)
    for row in ("generation", "teacher forward", "backward", "whole step", "SDPO / GRPO step:", "floor"):
        assert row in stdout
    summary = json.loads(out.read_text())["summary"]
    assert summary["ratio"] > 0
    assert summary["medians_s"]["SDPO"]["teacher_forward"] > 0  # the synthetic reward gives every row a teacher
    assert summary["medians_s"]["GRPO"]["teacher_forward"] == 0


def test_loss_bench_times_the_fused_loss_against_trl_and_profiles_it(tmp_path):
    stdout = _run("loss_bench.py", "--quick", "--no-logits", "--threads", "1", "--sweep", "1x64x4096",
                  "--profile", "1x64x4096", cwd=tmp_path)
    table_row = next(line for line in stdout.splitlines() if line.startswith("cpu     1x64x4096"))
    assert "error" not in table_row
    assert "-  " not in table_row
    for phase in ("student head matmul", "gradient matmul to the head", "backward's recompute matmul"):
        assert phase in stdout


def test_tail_bias_measures_the_entropy_pull_of_each_divergence(tmp_path):
    from sdpo_core.testing import save_tiny_model

    tail_bias = _benchmark_module("tail_bias")
    model = Path(save_tiny_model(tmp_path / "tiny-model"))
    out = tmp_path / "tail_bias.json"
    stdout = _run("tail_bias.py", "--model", str(model), "--prompts", "1", "--topk", "8", "--json", str(out),
                  cwd=tmp_path)
    summary = json.loads(out.read_text())["summary"]["all"]
    assert summary["tokens"] > 0
    assert 0 <= summary["student_tail"] <= 1
    assert 0 <= summary["teacher_tail"] <= 1
    assert set(summary["entropy_pull"]) == set(tail_bias.DIVERGENCES)
    assert all(0 <= pull["flatter"] <= 1 for pull in summary["entropy_pull"].values())
    assert "entropy pull" in stdout


@pytest.mark.slow
def test_learning_efficacy_writes_results_and_plot(tmp_path):
    out_dir = tmp_path / "results"
    stdout = _run("learning_efficacy.py", "--tiny", "--steps", "2", "--seeds", "1", "--eval-every", "1",
                  "--eval-size", "4", "--completion-length", "8", "--jobs", "2", "--out-dir", str(out_dir),
                  cwd=tmp_path)
    assert "held-out accuracy" in stdout
    assert "FAILED" not in stdout
    results = json.loads((out_dir / "learning_efficacy.json").read_text())
    assert {r["variant"] for r in results["runs"]} == {"grpo", "sdpo", "sdpo_no_feedback"}
    for variant, summary in results["summary"].items():
        assert [p["step"] for p in summary["accuracy"]] == [0, 1, 2], variant
    sdpo_run = next(r for r in results["runs"] if r["variant"] == "sdpo")
    assert len(sdpo_run["success_fraction"]) == 2
    assert all("sdpo/reprompt_sample_fraction" in log for log in sdpo_run["logs"])
    assert (out_dir / "learning_efficacy.png").stat().st_size > 10_000


def _benchmark_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_compare_keeps_each_step_with_the_heldout_accuracy_where_evaluated():
    demo_compare = _benchmark_module("demo_compare")
    records = [{"step": 0, "heldout/accuracy": 0.5, "heldout/seconds": 2.0}]
    records += [{"step": s, "reward": s / 4, "entropy": 2.0, "completions/mean_length": 10 * s} for s in (1, 2, 3, 4)]
    records.insert(3, {"step": 2, "heldout/error": "RuntimeError: broken", "heldout/seconds": 0.5})
    records += [{"step": 4, "heldout/accuracy": 0.75, "heldout/seconds": 2.5}, {"step": 4, "train_runtime": 9.0}]
    run = demo_compare.run_points(records)
    assert run["steps"] == [
        {"step": 1, "reward": 0.25, "entropy": 2.0, "heldout_accuracy": None},
        {"step": 2, "reward": 0.5, "entropy": 2.0, "heldout_accuracy": None},  # its evaluation failed
        {"step": 3, "reward": 0.75, "entropy": 2.0, "heldout_accuracy": None},
        {"step": 4, "reward": 1.0, "entropy": 2.0, "heldout_accuracy": 0.75},
    ]
    assert (run["heldout_before"], run["heldout_after"]) == (0.5, 0.75)
    assert run["heldout_errors"] == {"2": "RuntimeError: broken"}
    assert (run["eval_seconds"], run["train_runtime"], run["mean_length"]) == (5.0, 9.0, 25.0)
    lines = demo_compare.summary_lines({"runs": {"sdpo": {"0": {**run, "wall_seconds": 30.0}}}}, window=2)
    assert lines[1].split() == ["SDPO", "seed", "0", "0.500", "->", "0.750", "0.375", "->", "0.875", "2.000", "->",
                                "2.000", "25.0", "30"]


@pytest.mark.slow
def test_demo_compare_writes_results_plot_and_resumes(tmp_path):
    from sdpo_core.testing import save_tiny_model

    model = Path(save_tiny_model(tmp_path / "tiny-model"))
    results, figure = tmp_path / "demo_compare.json", tmp_path / "demo_compare.png"
    common = ["--out-dir", str(tmp_path / "runs"), "--results", str(results), "--plot", str(figure),
              # passed through to sdpo train: a 2-step run of the tiny model, evaluated at every step
              "--model", str(model), "--max_steps", "2", "--eval_every", "1", "--eval_size", "4",
              "--eval_batch_size", "4", "--max_completion_length", "8", "--num_generations", "4",
              "--per_device_train_batch_size", "4"]
    _run("demo_compare.py", "--variants", "grpo", "--seeds", "2", "--jobs", "2", *common, cwd=tmp_path)
    first = json.loads(results.read_text())
    assert set(first["runs"]) == {"grpo"}
    assert set(first["runs"]["grpo"]) == {"0", "1"}
    assert first["threads_per_run"] == max(1, (os.cpu_count() or 1) // 2)

    stdout = _run("demo_compare.py", "--seeds", "1", "--resume", *common, cwd=tmp_path)
    assert "1 run(s) to go (2 kept)" in stdout  # only SDPO seed 0 was missing
    assert "FAILED" not in stdout
    final = json.loads(results.read_text())
    assert final["runs"]["grpo"] == first["runs"]["grpo"]
    for variant in ("sdpo", "grpo"):
        run = final["runs"][variant]["0"]
        assert [p["step"] for p in run["steps"]] == [1, 2]
        assert all(isinstance(p["reward"], float) and isinstance(p["entropy"], float) for p in run["steps"])
        assert all(0.0 <= p["heldout_accuracy"] <= 1.0 for p in run["steps"])  # evaluated at every step here
        assert run["heldout_after"] == run["steps"][-1]["heldout_accuracy"]
        assert 0.0 <= run["heldout_before"] <= 1.0
        assert run["wall_seconds"] > 0
    assert final["runs"]["sdpo"]["0"]["heldout_before"] == final["runs"]["grpo"]["0"]["heldout_before"]
    assert "SDPO seed 0" in stdout
    assert "GRPO mean" in stdout
    assert figure.stat().st_size > 10_000


def _curve(*points: tuple[int, float]) -> list[dict]:
    return [{"step": s, "heldout_accuracy": a} for s, a in points]


def test_long_study_curves_start_at_the_evaluation_before_training():
    study = _benchmark_module("learning_efficacy_long")
    run = {"heldout_before": 0.5, "steps": [{"step": 1, "heldout_accuracy": None},
                                             {"step": 2, "heldout_accuracy": 0.75}]}
    assert study.heldout_curves({"runs": {"grpo": {"0": run}}}) == {"grpo": {"0": _curve((0, 0.5), (2, 0.75))}}


def test_long_study_fall_below_peak_is_measured_from_the_best_earlier_evaluation():
    study = _benchmark_module("learning_efficacy_long")
    assert study.largest_fall_below_peak(_curve((0, 0.5), (8, 0.9), (16, 0.7), (24, 0.85))) == pytest.approx(0.2)
    assert study.largest_fall_below_peak(_curve((0, 0.5), (8, 0.6))) == 0.0


def test_long_study_targets_from_hand_made_curves():
    study = _benchmark_module("learning_efficacy_long")
    curves = {
        "grpo": {"0": _curve((0, 0.5), (8, 0.6), (16, 0.7), (24, 0.8)),
                 "1": _curve((0, 0.5), (8, 0.6), (16, 0.7), (24, 0.8))},
        "guarded": {"0": _curve((0, 0.5), (8, 0.8), (16, 0.65), (24, 0.9)),   # falls 0.15 below its peak
                    "1": _curve((0, 0.5), (8, 0.8), (16, 0.65), (24, 0.9))},
    }
    targets = study.study_targets(curves, "guarded")
    assert targets["steps_compared"] == [8, 16, 24]
    assert (targets["at_or_above_grpo"], targets["below_at"]) == (False, [16])
    assert targets["grpo_final_mean"] == pytest.approx(0.8)
    assert (targets["reaches_grpo_final_at"], targets["half_the_steps"]) == (8, True)
    assert targets["fall_per_seed"] == {"0": pytest.approx(0.15), "1": pytest.approx(0.15)}
    assert targets["no_seed_falls"] is False
    assert study.study_targets({"grpo": curves["grpo"]}, "guarded") == {"complete": False, "missing": ["guarded"]}
    assert study.study_targets({"guarded_sharp": curves["guarded"]}, "guarded_sharp") == {
        "complete": False, "missing": ["grpo"]}


def test_long_study_equal_accuracies_summed_in_another_order_are_not_below():
    """46 + 43 + 47 and 44 + 45 + 47 of 48 correct: the same mean, though the floats differ in the last bits."""
    study = _benchmark_module("learning_efficacy_long")
    grpo = {str(i): _curve((0, 0.5), (8, n / 48)) for i, n in enumerate((46, 43, 47))}
    guarded = {str(i): _curve((0, 0.5), (8, n / 48)) for i, n in enumerate((44, 45, 47))}
    targets = study.study_targets({"grpo": grpo, "guarded": guarded}, "guarded")
    assert (targets["at_or_above_grpo"], targets["below_at"]) == (True, [])
    assert targets["reaches_grpo_final_at"] == 8


def test_long_study_report_rewrites_its_file_from_the_raw_results(tmp_path):
    step = {"step": 8, "reward": 0.5, "entropy": 1.5, "heldout_accuracy": 0.75}
    run = {"heldout_before": 0.5, "wall_seconds": 60.0, "steps": [step]}
    raw = {"sdpo_train_args": ["--max_steps", "8"], "total_seconds": 61.0, "jobs": 1,
           "runs": {"grpo": {"0": run}, "guarded": {"0": {**run, "steps": [{**step, "heldout_accuracy": 0.875}]}}}}
    results, figure = tmp_path / "long.json", tmp_path / "long.png"
    (tmp_path / "long_runs.json").write_text(json.dumps(raw))
    stdout = _run("learning_efficacy_long.py", "--report", "--results", str(results), "--plot", str(figure),
                  cwd=tmp_path)
    assert figure.stat().st_size > 10_000
    written = json.loads(results.read_text())
    assert written["curves"]["guarded"]["0"] == _curve((0, 0.5), (8, 0.875))
    assert written["run_seconds"] == {"grpo": {"0": 60.0}, "guarded": {"0": 60.0}}
    assert written["targets"]["guarded"]["at_or_above_grpo"] is True
    assert written["targets"]["guarded_sharp"] == {"complete": False, "missing": ["guarded_sharp"]}
    assert "guarded reaches GRPO's final 0.750 at step 8: within half the steps: False" in stdout  # not by its half
    assert "guarded_sharp targets: not checked, missing ['guarded_sharp']" in stdout


@pytest.mark.slow
def test_ray_bench_compares_ray_with_the_local_engine(tmp_path):
    pytest.importorskip("ray", reason='the Ray executor needs Ray: pip install "sdpo-gym[ray]"')
    out = tmp_path / "ray.json"
    stdout = _run("ray_bench.py", "--repeat", "1", "--rounds", "1", "--overhead_episodes", "2", "--out", str(out),
                  cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["verdicts_agree"] is True
    assert result["submissions"] == 24
    assert result["submissions_per_second"]["ray"] > 0
    assert "Ray adds" in stdout

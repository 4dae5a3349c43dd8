"""Sandbox throughput of sdpo-code, per backend, with 1 and 2 workers; and agreement with LiveCodeBench.

What it measures, on a fixed set (the bundled problems, each with a correct, a wrong, a looping and a
crashing solution):

- tests/second: tests actually executed (tests skipped after a timeout are not counted) per wall second;
  LCB stops at a submission's first failing test, sdpo-code only after a time or memory limit, so on wrong
  answers it runs more tests: submissions/second (the same work for both) is the fairer throughput;
- start-up latency: time from launching a sandbox to the harness saying ``ready`` (median and p90);
- if ``livecodebench`` is importable (PyPI ``nvidia-livecodebench``, installed ``--no-deps`` for measuring
  only; never a dependency), the same solutions through ``livecodebench.evaluation.testing_util.run_test``
  (one child process per solution, as LCB runs it; 1 and 2 at a time): verdict agreement and the ratios at
  equal workers.

Backends: ``bwrap`` (the default: sandboxes reused across solutions, one per worker, started inside the
measured time), ``bwrap-fresh`` (a new sandbox per solution), ``process``, ``docker``. Mixes: ``all`` (every kind)
and ``no-tle`` (without the endless loops, whose 1 s limit every grader must wait out). The backends and LCB take
turns, one pass each, ``--repeat`` times (default 1 with the loops, 10 without: one pass of those takes well
under a second): this VM's speed drifts by tens of percent within a minute, and alternating makes the drift
hit every side alike.

Usage: ``python benchmarks/sandbox_bench.py [--size quick|full] [--backends ...] [--mixes all,no-tle] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sdpo_code import CodeEnvironment, SandboxUnavailable, get_sandbox, load_bundled, parse_task

SOLUTIONS = {
    "sdpo-001": "a, b = map(int, input().split())\nprint(a + b)",
    "sdpo-003": "input()\nprint(max(map(int, input().split())))",
    "sdpo-006": "input()\nprint(sum(map(int, input().split())))",
    "sdpo-008": "class Solution:\n    def isPalindrome(self, s: str) -> bool:\n        return s == s[::-1]",
    "sdpo-010": "class Solution:\n    def evens(self, nums):\n        return [x for x in nums if x % 2 == 0]",
    "sdpo-012": "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
                "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                "                return [seen[target - x], i]\n            seen[x] = i",
}


def _variants(task_id: str, correct: str) -> dict[str, str]:
    functional = "class Solution" in correct
    if functional:
        method = correct.split("def ", 1)[1].split("(", 1)[0]
        wrong = f"class Solution:\n    def {method}(self, *args):\n        return 0"
        loop = f"class Solution:\n    def {method}(self, *args):\n        while True:\n            pass"
        crash = f"class Solution:\n    def {method}(self, *args):\n        return 1 // 0"
    else:
        wrong, loop, crash = "print(0)", "while True:\n    pass", "x = 1 // 0"
    return {"correct": correct, "wrong": wrong, "tle": loop, "re": crash}


def workload(size: str) -> list[tuple[dict[str, Any], str, str]]:
    rows = {r["task_id"]: r for r in load_bundled()}
    ids = list(SOLUTIONS)[: 3 if size == "quick" else len(SOLUTIONS)]
    return [(rows[i], kind, code) for i in ids for kind, code in _variants(i, SOLUTIONS[i]).items()]


# bench names that are a backend with options
_BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {"bwrap-fresh": ("bwrap", {"reuse": False})}


def make_environment(name: str, workers: int) -> CodeEnvironment:
    """The code environment on backend `name`, as a trainer would build it (sandboxes start on first use)."""
    backend, options = _BACKENDS.get(name, (name, {}))
    return CodeEnvironment(backend=get_sandbox(backend, **options), time_limit=1.0, max_workers=workers)


def ours_once(env: CodeEnvironment, items: list[tuple[dict[str, Any], str, str]], workers: int) -> dict[str, Any]:
    """One pass of the workload through `env`: wall seconds, tests executed, verdicts and per-solution figures."""
    tasks = [row for row, _, _ in items]
    completions = [f"```python\n{code}\n```" for _, _, code in items]
    start = time.monotonic()
    results = env.evaluate(tasks, completions, max_workers=workers)
    wall = time.monotonic() - start
    return {
        "wall": wall,
        "tests": sum(1 for r in results for t in r.details.get("tests", []) if t["verdict"] != "Not Run"),
        "startups": [r.details.get("startup_seconds", 0.0) for r in results],
        "verdicts": [r.details.get("verdict") for r in results],
        "seconds": [float(r.details.get("seconds", 0.0)) for r in results],
    }


# ---------------------------------------------------------------------------------------- LiveCodeBench
def _lcb_child(sample: dict[str, Any], code: str, timeout: int, queue: Any) -> None:
    from livecodebench.evaluation import testing_util

    try:
        results, meta = testing_util.run_test(sample, test=code, debug=False, timeout=timeout)
    except BaseException as exc:
        results, meta = [-4], {"error": repr(exc)}
    queue.put((list(results), {k: str(v)[:200] for k, v in (meta or {}).items()}))


def lcb_run(row: dict[str, Any], code: str, timeout: int = 1) -> tuple[str, int]:
    """LCB's verdict class and the number of tests it ran, for one solution."""
    task = parse_task(row)
    sample = {"input_output": json.dumps({"inputs": [t.input for t in task.tests],
                                          "outputs": [t.output for t in task.tests], "fn_name": task.func_name})}
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_lcb_child, args=(sample, code, timeout, queue))
    proc.start()
    proc.join((timeout + 1) * len(task.tests) + 5)  # LCB's global timeout
    if proc.is_alive():
        proc.kill()
        proc.join()
        return "Time Limit Exceeded", len(task.tests)
    results, _ = queue.get() if not queue.empty() else ([-1], {})
    if all(r is True for r in results) and len(results) == len(task.tests):
        verdict = "Accepted"
    else:
        last = results[-1]
        verdict = {-2: "Wrong Answer", False: "Wrong Answer", -3: "Time Limit Exceeded", -4: "Runtime Error",
                   -1: "Time Limit Exceeded"}.get(last, "Runtime Error")
    return verdict, len(results)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.monotonic()
    return fn(*args), time.monotonic() - start


def _verdict_class(verdict: str) -> str:
    return {"Memory Limit Exceeded": "Runtime Error", "Output Limit Exceeded": "Runtime Error",
            "Syntax Error": "Runtime Error"}.get(verdict, verdict)


def lcb_once(items: list[tuple[dict[str, Any], str, str]], workers: int) -> dict[str, Any]:
    """One pass of the workload through LiveCodeBench's grader, `workers` solutions at a time."""
    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:  # each call forks its own child, as LCB's pool does
        timed = list(pool.map(lambda item: _timed(lcb_run, item[0], item[2]), items))
    return {"wall": time.monotonic() - start, "tests": sum(n for (_, n), _ in timed),
            "verdicts": [v for (v, _), _ in timed], "seconds": [t for _, t in timed]}


def _merge(total: dict[str, Any] | None, one: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return dict(one)
    return {key: total[key] + one[key] for key in one}


def bench(backends: list[str], items: list[tuple[dict[str, Any], str, str]], rounds: int,
          have_lcb: bool) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Every available backend and LCB at 1 and 2 workers, taking turns pass by pass (this VM's speed drifts
    by tens of percent over a minute; alternating makes the drift hit both sides alike); a row each."""
    available = []
    for name in backends:
        try:
            make_environment(name, 1).close()
        except (SandboxUnavailable, RuntimeError) as exc:
            print(f"{name:12} unavailable: {exc}")
            continue
        available.append(name)
    ours: dict[str, dict[str, Any]] = {}
    lcb: dict[int, dict[str, Any]] = {}
    for workers in (1, 2):
        envs = {name: make_environment(name, workers) for name in available}  # start-up is inside the timing
        totals: dict[str, dict[str, Any] | None] = dict.fromkeys([*envs, "lcb"] if have_lcb else envs)
        for _ in range(rounds):
            for name, env in envs.items():
                totals[name] = _merge(totals[name], ours_once(env, items, workers))
            if have_lcb:
                totals["lcb"] = _merge(totals["lcb"], lcb_once(items, workers))
        for env in envs.values():
            env.close()
        for name in envs:
            r = totals[name]
            assert r is not None
            startups = sorted(r.pop("startups"))
            r.update(backend=name, workers=workers, tests_per_s=r["tests"] / r["wall"],
                     submissions_per_s=rounds * len(items) / r["wall"],
                     startup_median_ms=1000 * statistics.median(startups),
                     startup_p90_ms=1000 * startups[int(0.9 * (len(startups) - 1))])
            ours[f"{name}/{workers}"] = r
            print(f"{name:12} {workers:>7} {r['tests']:>6} {r['wall']:>7.2f} {r['tests_per_s']:>8.1f} "
                  f"{r['submissions_per_s']:>7.2f} "
                  f"{r['startup_median_ms']:>9.1f} / {r['startup_p90_ms']:>6.1f}")
        if have_lcb:
            r = totals["lcb"]
            assert r is not None
            r.update(tests_per_s=r["tests"] / r["wall"], submissions_per_s=rounds * len(items) / r["wall"])
            lcb[workers] = r
            print(f"{'lcb':12} {workers:>7} {r['tests']:>6} {r['wall']:>7.2f} {r['tests_per_s']:>8.1f} "
                  f"{r['submissions_per_s']:>7.2f}   (LCB stops at the first failure)")
    return ours, lcb


def compare(items: list[tuple[dict[str, Any], str, str]], ours: dict[str, dict[str, Any]],
            lcb: dict[int, dict[str, Any]]) -> None:
    """Verdict agreement, where the time goes, and the throughput ratios at equal workers."""
    reference = next((r for key, r in ours.items() if key.endswith("/1")), None)
    if reference is None:
        return
    lcb_verdicts, lcb_seconds = lcb[1]["verdicts"], lcb[1]["seconds"]
    agree = sum(_verdict_class(v) == lv for v, lv in zip(reference["verdicts"], lcb_verdicts, strict=True))
    print(f"verdict agreement with LCB ({reference['backend']}): {agree}/{len(items)}")
    for (row, kind, _), ours_v, lcb_v in zip(items, reference["verdicts"], lcb_verdicts, strict=True):
        if _verdict_class(ours_v) != lcb_v:
            print(f"  differs: {row['task_id']} {kind}: ours {ours_v!r}, LCB {lcb_v!r}")
    print(f"mean seconds per submission, 1 worker ({reference['backend']} / LCB), and where LCB's wall time goes:")
    for kind in dict.fromkeys(k for _, k, _ in items):
        mine = [t for (_, k, _), t in zip(items, reference["seconds"], strict=True) if k == kind]
        theirs = [t for (_, k, _), t in zip(items, lcb_seconds, strict=True) if k == kind]
        print(f"  {kind:8} {statistics.mean(mine):6.3f} / {statistics.mean(theirs):6.3f}   "
              f"share of LCB's wall {sum(theirs) / sum(lcb_seconds):4.0%}")
    tle = sum(t for (_, k, _), t in zip(items, lcb_seconds, strict=True) if k == "tle")
    if tle:
        print(f"  bound: with the same 1 s limit, even a sandbox costing nothing outside its time-outs is at most "
              f"{sum(lcb_seconds) / tle:.2f}x LCB here (LCB's whole wall / its time-outs' wall)")
    for key, r in ours.items():
        lcb_r = lcb[r["workers"]]
        print(f"ours ({key} workers) / LCB ({r['workers']} workers): tests/s "
              f"{r['tests_per_s'] / lcb_r['tests_per_s']:.2f}, submissions/s "
              f"{r['submissions_per_s'] / lcb_r['submissions_per_s']:.2f}")


MIXES = {"all": ("correct", "wrong", "tle", "re"), "no-tle": ("correct", "wrong", "re")}
DEFAULT_PASSES = {"all": 1, "no-tle": 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["quick", "full"], default="quick")
    parser.add_argument("--backends", default="bwrap,bwrap-fresh,process,docker")
    parser.add_argument("--mixes", default="all,no-tle", help="comma-separated subset of " + ", ".join(MIXES))
    parser.add_argument("--repeat", type=int, default=None,
                        help="passes over the workload, ours and LCB's taking turns (default: 1 for 'all', 10 for "
                             "'no-tle', whose single pass takes well under a second, too short to time)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        import livecodebench.evaluation.testing_util  # noqa: F401
        have_lcb = True
    except ImportError:
        print("livecodebench not importable: no comparison (pip install --no-deps nvidia-livecodebench)")
        have_lcb = False
    for mix in args.mixes.split(","):
        passes = args.repeat or DEFAULT_PASSES[mix]
        items = [item for item in workload(args.size) if item[1] in MIXES[mix]]
        print(f"\n== mix {mix!r}: {len(items) * passes} submissions ({args.size} x {passes}: "
              f"{', '.join(MIXES[mix])} per problem), "
              f"{passes * sum(len(parse_task(r).tests) for r, _, _ in items)} tests, 1 s CPU limit")
        print(f"{'backend':12} {'workers':>7} {'tests':>6} {'wall s':>7} {'tests/s':>8} {'subm/s':>7} "
              f"{'start ms (med/p90)':>19}")
        ours, lcb = bench(args.backends.split(","), items, passes, have_lcb)
        if have_lcb:
            compare(items * passes, ours, lcb)


if __name__ == "__main__":
    main()

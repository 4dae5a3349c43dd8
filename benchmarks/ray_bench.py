"""Episodes on Ray against episodes here: throughput of the code environment and the overhead Ray adds.

    python benchmarks/ray_bench.py               # about 5 minutes on 2 CPU cores
    python benchmarks/ray_bench.py --repeat 1 --overhead_episodes 20   # a quick look

Both sides run the same `CodeEnvironment` (bwrap backend, 1 s per test) on the same submissions: the
sandbox benchmark's workload (six bundled problems, each with a right, a wrong, an endless-loop and a
crashing program), `--repeat` times over. *Here*: the local engine with 2 threads (`max_workers=2`).
*Ray*: a local cluster of separate processes started by the benchmark (`sdpo_envs.testing.local_ray_cluster`:
a head node and one worker node, 1 CPU each, so 2 workers), `executor=RayExecutor(address)`, at most 2
episodes in flight. The two take turns, `--rounds` times, and the medians are reported (this VM's speed
drifts within a minute).

Overhead: a no-op environment (`FakeEnvironment`, nothing to run) scored one episode per `evaluate` call,
`--overhead_episodes` times, here and on Ray: the median difference is what Ray adds to one episode
(submission, scheduling, shipping the task and the feedback), independent of what the episode does.

Writes `benchmarks/results/ray_bench.json` and prints the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "ray_bench.json"


def _sandbox_workload() -> Any:
    spec = importlib.util.spec_from_file_location("sandbox_bench", Path(__file__).with_name("sandbox_bench.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.workload


def _timed_evaluate(env: Any, tasks: list[dict[str, Any]], completions: list[str]) -> tuple[float, list[Any]]:
    started = time.monotonic()
    results = env.evaluate(tasks, completions)
    return time.monotonic() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="copies of the workload per pass")
    parser.add_argument("--rounds", type=int, default=3, help="passes on each side, taking turns")
    parser.add_argument("--overhead_episodes", type=int, default=60)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import ray
    from sdpo_code import CodeEnvironment

    from sdpo_envs.ray_executor import RayExecutor
    from sdpo_envs.testing import FakeEnvironment, local_ray_cluster

    items = _sandbox_workload()("full") * args.repeat
    tasks = [row for row, _, _ in items]
    completions = [f"```python\n{code}\n```" for _, _, code in items]
    started = time.monotonic()
    with local_ray_cluster(worker_nodes=1, cpus_per_node=1) as address:
        try:
            cluster_seconds = time.monotonic() - started
            executor = RayExecutor(address, max_in_flight=2)
            here = CodeEnvironment(backend="bwrap", time_limit=1.0, max_workers=2)
            remote = CodeEnvironment(backend="bwrap", time_limit=1.0, max_workers=2)
            remote.executor = executor
            _timed_evaluate(remote, tasks[:2], completions[:2])  # Ray starts its worker processes on first use
            walls: dict[str, list[float]] = {"here": [], "ray": []}
            agree = True
            for _ in range(args.rounds):
                wall_here, on_here = _timed_evaluate(here, tasks, completions)
                wall_ray, on_ray = _timed_evaluate(remote, tasks, completions)
                walls["here"].append(wall_here)
                walls["ray"].append(wall_ray)
                agree &= [f.details.get("verdict") for f in on_here] == [f.details.get("verdict") for f in on_ray]
                print(f"round: here {len(tasks) / wall_here:.2f}/s, ray {len(tasks) / wall_ray:.2f}/s", flush=True)

            noop_here, noop_ray = FakeEnvironment(), FakeEnvironment()
            noop_ray.executor = executor
            one = [{"prompt": "p", "answer": "1"}]
            latency: dict[str, list[float]] = {"here": [], "ray": []}
            for _ in range(args.overhead_episodes):
                latency["here"].append(_timed_evaluate(noop_here, one, ["1"])[0])
                latency["ray"].append(_timed_evaluate(noop_ray, one, ["1"])[0])
        finally:
            ray.shutdown()

    median = {side: statistics.median(w) for side, w in walls.items()}
    throughput = {side: len(tasks) / median[side] for side in median}
    per_episode = {side: statistics.median(v) for side, v in latency.items()}
    result = {
        "submissions": len(tasks),
        "rounds": args.rounds,
        "workers": 2,
        "submissions_per_second": {side: round(v, 3) for side, v in throughput.items()},
        "ray_over_here_throughput": round(throughput["ray"] / throughput["here"], 3),
        "wall_seconds": {side: [round(w, 2) for w in ws] for side, ws in walls.items()},
        "verdicts_agree": agree,
        "one_episode_seconds_median": {side: round(v, 4) for side, v in per_episode.items()},
        "ray_overhead_per_episode_seconds": round(per_episode["ray"] - per_episode["here"], 4),
        "cluster_start_seconds": round(cluster_seconds, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(tasks)} submissions, 2 workers each side, median of {args.rounds} passes:")
    print(f"  here (threads)  {throughput['here']:.2f} submissions/s")
    print(f"  Ray (2 workers) {throughput['ray']:.2f} submissions/s  = {result['ray_over_here_throughput']:.2f}x here")
    print(f"  verdicts agree: {agree}")
    print(f"  one no-op episode: here {per_episode['here'] * 1e3:.1f} ms, Ray {per_episode['ray'] * 1e3:.1f} ms "
          f"(Ray adds {result['ray_overhead_per_episode_seconds'] * 1e3:.1f} ms per episode)")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

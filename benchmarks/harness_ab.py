"""Two versions of the sandbox harness through the whole bwrap pipeline, passes interleaved: which is faster.

The harness (``plugins/code/sdpo_code/sandbox/_harness.py``) is the program every reused sandbox runs; this
takes it from a git revision (``--base``) and from the working tree, starts one set of sandboxes with each, and
alternates passes over the workload of ``sandbox_bench.py`` (no endless loops) between them, so this VM's
drift hits both alike. Verdicts must agree. Both versions must speak the protocol of the host code checked out.

Usage: ``python benchmarks/harness_ab.py --base <rev> [--passes 20] [--size full]``.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

import sdpo_code.sandbox.bwrap as bwrap
from sandbox_bench import MIXES, make_environment, ours_once, workload
from sdpo_code import CodeEnvironment

HARNESS = Path(bwrap.__file__).with_name("_harness.py")


def harness_at(revision: str) -> str:
    """The harness's source at a git revision of the repository it lives in."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HARNESS.parent, check=True,
                         capture_output=True, text=True).stdout.strip()
    relative = HARNESS.resolve().relative_to(Path(top).resolve()).as_posix()
    return subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=top, check=True, capture_output=True,
                          text=True).stdout


def environment(source: str, workers: int) -> CodeEnvironment:
    """A bwrap code environment whose sandboxes run `source` (they start on first use and keep it)."""
    bwrap.HARNESS_SOURCE = source
    return make_environment("bwrap", workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the harness to compare against")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--size", choices=["quick", "full"], default="full")
    args = parser.parse_args()
    items = [item for item in workload(args.size) if item[1] in MIXES["no-tle"]]
    sources = {args.base: harness_at(args.base), "working tree": HARNESS.read_text(encoding="utf-8")}
    for workers in (1, 2):
        envs = {name: environment(source, workers) for name, source in sources.items()}
        for env in envs.values():  # start the sandboxes now, with the harness each was made with
            ours_once(env, items[: 2 * workers], workers)
        walls = dict.fromkeys(envs, 0.0)
        verdicts: dict[str, list[Any]] = {}
        for _ in range(args.passes):
            for name, env in envs.items():
                one = ours_once(env, items, workers)
                walls[name] += one["wall"]
                verdicts[name] = one["verdicts"]
        for env in envs.values():
            env.close()
        base, new = (verdicts[name] for name in sources)
        assert base == new, f"verdicts differ: {base} != {new}"
        rates = {name: args.passes * len(items) / wall for name, wall in walls.items()}
        print(f"{workers} worker(s): " + ", ".join(f"{name} {rate:.1f} submissions/s" for name, rate in rates.items())
              + f"; working tree / {args.base}: {rates['working tree'] / rates[args.base]:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The README's main job: set up from nothing (scripts/setup.sh), then `sdpo train` in the virtualenv.
# With no arguments that is the embedded CPU demo (about ten minutes on two cores, output in runs/sdpo);
# arguments go to `sdpo train`, e.g. `bash scripts/run.sh --max_steps 60 --compare_grpo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${SDPO_VENV:-.venv}/bin/activate"
exec sdpo train "$@"

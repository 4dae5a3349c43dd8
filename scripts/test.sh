#!/usr/bin/env bash
# Sets up from nothing (scripts/setup.sh), then runs the linter, the type checker, the layering contracts
# (import-linter, configured in pyproject.toml) and the whole test suite, slow tests included (everything but
# GPU and network tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${SDPO_VENV:-.venv}/bin/activate"
ruff check .
mypy sdpo_core sdpo_envs plugins/code/sdpo_code plugins/math/sdpo_math plugins/reward/sdpo_reward benchmarks
lint-imports
python -m pytest -m "not gpu and not network" -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Sets up from nothing (scripts/setup.sh), then runs the linter and the whole test suite, slow tests
# included (everything but GPU and network tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${SDPO_VENV:-.venv}/bin/activate"
ruff check .
python -m pytest -m "not gpu and not network" -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Runs the trainer's tests against another torch or TRL than the one scripts/setup.sh pins, to check a
# version range the core distribution declares. The other version goes into an overlay venv whose own
# site-packages come first and which sees everything else of the main venv (a .pth file), so only the
# package under test differs.
#
#   bash scripts/check_versions.sh torch==2.14.1     # ~5.4 GB: PyPI's torch 2.14 is a CUDA build (runs on CPU)
#   bash scripts/check_versions.sh trl==1.15.0
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: $0 PACKAGE==VERSION" >&2; exit 2; }
MAIN="${SDPO_VENV:-.venv}"
[ -x "$MAIN/bin/python" ] || bash scripts/setup.sh
OVERLAY="${TMPDIR:-/tmp}/sdpo-overlay-${1//[^A-Za-z0-9.]/_}"
if [ ! -x "$OVERLAY/bin/python" ]; then
    python3 -m venv "$OVERLAY"
    "$OVERLAY/bin/pip" install -q --disable-pip-version-check "$1"
fi
main_site="$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
overlay_site="$("$OVERLAY/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import site; site.addsitedir('$main_site')" > "$overlay_site/zz_sdpo_main_venv.pth"
"$OVERLAY/bin/python" -c 'import torch, trl, transformers; print("torch", torch.__version__, "trl", trl.__version__, "transformers", transformers.__version__)'
"$OVERLAY/bin/python" -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_trainer.py tests/test_loss.py \
    tests/test_reprompt.py tests/test_config.py tests/test_trainer_diagnostics.py tests/test_trl_environment_factory.py

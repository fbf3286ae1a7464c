#!/usr/bin/env bash
# Creates .venv with what softmax_ce needs (torch 2.13.0 CPU build, numpy, pytest, hypothesis,
# ninja; scikit-learn, transformers and peft for the tests of the examples and the integration;
# matplotlib for the figures command and its test),
# builds the extension into the source tree and installs the package in editable mode.
#
# Idempotent and incremental: a second run with nothing changed takes seconds. The build is
# skipped when a stamp (a hash of csrc/, setup.py, the torch version and the build switches)
# matches the one written by the last successful build; otherwise `setup.py build_ext --inplace`
# runs with ninja in the persistent build/ folder, which recompiles only what changed.
# SOFTMAX_CE_REBUILD=1 forces a build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
say() { echo "setup_env: $*" >&2; }

[ -x "$PY" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }

# What the project needs; pip answers in a few seconds when all of it is already installed.
if ! "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as m
need = {"torch": "2.13.0", "numpy": None, "pytest": None, "hypothesis": None,
        "setuptools": None, "wheel": None, "ninja": None, "scikit-learn": None,
        "transformers": "5.24.0", "peft": "0.21.2"}
for name, version in need.items():
    have = m.version(name)
    if version and have.split("+")[0] != version:
        raise SystemExit(1)
if int(m.version("setuptools").split(".")[0]) < 77:  # pyproject's SPDX license needs 77
    raise SystemExit(1)
import matplotlib  # noqa: F401  (the figures command)
EOF
then
  say "installing torch==2.13.0 numpy pytest hypothesis setuptools>=77 wheel ninja" \
    "scikit-learn matplotlib transformers==5.24.0 peft==0.21.2"
  "$VENV/bin/pip" install -q torch==2.13.0 numpy pytest hypothesis "setuptools>=77" wheel ninja \
    scikit-learn matplotlib transformers==5.24.0 peft==0.21.2
fi

stamp_file=build/softmax_ce.stamp
stamp=$("$PY" - <<'EOF'
import hashlib, os, pathlib, torch
h = hashlib.sha256()
files = sorted(p for p in pathlib.Path("csrc").rglob("*") if p.is_file()) + [pathlib.Path("setup.py")]
for p in files:
    h.update(str(p).encode()); h.update(p.read_bytes())
h.update(torch.__version__.encode())
for var in ("SOFTMAX_CE_SKIP_EXTENSION", "SOFTMAX_CE_FORCE_CUDA", "SOFTMAX_CE_SKIP_CUDA",
            "SOFTMAX_CE_DEBUG", "TORCH_CUDA_ARCH_LIST"):
    h.update(f"{var}={os.environ.get(var, '')}".encode())
print(h.hexdigest())
EOF
)
built=$(ls softmax_ce/_C*.so 2>/dev/null | head -n 1 || true)
if [ "${SOFTMAX_CE_REBUILD:-0}" = "0" ] && [ -n "$built" ] && [ -f "$stamp_file" ] \
    && [ "$(cat "$stamp_file")" = "$stamp" ]; then
  say "extension up to date ($built): build skipped"
else
  say "building the extension (a few minutes on 2 cores the first time; then only what changed)"
  mkdir -p build
  rm -f "$stamp_file"
  if ! MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace > build/build.log 2>&1; then
    grep -E "error|Error" build/build.log | head -40 >&2
    say "build failed: the whole log is in build/build.log"
    exit 1
  fi
  echo "$stamp" > "$stamp_file"
fi

# The package itself, editable (points at this tree; the extension built above stays in place).
if ! "$VENV/bin/pip" show -q softmax-ce >/dev/null 2>&1; then
  say "installing softmax_ce (editable)"
  SOFTMAX_CE_SKIP_EXTENSION=1 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .
fi
"$PY" -m softmax_ce info

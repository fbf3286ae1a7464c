#!/usr/bin/env bash
# torch_version_suite.sh VERSION [DIR]: the test suite on another torch release, the CPU
# extension compiled against it. A clean copy of this repository's HEAD in DIR (default: a new
# temporary folder), a virtualenv with torch==VERSION (pip's cap on torch on the build machines
# lifted), the test dependencies, `setup.py build_ext --inplace`, then the README's test command.
# .ci/run calls it for both ends of the declared torch range (pyproject.toml). A temporary folder
# it made itself (a CUDA build of torch: about 7 GB) is removed when it exits, passed or failed.
set -euo pipefail
version=$1
if [ $# -ge 2 ]; then
  dir=$2
else
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir"
rm -rf "$dir/tree"
git clone -q "$repo" "$dir/tree"
[ -x "$dir/venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$dir/venv"
PIP_CONSTRAINT=/dev/null "$dir/venv/bin/pip" install -q --no-cache-dir "torch==$version" numpy pytest hypothesis \
  "setuptools>=77" wheel ninja scikit-learn matplotlib transformers==5.24.0 peft==0.21.2
cd "$dir/tree"
echo "torch_version_suite: torch $("$dir/venv/bin/python" -c 'import torch; print(torch.__version__)')"
if ! SOFTMAX_CE_SKIP_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$dir/venv/bin/python" setup.py build_ext \
    --inplace > "$dir/build.log" 2>&1; then
  grep -E "error|Error" "$dir/build.log" | head -40 >&2
  echo "torch_version_suite: the build failed against torch $version ($dir/build.log)" >&2
  exit 1
fi
"$dir/venv/bin/python" -m softmax_ce info
SOFTMAX_CE_REQUIRE_EXTENSION=1 "$dir/venv/bin/python" -m pytest -q

#!/usr/bin/env bash
# One command for a GPU machine (no network needed; PyTorch and nvcc installed): builds the
# extension for the local GPU, runs the whole test suite on CUDA (parity, gradcheck, opcheck,
# fullgraph compile, CUDA-graph capture), then the benchmark on CUDA. Logs and the benchmark's
# JSON go to ${OUT:-gpu_check_out}/. Meant to finish in under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "=== $* ($(( $(date +%s) - t0 ))s)"; }

stamp "GPU and toolchain"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13.0; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME=$d && break; done
fi
inc=$($PY -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null || true)
[ -n "$inc" ] && [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}

stamp "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, CUDA_HOME=${CUDA_HOME:-auto})"
rm -f softmax_ce/_C*.so
SOFTMAX_CE_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
status=$?
tail -3 "$OUT/build.log"
if [ $status -ne 0 ]; then grep -E "error" "$OUT/build.log" | head -30; stamp "build FAILED"; exit 1; fi
$PY -m softmax_ce info

stamp "tests on cuda"
SOFTMAX_CE_REQUIRE_EXTENSION=1 $PY -m pytest -q -x -k "cuda and not cpu" -p no:cacheprovider \
  tests 2>&1 | tee "$OUT/tests.log" | tail -25
tests=${PIPESTATUS[0]}

stamp "benchmark on cuda"
$PY -m softmax_ce bench --device cuda --repeat ${REPEAT:-10} --output "$OUT/bench_cuda.json" \
  2> "$OUT/bench_progress.log" | tee "$OUT/bench_cuda.md"
bench=${PIPESTATUS[0]}

stamp "done: tests exit $tests, bench exit $bench"
[ $tests -eq 0 ] && [ $bench -eq 0 ]

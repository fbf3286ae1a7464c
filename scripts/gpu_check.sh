#!/usr/bin/env bash
# One command for a GPU machine (no network needed; PyTorch and nvcc installed): builds the
# extension for the local GPU, runs the whole test suite on CUDA (parity, gradcheck, opcheck,
# fullgraph compile, CUDA-graph capture), then the benchmark on CUDA, which prints a table of
# each implementation's time, GB/s, share of the measured copy bandwidth and peak memory.
# Logs and the benchmark's JSON go to ${OUT:-gpu_check_out}/. Meant to finish in under 8 minutes
# on an H100. STEPS picks and orders the steps (default: "build diag tune bench tests"):
#   build  the extension for this GPU's architecture
#   diag   C++ exceptions from the CPU kernels in this environment (a crash gets a backtrace)
#   tune   the fused forward+backward at the two target shapes as built, then under each
#          setting of TUNE_ENVS (default: no shared-memory row cache, no cluster of blocks),
#          against the gradient formed in the backward
#   bench  the benchmark on cuda (all default shapes)
#   tests  the test suite on cuda (TESTS: the files or folders, default tests)
#   profile (not by default) Nsight Compute metrics of the forward and fused kernels at the
#          two target shapes: throughput, occupancy, registers, stall reasons
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${STEPS:-build diag tune bench tests}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "=== $* ($(( $(date +%s) - t0 ))s)"; }
failed=0

build() {
  stamp "GPU and toolchain"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "  host compiler (torch uses \$CXX, else c++): ${CXX:-$(command -v c++)}: $(${CXX:-c++} --version | head -1)"
  if [ -z "${CUDA_HOME:-}" ]; then
    for d in /usr/local/cuda /usr/local/cuda-13.0; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME=$d && break; done
  fi
  inc=$($PY -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null || true)
  [ -n "$inc" ] && [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
  arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
  stamp "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, CUDA_HOME=${CUDA_HOME:-auto})"
  rm -f softmax_ce/_C*.so
  if ! SOFTMAX_CE_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    grep -E "error" "$OUT/build.log" | head -30
    stamp "build FAILED"
    exit 1
  fi
  $PY -m softmax_ce info
}

diag() {
  stamp "CPU kernels in this process environment (each in its own process)"
  scratch=$(mktemp -d)
  cat > "$scratch/diag.py" <<'PYEOF'
import sys, torch, softmax_ce
x = torch.randn(4, 5); t = torch.tensor([0, 1, 2, 3 if sys.argv[1] == "ok" else 9])
try:
    print(float(softmax_ce.cross_entropy(x, t)))
except IndexError as e:
    print("IndexError raised:", str(e)[:60])
PYEOF
  for env in "" "OMP_NUM_THREADS=1" "ATEN_CPU_CAPABILITY=default"; do
    for what in ok bad_target; do
      env PYTHONPATH="$PWD" $env $PY -X faulthandler "$scratch/diag.py" $what > "$scratch/diag.log" 2>&1
      rc=$?
      echo "  [$env] $what: exit $rc $(tail -1 "$scratch/diag.log")"
      [ $rc -ne 0 ] && sed 's/^/    /' "$scratch/diag.log" | tail -40
      dbg=$(command -v gdb || command -v cuda-gdb)  # the GPU image has cuda-gdb only
      if [ $rc -ne 0 ] && [ -n "$dbg" ]; then
        env PYTHONPATH="$PWD" $env "$dbg" -q -batch -ex run -ex bt -ex "info sharedlibrary" --args $PY "$scratch/diag.py" $what \
          > "$OUT/diag_gdb_${what}.log" 2>&1
        grep -E "^#[0-9]+" "$OUT/diag_gdb_${what}.log" | head -25
        grep -E "libstdc|libgcc_s|_C\.cpython" "$OUT/diag_gdb_${what}.log" | head -5
      fi
    done
  done
  so=$(ls softmax_ce/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] && ldd "$so" | grep -E "libstdc|libgcc_s|libgomp|libc10\.|libtorch_cpu" | sed 's/^/  ldd: /'
  # A copy of libstdc++ linked into the extension (-static-libstdc++, which some compiler
  # wrappers add) formats torch's error messages with its own stream code on locale state that
  # the process's shared libstdc++ set up: the first error message with a number crashes.
  if [ -n "$so" ]; then
    echo "  std::locale::classic() defined inside the extension (0 unless libstdc++ is linked" \
      "statically): $(nm -C --defined-only "$so" 2> /dev/null | grep -c 'std::locale::classic()')"
    cxx=$(command -v "${CXX:-c++}")
    file -L "$cxx" 2> /dev/null | sed 's/^/  /'
    head -c 2000 "$cxx" 2> /dev/null | grep -a -E "static|exec" | head -5 | sed 's/^/  compiler script: /'
  fi
  $PY -c "
import os, torch, softmax_ce
softmax_ce.cross_entropy(torch.randn(64, 100), torch.randint(0, 100, (64,)))
print('  torch:', os.path.dirname(torch.__file__), 'C++11 ABI', torch._C._GLIBCXX_USE_CXX11_ABI)
for lib in sorted({l.split()[-1] for l in open('/proc/self/maps') if any(k in l for k in ('gomp', 'stdc++', 'gcc_s'))}):
    print('  loaded:', lib)
"
}

tune() {
  stamp "fused forward+backward: as built, then under each of TUNE_ENVS"
  local envs=${TUNE_ENVS:-"SOFTMAX_CE_CUDA_ROW_CACHE_KB=0 SOFTMAX_CE_CUDA_CLUSTER=1"}
  local settings=()
  [ "${TUNE_BASE:-1}" = 0 ] || settings+=("")  # TUNE_BASE=0: the settings alone
  for e in $envs; do settings+=("$e"); done
  for setting in "${settings[@]}"; do
    for case in "4096x128256 bfloat16" "8192x32000 float32"; do
      set -- $case
      echo "  ${setting:-as built} $1 $2"
      env $setting $PY -m softmax_ce bench --device cuda --shapes "$1" \
        --dtype "$2" --no-compile --no-softmax --no-memory --repeat ${REPEAT:-7} \
        --impls softmax_ce "softmax_ce bwd-grad" "softmax_ce inplace" 2>> "$OUT/tune_progress.log" \
        | grep "^| custom" | cut -d'|' -f6-8,11-14 | tee -a "$OUT/tune.md"
    done
  done
}

profile() {
  if ! command -v ncu > /dev/null; then echo "  ncu not found"; return; fi
  stamp "ncu: forward and fused forward+backward kernels at the target shapes"
  local scratch
  scratch=$(mktemp -d)
  cat > "$scratch/profile.py" <<'PYEOF'
import torch, softmax_ce
for shape, dtype in (((4096, 128256), torch.bfloat16), ((8192, 32000), torch.float32)):
    x = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    t = torch.randint(0, shape[1], (shape[0],), device="cuda")
    with torch.no_grad():
        softmax_ce.cross_entropy(x, t)
    softmax_ce.cross_entropy(x, t).backward()
torch.cuda.synchronize()
PYEOF
  PYTHONPATH="$PWD" timeout ${PROFILE_TIMEOUT:-120} ncu --clock-control none --kernel-name regex:"ce_fwd_rows|ce_fwdbwd" --launch-count 4 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section WarpStateStats $PY "$scratch/profile.py" > "$OUT/ncu.log" 2>&1
  grep -E "ce_fwd|Duration|Throughput|Achieved Occupancy|Registers Per|Shared Memory Config|Dynamic Shared|L2 Hit|Waves Per SM|Stall" \
    "$OUT/ncu.log" | head -90
}

tests() {
  stamp "tests on cuda"
  # Parallel workers (pytest-xdist) and a per-test time limit (pytest-timeout) where installed:
  # the compile tests spend their time in the host compiler, which the workers share out.
  extra=""
  $PY -c "import xdist" 2> /dev/null && extra="$extra -n ${TEST_WORKERS:-8}"
  $PY -c "import pytest_timeout" 2> /dev/null && extra="$extra --timeout ${TEST_TIMEOUT:-300}"
  SOFTMAX_CE_REQUIRE_EXTENSION=1 $PY -m pytest -q --maxfail=25 -k "cuda and not cpu" -p no:cacheprovider \
    --durations=8 $extra ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
}

bench() {
  stamp "benchmark on cuda"
  $PY -m softmax_ce bench --device cuda --repeat ${REPEAT:-10} --json "$OUT/bench_cuda.json" \
    2> "$OUT/bench_progress.log" | tee "$OUT/bench_cuda.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
}

for step in $STEPS; do $step; done
stamp "done (failed=$failed)"
exit $failed

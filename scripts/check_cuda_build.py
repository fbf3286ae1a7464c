"""Inspect a built softmax_ce._C with cuobjdump: every softmax_ce CUDA kernel must have machine
code (SASS) for each requested architecture, and every kernel must fit the register file at its
largest block size (1024 threads for the row kernels' block groups, 256 otherwise).

usage: python scripts/check_cuda_build.py path/to/_C*.so sm_80 sm_90
cuobjdump is looked up on PATH, then in the triton package (which ships it).
"""

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict


def find_cuobjdump() -> str:
    path = shutil.which("cuobjdump")
    if path:
        return path
    try:
        import triton

        candidate = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                 "cuobjdump")
        if os.path.exists(candidate):
            return candidate
    except ImportError:
        pass
    raise SystemExit("cuobjdump not found (PATH or triton/backends/nvidia/bin)")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else list(names)


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    lib, archs = sys.argv[1], sys.argv[2:]
    text = subprocess.run([find_cuobjdump(), "--dump-resource-usage", lib], check=True,
                          capture_output=True, text=True).stdout
    kernels = defaultdict(dict)  # arch -> mangled name -> registers
    arch = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m and arch:
            current = m.group(1)
            kernels[arch][current] = None
            continue
        m = re.search(r"REG:(\d+)", line)
        if m and arch and kernels[arch]:
            last = list(kernels[arch])[-1]
            if kernels[arch][last] is None:
                kernels[arch][last] = int(m.group(1))
    ours = lambda names: {n for n in names if "softmax_ce" in n}  # noqa: E731
    failures = []
    all_names = set().union(*(ours(k) for k in kernels.values())) if kernels else set()
    if not all_names:
        failures.append("no softmax_ce kernels found in the library")
    for a in archs:
        present = ours(kernels.get(a, {}))
        missing = all_names - present
        print(f"{a}: {len(present)} softmax_ce kernels with machine code")
        if not present:
            failures.append(f"{a}: no machine code")
        for name in sorted(missing):
            failures.append(f"{a}: missing {name}")
        names = sorted(present)
        for name, pretty in zip(names, demangle(names)):
            regs = kernels[a][name] or 0
            threads = 1024 if re.search(r"_rows_kernel<[^,]+, 1024", pretty) else 256
            if regs * threads > 65536:
                failures.append(f"{a}: {pretty} needs {regs} registers x {threads} threads")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

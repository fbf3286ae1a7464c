"""Check that AVX2 / AVX-512 instructions appear only in the per-ISA kernel variants.

The extension is compiled for baseline x86-64; only csrc/cpu/isa_avx2.cpp and isa_avx512.cpp are
compiled with -mavx2 / -mavx512*. If an inline function emitted by those files were picked by the
linker for the whole library, a CPU without AVX-512 would crash (SIGILL) outside the kernels the
run-time check guards. This disassembles the built library and fails if any function outside the
ISA namespaces contains a VEX/EVEX-encoded instruction (mnemonics starting with 'v', or opmask
registers %k0-%k7).

usage: python scripts/check_isa_isolation.py [path/to/_C*.so]
"""

import glob
import os
import re
import subprocess
import sys

ISA_NAMESPACES = ("isa_avx2", "isa_avx512", "at::vec::AVX2::", "at::vec::AVX512::")


def main() -> int:
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        import softmax_ce

        path = glob.glob(os.path.join(os.path.dirname(softmax_ce.__file__), "_C*.so"))[0]
    disasm = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", path], check=True, capture_output=True,
        text=True,
    ).stdout
    header = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    function, offenders, isa_functions = None, {}, 0
    for line in disasm.splitlines():
        m = header.match(line)
        if m:
            function = m.group(1)
            if any(ns in function for ns in ISA_NAMESPACES):
                isa_functions += 1
            continue
        if function is None or any(ns in function for ns in ISA_NAMESPACES):
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        mnemonic = parts[1].split()[0] if parts[1].split() else ""
        if mnemonic.startswith("v") or re.search(r"%k[0-7]\b", line):
            offenders.setdefault(function, mnemonic)
    print(f"{path}: {isa_functions} functions in ISA namespaces")
    if offenders:
        for fn, mnemonic in sorted(offenders.items())[:30]:
            print(f"  AVX instruction '{mnemonic}' outside the ISA variants: {fn}")
        return 1
    print("no AVX/AVX-512 instruction outside the per-ISA kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())

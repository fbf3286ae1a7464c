// Run-time choice of the kernel table from ATen's own CPU capability check (cpuinfo), which
// also honours the ATEN_CPU_CAPABILITY environment variable ("default", "avx2", "avx512").
#include <ATen/Version.h>

#include <string>

#include "kernels.h"

namespace softmax_ce::cpu {

const KernelTable& kernels() {
  static const KernelTable* table = [] {
    const std::string cap = at::get_cpu_capability();  // "AVX512", "AVX2", "DEFAULT", "NO AVX"
#if defined(__x86_64__)
    if (cap == "AVX512") return &kernels_avx512();
    if (cap == "AVX2") return &kernels_avx2();
#endif
    return &kernels_default();
  }();
  return *table;
}

}  // namespace softmax_ce::cpu

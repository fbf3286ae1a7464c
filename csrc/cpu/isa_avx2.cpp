// The CPU kernels compiled for AVX2 + FMA: setup.py compiles this file alone with
// -mavx2 -mfma -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2, which selects at::vec's AVX2
// implementation (without them Vectorized silently falls back to scalar code). Chosen at run time
// (isa_select.cpp), never executed on a CPU without AVX2. Built without those flags (a non-x86
// machine), the table is the portable one.
#if defined(CPU_CAPABILITY_AVX2)
#define SCE_ISA_NS isa_avx2
#define SCE_ISA_TABLE kernels_avx2
#define SCE_ISA_NAME "avx2"
#include "kernels_impl.h"
#else
#include "kernels.h"
namespace softmax_ce::cpu {
const KernelTable& kernels_avx2() { return kernels_default(); }
}  // namespace softmax_ce::cpu
#endif

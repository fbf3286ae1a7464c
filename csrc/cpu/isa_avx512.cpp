// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ: ATen's AVX512 level): setup.py compiles
// this file alone with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
// -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512. Chosen at run time only on CPUs with these
// extensions (isa_select.cpp); see isa_avx2.cpp.
#if defined(CPU_CAPABILITY_AVX512)
#define SCE_ISA_NS isa_avx512
#define SCE_ISA_TABLE kernels_avx512
#define SCE_ISA_NAME "avx512"
#include "kernels_impl.h"
#else
#include "kernels.h"
namespace softmax_ce::cpu {
const KernelTable& kernels_avx512() { return kernels_default(); }
}  // namespace softmax_ce::cpu
#endif

// The cross-entropy CUDA kernels for c10::BFloat16 logits (one translation unit per dtype).
#include "ce_kernels.cuh"

namespace softmax_ce::cuda {

template void launch<c10::BFloat16>(const CeParams&, bool, Pass, cudaStream_t);
template void launch_scale<c10::BFloat16>(c10::BFloat16*, int64_t, const void*, bool, int, cudaStream_t);

}  // namespace softmax_ce::cuda

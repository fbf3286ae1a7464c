// The cross-entropy CUDA kernels for float logits (one translation unit per dtype).
#include "ce_kernels.cuh"

namespace softmax_ce::cuda {

template void launch<float>(const CeParams&, bool, Pass, cudaStream_t);
template void launch_scale<float>(float*, int64_t, const void*, bool, int, cudaStream_t);

}  // namespace softmax_ce::cuda

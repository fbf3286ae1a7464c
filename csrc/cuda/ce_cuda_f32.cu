// The cross-entropy CUDA kernels for float logits (one translation unit per dtype).
#include "ce_launches.cuh"

namespace softmax_ce::cuda {

template void launch<float>(const CeParams&, bool, Pass, cudaStream_t);

}  // namespace softmax_ce::cuda

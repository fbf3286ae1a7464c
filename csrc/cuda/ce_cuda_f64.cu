// The cross-entropy CUDA kernels for double logits (one translation unit per dtype).
#include "ce_launches.cuh"

namespace softmax_ce::cuda {

template void launch<double>(const CeParams&, bool, Pass, cudaStream_t);

}  // namespace softmax_ce::cuda

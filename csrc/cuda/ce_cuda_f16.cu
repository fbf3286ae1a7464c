// The cross-entropy CUDA kernels for c10::Half logits (one translation unit per dtype).
#include "ce_launches.cuh"

namespace softmax_ce::cuda {

template void launch<c10::Half>(const CeParams&, bool, Pass, cudaStream_t);

}  // namespace softmax_ce::cuda

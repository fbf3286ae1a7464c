// Host-side interface of the cross-entropy CUDA kernels (ce_kernels.cuh), compiled once per
// dtype (ce_cuda_<dtype>.cu) so that the four instantiations build in parallel; the bindings
// (ce_cuda.cu) call them through these declarations.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace softmax_ce::cuda {

// Value of *bad_target while no out-of-range class index has been recorded.
constexpr unsigned long long kNoBadTarget = 0xFFFFFFFFFFFFFFFFull;

struct CeParams {
  const void* x;
  void* out;
  const void* target;
  bool target_i32;
  const void* prob;
  const void* weight;      // acc_t [C] or null
  const void* w_sum_dev;   // acc_t scalar (sum of weight) or null: then w_sum_host
  double w_sum_host;
  int64_t outer, C, inner;
  int64_t ignore_index;
  double eps, z, softcap;
  void* loss;
  double* lse_out;
  const double* lse_in;
  const void* grad;
  int64_t grad_stride_outer, grad_stride_inner;
  int64_t cache_packs;  // fused forward+backward: packs of a row kept in shared memory
  unsigned long long* bad_target;  // the device's out-of-range record (ce_cuda.cu)
  const void* skip_if_unit;  // backward: an acc_t scalar; the kernel does nothing when it is 1
};

// What a launch computes: the forward (loss, lse), the backward (gradient from a saved lse), or
// both in one pass over the logits.
enum class Pass { kForward, kBackward, kBoth };

// Launches the kernels for logits of type T (double, float, c10::BFloat16, c10::Half) on stream.
template <typename T>
void launch(const CeParams& p, bool prob, Pass pass, cudaStream_t stream);

}  // namespace softmax_ce::cuda

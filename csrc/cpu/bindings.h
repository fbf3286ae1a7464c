// Helpers shared by the CPU binding files: argument checks that name the argument, the dtype
// mapping, the N x C output allocation, and running a kernel over work units in parallel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "kernels.h"

namespace softmax_ce::cpu {

inline Dtype to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kDouble:
      return Dtype::f64;
    case at::kFloat:
      return Dtype::f32;
    case at::kBFloat16:
      return Dtype::bf16;
    case at::kHalf:
      return Dtype::f16;
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "softmax_ce: argument '", name,
                                  "' must be float64, float32, bfloat16 or float16, got ",
                                  t.scalar_type());
  }
}

// [outer, C, inner] logits, on the CPU.
void check_logits(const at::Tensor& logits, const char* name = "logits");

// An uninitialised contiguous output (the gradient, softmax's output). Large ones come from a
// small cache of freed output buffers, so that a warm loop pays no page faults (bindings.cpp).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Releases the cached output buffers (softmax_ce.empty_cache()).
void empty_output_cache();

// The sum of a float32 / float64 tensor's values as a 0-dim tensor of its dtype, in an order fixed
// by the number of values alone (chunks of 4096 summed in double by eight accumulators each, then
// the chunks in order): the same bits whatever the number of threads (softmax_ce::fixed_sum).
at::Tensor fixed_sum(const at::Tensor& values);
float fixed_sum(const float* values, int64_t n);
double fixed_sum(const double* values, int64_t n);

// Work units of a [outer, C, inner] kernel: rows when inner == 1, else blocks of lanes.
int64_t work_units(int64_t outer, int64_t inner, int64_t lanes);

// Runs fn over all units with at::parallel_for; raises torch's IndexError for a bad target.
void run_ce(CeFn fn, const CeArgs& args, int64_t lanes);

}  // namespace softmax_ce::cpu

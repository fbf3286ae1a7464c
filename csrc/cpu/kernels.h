// The CPU kernels' interface: plain structs of raw pointers and sizes, and one table of entry
// points per instruction set. Only the binding files (*_cpu.cpp) see at::Tensor; the kernels
// (kernels_impl.h, compiled once per ISA by isa_*.cpp) never do, and never call into the
// thread pool: the bindings split the work with at::parallel_for and hand each thread a range of
// work units.
#pragma once

#include <cstdint>

namespace softmax_ce::cpu {

enum class Dtype : int { f64 = 0, f32 = 1, bf16 = 2, f16 = 3 };

// Result of a kernel call over a range: the first out-of-range class index it met, if any.
struct Status {
  bool bad_target = false;
  int64_t value = 0;
};

// Logits [outer, C, inner], contiguous. One work unit is a row (inner == 1) or a block of
// `block_lanes(dtype)` consecutive inner positions of one outer index (inner > 1).
struct CeArgs {
  Dtype dtype = Dtype::f32;
  int64_t outer = 0, C = 0, inner = 1;
  const void* x = nullptr;       // logits
  void* out = nullptr;           // gradient (backward); may equal x (in-place)
  bool stream_out = false;       // rows of out stored non-temporally (ce_cpu.cpp, stream_output)
  const void* target = nullptr;  // class indices [outer, inner] (int64 or int32) ...
  bool target_int32 = false;
  const void* prob = nullptr;    // ... or probabilities [outer, C, inner] in the logits' dtype
  const void* weight = nullptr;  // [C] in the accumulation dtype, or null
  double w_sum = 0;              // sum of weight (C without weight)
  int64_t ignore_index = -100;
  double eps = 0, z = 0, softcap = 0;
  // per position [outer, inner]: loss (acc dtype, contiguous), lse (float64, contiguous),
  // grad_loss (acc dtype, any strides, e.g. 0 for a broadcast mean gradient)
  void* loss = nullptr;
  double* lse_out = nullptr;
  const double* lse_in = nullptr;
  const void* grad = nullptr;
  int64_t grad_stride_outer = 0, grad_stride_inner = 0;
};

// softmax / log_softmax over dim 1 of [outer, C, inner] (contiguous).
struct SoftmaxArgs {
  Dtype dtype = Dtype::f32;
  int64_t outer = 0, C = 0, inner = 1;
  bool log = false;
  const void* x = nullptr;      // forward input
  const void* y = nullptr;      // backward: saved output
  const void* grad = nullptr;   // backward: grad of y (contiguous)
  void* out = nullptr;          // y (forward) or grad of x (backward)
};

// Sigmoid cross-entropy over a TensorIterator loop: data[] = {out, [grad], x, y, [w], [pw]},
// all of one dtype, `n` elements with the given byte strides.
struct SigmoidArgs {
  Dtype dtype = Dtype::f32;
  bool has_weight = false, has_pos_weight = false;
};

using CeFn = Status (*)(const CeArgs&, int64_t begin, int64_t end);
using SoftmaxFn = void (*)(const SoftmaxArgs&, int64_t begin, int64_t end);
using SigmoidLoopFn = void (*)(const SigmoidArgs&, char** data, const int64_t* strides,
                               int64_t n);

struct KernelTable {
  const char* isa;
  int64_t (*block_lanes)(Dtype);  // inner positions per work unit when inner > 1
  CeFn ce_fwd, ce_bwd, ce_prob_fwd, ce_prob_bwd;
  CeFn ce_fwd_bwd, ce_prob_fwd_bwd;  // the forward and the gradient (out) in one call
  SoftmaxFn softmax_fwd, softmax_bwd;
  SigmoidLoopFn sigmoid_fwd, sigmoid_bwd;
};

const KernelTable& kernels_default();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();

// The table for this CPU (ATen's capability check, which honours ATEN_CPU_CAPABILITY).
const KernelTable& kernels();

}  // namespace softmax_ce::cpu

// The rules every binding of the cross-entropy ops applies, on every device: the accumulation
// dtype, and the argument checks of logits, target, weight, grad_loss and lse (each message names
// the argument). The bindings add what is their own: the device type, and how `weight`'s sum and
// the upstream gradient reach their kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace softmax_ce {

// The dtype all arithmetic is done in: float64 for float64 logits, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// logits [outer, C, inner] of a supported dtype; target [outer, inner] int64/int32 class indices
// or (prob) probabilities of the logits' shape and dtype; weight [C] in the accumulation dtype;
// all on the logits' device.
inline void check_ce_inputs(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, bool prob) {
  TORCH_CHECK(logits.dim() == 3, "softmax_ce: argument 'logits' must be [outer, C, inner] (3-D), ",
              "got ", logits.dim(), "-D");
  const at::ScalarType st = logits.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(st == at::kDouble || st == at::kFloat || st == at::kBFloat16 ||
                                  st == at::kHalf,
                              "softmax_ce: argument 'logits' must be float64, float32, bfloat16 ",
                              "or float16, got ", st);
  const int64_t O = logits.size(0), C = logits.size(1), I = logits.size(2);
  TORCH_CHECK(target.device() == logits.device(), "softmax_ce: argument 'target' must be on ",
              logits.device(), ", got ", target.device());
  if (prob) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "softmax_ce: argument 'target' ",
                "(probabilities) must have the logits' shape ", logits.sizes(), ", got ",
                target.sizes());
    TORCH_CHECK(target.scalar_type() == st, "softmax_ce: argument 'target' (probabilities) must ",
                "have the logits' dtype ", st, ", got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == O && target.size(1) == I,
                "softmax_ce: argument 'target' must be [outer, inner] = [", O, ", ", I, "], got ",
                target.sizes());
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                "softmax_ce: argument 'target' must be int64 or int32, got ", target.scalar_type());
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C, "softmax_ce: argument 'weight' must ",
                "be [C] = [", C, "], got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == acc_type(st), "softmax_ce: argument 'weight' must be ",
                acc_type(st), " (the accumulation dtype), got ", weight->scalar_type());
    TORCH_CHECK(weight->device() == logits.device(), "softmax_ce: argument 'weight' must be on ",
                logits.device(), ", got ", weight->device());
  }
}

// grad_loss [outer, inner] on the logits' device (any strides: a broadcast mean has 0).
inline void check_grad_loss(const at::Tensor& grad_loss, const at::Tensor& logits) {
  TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == logits.size(0) &&
                  grad_loss.size(1) == logits.size(2),
              "softmax_ce: argument 'grad_loss' must be [", logits.size(0), ", ", logits.size(2),
              "], got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == logits.device(), "softmax_ce: argument 'grad_loss' must be on ",
              logits.device(), ", got ", grad_loss.device());
}

// lse [outer, inner] float64 on the logits' device.
inline void check_lse(const at::Tensor& lse, const at::Tensor& logits) {
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == logits.size(0) && lse.size(1) == logits.size(2) &&
                  lse.scalar_type() == at::kDouble && lse.device() == logits.device(),
              "softmax_ce: argument 'lse' must be float64 [", logits.size(0), ", ", logits.size(2),
              "] on ", logits.device());
}

// `out` of a backward that writes into a given buffer: contiguous, shaped like the logits.
inline void check_out(const at::Tensor& out, const at::Tensor& logits) {
  TORCH_CHECK(out.is_contiguous() && out.sizes() == logits.sizes() &&
                  out.scalar_type() == logits.scalar_type() && out.device() == logits.device(),
              "softmax_ce: argument 'out' must be a contiguous tensor like 'logits'");
}

}  // namespace softmax_ce

// CPU bindings of the sigmoid (binary) cross-entropy ops: TensorIterator handles broadcasting of
// weight / pos_weight and arbitrary strides; the loops run the ISA kernels.
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include "bindings.h"

namespace softmax_ce::cpu {
namespace {

at::Tensor run_sigmoid(SigmoidLoopFn fn, const std::optional<at::Tensor>& grad,
                       const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& pos_weight) {
  SigmoidArgs a;
  a.dtype = to_dtype(logits, "logits");
  TORCH_CHECK(target.sizes() == logits.sizes(), "softmax_ce: argument 'target' must have the ",
              "logits' shape ", logits.sizes(), ", got ", target.sizes());
  auto same_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == logits.scalar_type(), "softmax_ce: argument '", name,
                "' must have the logits' dtype ", logits.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), "softmax_ce: argument '", name, "' must be on the CPU");
  };
  same_dtype(target, "target");
  at::Tensor out = empty_output(logits.sizes(), logits.options());
  at::TensorIteratorConfig config;
  config.add_output(out).check_all_same_dtype(false);
  if (grad.has_value()) {
    same_dtype(*grad, "grad_loss");
    config.add_const_input(*grad);
  }
  config.add_const_input(logits).add_const_input(target);
  if (weight.has_value() && weight->defined()) {
    same_dtype(*weight, "weight");
    config.add_const_input(*weight);
    a.has_weight = true;
  }
  if (pos_weight.has_value() && pos_weight->defined()) {
    same_dtype(*pos_weight, "pos_weight");
    config.add_const_input(*pos_weight);
    a.has_pos_weight = true;
  }
  at::TensorIterator iter = config.build();
  const int ntensors = iter.ntensors();
  iter.for_each([&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
    char* ptrs[8];
    for (int64_t j = 0; j < n1; ++j) {
      for (int k = 0; k < ntensors; ++k) ptrs[k] = data[k] + j * strides[ntensors + k];
      fn(a, ptrs, strides, n0);
    }
  }, 32768);
  return out;
}

at::Tensor sigmoid_ce_fwd(const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& pos_weight) {
  return run_sigmoid(kernels().sigmoid_fwd, std::nullopt, logits, target, weight, pos_weight);
}

at::Tensor sigmoid_ce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                          const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& pos_weight) {
  return run_sigmoid(kernels().sigmoid_bwd, grad_loss, logits, target, weight, pos_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce, CPU, m) {
  m.impl("sigmoid_ce_fwd", &sigmoid_ce_fwd);
  m.impl("sigmoid_ce_bwd", &sigmoid_ce_bwd);
}

}  // namespace softmax_ce::cpu

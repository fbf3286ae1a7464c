// CUDA bindings of the sigmoid (binary) cross-entropy ops: elementwise, through ATen's
// TensorIterator GPU loop (broadcasting of weight / pos_weight, any strides, vectorised access)
// applying the per-element functors of sigmoid_ce_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/cuda/Loops.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sigmoid_ce_kernels.cuh"

namespace softmax_ce::cuda {
namespace {

// An absent weight / pos_weight is a broadcast 1.
at::Tensor or_one(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->scalar_type() == like.scalar_type() && t->device() == like.device(),
                "softmax_ce: argument '", name, "' must have the logits' dtype and device");
    return *t;
  }
  return at::ones({}, like.options());
}

at::Tensor run(const std::optional<at::Tensor>& grad, const at::Tensor& logits,
               const at::Tensor& target, const std::optional<at::Tensor>& weight,
               const std::optional<at::Tensor>& pos_weight) {
  TORCH_CHECK(logits.is_cuda(), "softmax_ce: argument 'logits' must be a CUDA tensor");
  TORCH_CHECK(target.sizes() == logits.sizes() && target.scalar_type() == logits.scalar_type() &&
                  target.device() == logits.device(),
              "softmax_ce: argument 'target' must have the logits' shape, dtype and device");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const at::Tensor w = or_one(weight, logits, "weight");
  const at::Tensor pw = or_one(pos_weight, logits, "pos_weight");
  at::TensorIteratorConfig config;
  config.add_output(out);
  if (grad.has_value()) {
    TORCH_CHECK(grad->scalar_type() == logits.scalar_type() && grad->device() == logits.device(),
                "softmax_ce: argument 'grad_loss' must have the logits' dtype and device");
    config.add_const_input(*grad);
  }
  config.add_const_input(logits).add_const_input(target).add_const_input(w).add_const_input(pw);
  at::TensorIterator iter = config.build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sigmoid_ce", [&] {
    if (grad.has_value()) {
      at::native::gpu_kernel(iter, SigmoidGrad<scalar_t>());
    } else {
      at::native::gpu_kernel(iter, SigmoidLoss<scalar_t>());
    }
  });
  return out;
}

at::Tensor sigmoid_ce_fwd(const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& pos_weight) {
  return run(std::nullopt, logits, target, weight, pos_weight);
}

at::Tensor sigmoid_ce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                          const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& pos_weight) {
  return run(grad_loss, logits, target, weight, pos_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce, CUDA, m) {
  m.impl("sigmoid_ce_fwd", &sigmoid_ce_fwd);
  m.impl("sigmoid_ce_bwd", &sigmoid_ce_bwd);
}

}  // namespace softmax_ce::cuda

// CPU bindings of the cross-entropy ops (schemas in softmax_ce/ops.py): argument checks,
// output allocation, and the parallel launch of the ISA kernels.
#include <torch/library.h>

#include "../common/ce_checks.h"
#include "../common/ce_entry_points.h"
#include "bindings.h"

namespace softmax_ce::cpu {
namespace {

struct Prepared {
  at::Tensor x, target, weight;
  CeArgs args;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                 double z, double softcap, bool prob) {
  TORCH_CHECK(logits.device().is_cpu(), "softmax_ce: argument 'logits' must be on the CPU");
  check_ce_inputs(logits, target, weight, prob);
  Prepared p;
  const int64_t O = logits.size(0), C = logits.size(1), I = logits.size(2);
  p.x = logits.contiguous();
  p.target = target.contiguous();
  double w_sum = static_cast<double>(C);
  if (weight.has_value() && weight->defined()) {
    p.weight = weight->contiguous();
    w_sum = p.weight.sum().item<double>();  // C values on the CPU: no device sync
  }
  CeArgs& a = p.args;
  a.dtype = to_dtype(logits, "logits");
  a.outer = O;
  a.C = C;
  a.inner = I;
  a.x = p.x.data_ptr();
  if (prob) {
    a.prob = p.target.data_ptr();
  } else {
    a.target = p.target.data_ptr();
    a.target_int32 = p.target.scalar_type() == at::kInt;
  }
  a.weight = p.weight.defined() ? p.weight.data_ptr() : nullptr;
  a.w_sum = w_sum;
  a.ignore_index = ignore_index;
  a.eps = eps;
  a.z = z;
  a.softcap = softcap;
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           int64_t ignore_index, double eps, double z,
                                           double softcap, bool prob) {
  Prepared p = prepare(logits, target, weight, ignore_index, eps, z, softcap, prob);
  const int64_t O = logits.size(0), I = logits.size(2);
  at::Tensor loss = at::empty({O, I}, logits.options().dtype(acc_type(logits.scalar_type())));
  at::Tensor lse = at::empty({O, I}, logits.options().dtype(at::kDouble));
  p.args.loss = loss.data_ptr();
  p.args.lse_out = lse.data_ptr<double>();
  const KernelTable& k = kernels();
  run_ce(prob ? k.ce_prob_fwd : k.ce_fwd, p.args, k.block_lanes(p.args.dtype));
  return {loss, lse};
}

// The per-position upstream gradient [outer, inner] into the kernel arguments; the returned
// tensor (in the accumulation dtype, strides kept: 0 for a broadcast mean) must outlive the call.
at::Tensor set_grad_loss(CeArgs& a, const at::Tensor& grad_loss, const at::Tensor& logits) {
  check_grad_loss(grad_loss, logits);
  at::Tensor g = grad_loss.to(acc_type(logits.scalar_type()));
  a.grad = g.data_ptr();
  a.grad_stride_outer = g.stride(0);
  a.grad_stride_inner = g.stride(1);
  return g;
}

// out: undefined for a fresh gradient, else the (contiguous) tensor to write into.
at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                    const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const at::Tensor& lse, int64_t ignore_index, double eps, double z,
                    double softcap, bool prob, at::Tensor out) {
  Prepared p = prepare(logits, target, weight, ignore_index, eps, z, softcap, prob);
  check_lse(lse, logits);
  CeArgs& a = p.args;
  const at::Tensor g = set_grad_loss(a, grad_loss, logits);
  const at::Tensor lse_c = lse.contiguous();
  if (!out.defined()) out = empty_output(p.x.sizes(), p.x.options());
  a.out = out.data_ptr();
  a.lse_in = lse_c.data_ptr<double>();
  const KernelTable& k = kernels();
  run_ce(prob ? k.ce_prob_bwd : k.ce_bwd, a, k.block_lanes(a.dtype));
  return out;
}

// Forward and backward in one pass over memory (kernels/ce_fused.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps, double z,
    double softcap, bool prob) {
  Prepared p = prepare(logits, target, weight, ignore_index, eps, z, softcap, prob);
  const int64_t O = logits.size(0), I = logits.size(2);
  CeArgs& a = p.args;
  const at::Tensor g = set_grad_loss(a, grad_loss, logits);
  at::Tensor loss = at::empty({O, I}, logits.options().dtype(acc_type(logits.scalar_type())));
  at::Tensor lse = at::empty({O, I}, logits.options().dtype(at::kDouble));
  at::Tensor out = empty_output(p.x.sizes(), p.x.options());
  a.loss = loss.data_ptr();
  a.lse_out = lse.data_ptr<double>();
  a.lse_in = a.lse_out;
  a.out = out.data_ptr();
  const KernelTable& k = kernels();
  run_ce(prob ? k.ce_prob_fwd_bwd : k.ce_fwd_bwd, a, k.block_lanes(a.dtype));
  return {loss, lse, out};
}

// Every class index valid, checked before an in-place backward writes anything.
void check_all_targets(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const at::Tensor t = target.contiguous().to(at::kLong);
  const int64_t* v = t.data_ptr<int64_t>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(v[i] == ignore_index || (v[i] >= 0 && v[i] < C), "Target ", v[i],
                      " is out of bounds: argument 'target' must hold class indices in [0, ", C,
                      ") or ignore_index (", ignore_index, ").");
  }
}

// An in-place backward must not leave a partly overwritten input behind when it raises.
void validate_inplace(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                      bool prob) {
  check_logits(logits);
  if (!prob) check_all_targets(target, logits.size(1), ignore_index);
}

// The backward into `out` (the gradient forward_backward formed for a unit upstream gradient)
// unless the upstream gradient is 1; reading a CPU scalar costs nothing.
void backward_redo(const at::Tensor& upstream, const at::Tensor& grad_loss,
                   const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                   int64_t ignore_index, double eps, double z, double softcap, bool prob,
                   const at::Tensor& out) {
  TORCH_CHECK(upstream.dim() == 0 && upstream.device().is_cpu(),
              "softmax_ce: argument 'upstream' must be a 0-dim CPU tensor");
  check_out(out, logits);
  if (upstream.item<double>() == 1.0) return;
  backward(grad_loss, logits, target, weight, lse, ignore_index, eps, z, softcap, prob, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce, CPU, m) {
  CeEntryPoints<&forward, &backward, &validate_inplace, &forward_backward,
                &backward_redo>::register_all(m);
}

}  // namespace softmax_ce::cpu

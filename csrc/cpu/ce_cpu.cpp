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

// ---------------------------------------------------------------------------------------------
// The host fast path (ops.HOST_SCHEMAS): a mean / sum cross-entropy of [N, C] logits and [N] class
// indices in one call, with the same arithmetic as functional.py's general path (the mean's
// denominator, the fixed-order sum through fixed_sum, the division, the cast), so either path
// gives the same bits.
// ---------------------------------------------------------------------------------------------

void check_host_inputs(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2, "softmax_ce: argument 'logits' must be [N, C] (2-D), got ",
              logits.dim(), "-D");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "softmax_ce: argument 'target' must be [N] = [", logits.size(0), "], got ",
              target.sizes());
}

// The mean's denominator: the number of kept positions, or the fixed-order sum of w[y] over
// them (functional._mean_denominator); every kept class index range-checked.
template <typename acc_t>
acc_t mean_denominator(const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index,
                       int64_t C) {
  const at::Tensor t = target.contiguous().to(at::kLong);
  const int64_t* y = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(y[i] == ignore_index || (y[i] >= 0 && y[i] < C), "Target ", y[i],
                      " is out of bounds: argument 'target' must hold class indices in [0, ", C,
                      ") or ignore_index (", ignore_index, ").");
  }
  if (!weight.defined()) {
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) kept += y[i] != ignore_index;
    return static_cast<acc_t>(kept);
  }
  const acc_t* w = weight.data_ptr<acc_t>();
  at::Tensor picked = at::empty({n}, weight.options());
  acc_t* v = picked.data_ptr<acc_t>();
  for (int64_t i = 0; i < n; ++i) v[i] = y[i] == ignore_index ? acc_t(0) : w[y[i]];
  return fixed_sum(picked).item<acc_t>();
}

at::Tensor host_weight(const std::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(acc_type(logits.scalar_type())).contiguous();
}

at::Tensor ce_reduced(const at::Tensor& logits, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                      double z, double softcap, bool mean) {
  check_host_inputs(logits, target);
  const int64_t N = logits.size(0), C = logits.size(1);
  const at::Tensor w = host_weight(weight, logits);
  const auto [loss, lse] = forward(logits.view({N, C, 1}), target.view({N, 1}), w, ignore_index,
                                   eps, z, softcap, false);
  const at::Tensor total = fixed_sum(loss);
  if (logits.scalar_type() == at::kDouble) {
    const double t = total.item<double>();
    const double r = mean ? t / mean_denominator<double>(target, w, ignore_index, C) : t;
    return at::scalar_tensor(r, logits.options());
  }
  const float t = total.item<float>();
  const float r = mean ? t / mean_denominator<float>(target, w, ignore_index, C) : t;
  return at::scalar_tensor(r, logits.options().dtype(at::kFloat)).to(logits.scalar_type());
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd_reduced_as(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& w,
    int64_t ignore_index, double eps, double z, double softcap, bool mean) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const at::TensorOptions acc = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t denom = mean ? mean_denominator<acc_t>(target, w, ignore_index, C) : acc_t(1);
  const acc_t scale = mean ? acc_t(1) / denom : acc_t(1);
  const at::Tensor grad_scale = at::scalar_tensor(scale, acc);
  auto [loss, lse, grad] = forward_backward(grad_scale.expand({N, 1}), logits.view({N, C, 1}),
                                            target.view({N, 1}), w, ignore_index, eps, z,
                                            softcap, false);
  const acc_t t = fixed_sum(loss).item<acc_t>();
  return {at::scalar_tensor(mean ? t / denom : t, acc), lse, grad.view({N, C}), grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_fwd_bwd_reduced(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double eps, double z, double softcap, bool mean) {
  check_host_inputs(logits, target);
  const at::Tensor w = host_weight(weight, logits);
  if (logits.scalar_type() == at::kDouble) {
    return fwd_bwd_reduced_as<double>(logits, target, w, ignore_index, eps, z, softcap, mean);
  }
  return fwd_bwd_reduced_as<float>(logits, target, w, ignore_index, eps, z, softcap, mean);
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce, CPU, m) {
  CeEntryPoints<&forward, &backward, &validate_inplace, &forward_backward,
                &backward_redo>::register_all(m);
  m.impl("fixed_sum", &fixed_sum);
  m.impl("ce_reduced", &ce_reduced);
  m.impl("ce_fwd_bwd_reduced", &ce_fwd_bwd_reduced);
}

}  // namespace softmax_ce::cpu

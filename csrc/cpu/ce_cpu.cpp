// CPU bindings of the cross-entropy ops (schemas in softmax_ce/ops.py): argument checks,
// output allocation, and the parallel launch of the ISA kernels.
#include <torch/autograd.h>
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

// Whether the gradient rows are written with non-temporal stores (the row kernels; blocks of
// inner positions write C short runs at a time, too many streams for the write-combining
// buffers: slower, measured): a gradient of at least 8 MB (more than a core's L2) that is not the
// logits (an in-place gradient's lines were just read), in rows of whole 64-byte lines (a line
// written partly by streaming and partly by ordinary stores is slower than either).
bool stream_output(const at::Tensor& out, const at::Tensor& x) {
  constexpr size_t kStreamBytes = size_t(8) << 20;
  return out.nbytes() >= kStreamBytes && out.data_ptr() != x.data_ptr() && x.size(2) == 1 &&
         (x.size(1) * x.element_size()) % 64 == 0;
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
  a.stream_out = stream_output(out, p.x);
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
  a.stream_out = stream_output(out, p.x);
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
  const at::Tensor t = target.scalar_type() == at::kLong && target.is_contiguous()
                           ? target
                           : target.contiguous().to(at::kLong);
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
  std::vector<acc_t> picked(n);
  for (int64_t i = 0; i < n; ++i) picked[i] = y[i] == ignore_index ? acc_t(0) : w[y[i]];
  return fixed_sum(picked.data(), n);
}

at::Tensor host_weight(const std::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(acc_type(logits.scalar_type())).contiguous();
}

// The reduced loss without a gradient, 0-dim in the accumulation dtype.
template <typename acc_t>
at::Tensor reduced_as(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& w,
                      int64_t ignore_index, double eps, double z, double softcap, bool mean) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto [loss, lse] = forward(logits.view({N, C, 1}), target.view({N, 1}), w, ignore_index,
                                   eps, z, softcap, false);
  const acc_t t = fixed_sum(loss.data_ptr<acc_t>(), loss.numel());
  const acc_t r = mean ? t / mean_denominator<acc_t>(target, w, ignore_index, C) : t;
  return at::scalar_tensor(r, logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

at::Tensor reduced(const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                   double z, double softcap, bool mean) {
  check_host_inputs(logits, target);
  const at::Tensor w = host_weight(weight, logits);
  if (logits.scalar_type() == at::kDouble) {
    return reduced_as<double>(logits, target, w, ignore_index, eps, z, softcap, mean);
  }
  return reduced_as<float>(logits, target, w, ignore_index, eps, z, softcap, mean);
}

// ce_reduced: in the logits' dtype, as the general path's final cast gives it.
at::Tensor ce_reduced(const at::Tensor& logits, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                      double z, double softcap, bool mean) {
  return reduced(logits, target, weight, ignore_index, eps, z, softcap, mean)
      .to(logits.scalar_type());
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
  const acc_t t = fixed_sum(loss.data_ptr<acc_t>(), loss.numel());
  return {at::scalar_tensor(mean ? t / denom : t, acc), lse, grad.view({N, C}), grad_scale};
}

// The loss, lse, gradient and d(loss)/d(per-position loss) of a reduced loss in one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd_reduced(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double eps, double z, double softcap, bool mean) {
  check_host_inputs(logits, target);
  const at::Tensor w = host_weight(weight, logits);
  if (logits.scalar_type() == at::kDouble) {
    return fwd_bwd_reduced_as<double>(logits, target, w, ignore_index, eps, z, softcap, mean);
  }
  return fwd_bwd_reduced_as<float>(logits, target, w, ignore_index, eps, z, softcap, mean);
}

// ce_loss_host: fwd_bwd_reduced with its backward in C++ (an autograd node of its own, no
// Python on the way): the gradient the forward formed is handed over when the upstream gradient
// is 1; otherwise it is redone in its buffer (first backward) or recomputed (later ones) by the
// backward kernel, as autograd.py's ReducedCrossEntropyFunction does, so the bits are the same
// as on the general path. A differentiable backward (create_graph=True) calls
// softmax_ce::ce_bwd_differentiable (autograd.py's Function, whose backward is the second
// derivative): no formula of its own here.
struct HostCeFunction : public torch::autograd::Function<HostCeFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            int64_t ignore_index, double eps, double z, bool mean) {
    TORCH_CHECK(!(weight.has_value() && weight->defined() && weight->requires_grad()),
                "softmax_ce: argument 'weight' requires grad; softmax_ce does not differentiate "
                "with respect to class weights");
    auto [total, lse, grad, grad_scale] =
        fwd_bwd_reduced(logits, target, weight, ignore_index, eps, z, 0.0, mean);
    const at::Tensor w = weight.has_value() ? *weight : at::Tensor();
    ctx->save_for_backward({logits, target, w, lse, grad_scale, grad});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["z"] = z;
    ctx->saved_data["handed_over"] = false;
    return total;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &weight = saved[2], &lse = saved[3];
    const at::Tensor &grad_scale = saved[4], &fused = saved[5];
    const at::Tensor& upstream = grad_outputs[0];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble(), z = ctx->saved_data["z"].toDouble();
    const int64_t N = logits.size(0), C = logits.size(1);
    torch::autograd::variable_list grads(7);
    if (!ctx->needs_input_grad(0)) return grads;
    if (at::GradMode::is_enabled()) {
      static const auto differentiable =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("softmax_ce::ce_bwd_differentiable", "")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
                                double, double, double)>();
      const at::Tensor g = (upstream * grad_scale).expand({N, 1});
      const std::optional<at::Tensor> w =
          weight.defined() ? std::optional<at::Tensor>(weight.to(acc_type(logits.scalar_type())))
                           : std::nullopt;
      grads[0] = differentiable
                     .call(g, logits.view({N, C, 1}), target.view({N, 1}), w, lse.view({N, 1}),
                           ignore_index, eps, z, 0.0)
                     .view({N, C});
      return grads;
    }
    const bool first = !ctx->saved_data["handed_over"].toBool();
    ctx->saved_data["handed_over"] = true;
    if (first && upstream.item<double>() == 1.0) {
      grads[0] = fused;
      return grads;
    }
    const at::Tensor w = weight.defined() ? weight.to(acc_type(logits.scalar_type())) : weight;
    const at::Tensor grad_loss = (upstream * grad_scale).expand({N, 1});
    // first: redone in the handed-over buffer (its version counter kept, as autograd.py does)
    at::Tensor out = first ? fused.view({N, C, 1}) : at::Tensor();
    out = cpu::backward(grad_loss, logits.view({N, C, 1}), target.view({N, 1}), w, lse,
                        ignore_index, eps, z, 0.0, false, out);
    grads[0] = out.view({N, C});
    return grads;
  }
};

at::Tensor ce_loss_host_autograd(const at::Tensor& logits, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                 double eps, double z, bool mean) {
  return HostCeFunction::apply(logits, target, weight, ignore_index, eps, z, mean);
}

// Below autograd (nothing recorded): the loss alone (accumulation dtype), no gradient formed.
at::Tensor ce_loss_host_cpu(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, int64_t ignore_index,
                            double eps, double z, bool mean) {
  return reduced(logits, target, weight, ignore_index, eps, z, 0.0, mean);
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce, Autograd, m) { m.impl("ce_loss_host", &ce_loss_host_autograd); }

TORCH_LIBRARY_IMPL(softmax_ce, CPU, m) {
  CeEntryPoints<&forward, &backward, &validate_inplace, &forward_backward,
                &backward_redo>::register_all(m);
  m.impl("fixed_sum", static_cast<at::Tensor (*)(const at::Tensor&)>(&fixed_sum));
  m.impl("ce_reduced", &ce_reduced);
  m.impl("ce_loss_host", &ce_loss_host_cpu);
}

}  // namespace softmax_ce::cpu

// CPU bindings of softmax_fwd / softmax_bwd (softmax and log_softmax over dim 1 of
// [outer, C, inner]).
#include <torch/library.h>

#include <algorithm>

#include "bindings.h"

namespace softmax_ce::cpu {
namespace {

void run_softmax(SoftmaxFn fn, const SoftmaxArgs& args, int64_t lanes) {
  const int64_t units = work_units(args.outer, args.inner, lanes);
  if (units == 0 || args.C == 0) return;
  const int64_t per_unit = std::max<int64_t>(1, args.C * (args.inner == 1 ? 1 : lanes));
  at::parallel_for(0, units, std::max<int64_t>(1, 32768 / per_unit),
                   [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

at::Tensor softmax_fwd(const at::Tensor& x, bool log) {
  check_logits(x, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = empty_output(xc.sizes(), xc.options());
  SoftmaxArgs a;
  a.dtype = to_dtype(x, "x");
  a.outer = x.size(0);
  a.C = x.size(1);
  a.inner = x.size(2);
  a.log = log;
  a.x = xc.data_ptr();
  a.out = out.data_ptr();
  const KernelTable& k = kernels();
  run_softmax(k.softmax_fwd, a, k.block_lanes(a.dtype));
  return out;
}

at::Tensor softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, bool log) {
  check_logits(y, "y");
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "softmax_ce: argument 'grad_y' must have y's shape ",
              y.sizes(), ", got ", grad_y.sizes());
  const at::Tensor yc = y.contiguous();
  const at::Tensor gc = grad_y.to(y.scalar_type()).contiguous();
  at::Tensor out = empty_output(yc.sizes(), yc.options());
  SoftmaxArgs a;
  a.dtype = to_dtype(y, "y");
  a.outer = y.size(0);
  a.C = y.size(1);
  a.inner = y.size(2);
  a.log = log;
  a.y = yc.data_ptr();
  a.grad = gc.data_ptr();
  a.out = out.data_ptr();
  const KernelTable& k = kernels();
  run_softmax(k.softmax_bwd, a, k.block_lanes(a.dtype));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace softmax_ce::cpu

// CUDA bindings of the cross-entropy ops (schemas in softmax_ce/ops.py): argument checks,
// allocation, and launches on the current stream under a device guard. The kernels are in
// ce_kernels.cuh (compiled once per dtype, ce_cuda_<dtype>.cu). No host synchronisation: an
// out-of-range class index is recorded on the device in g_bad_target, which every launch
// receives by address, and read by softmax_ce.cuda_take_target_error().
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "../common/ce_checks.h"
#include "../common/ce_entry_points.h"
#include "ce_launch.h"

namespace softmax_ce::cuda {

__device__ unsigned long long g_bad_target = kNoBadTarget;

// Reads and clears the recorded out-of-range class index of the current device. Both copies go
// on the current stream, so they are ordered after every kernel launched on it (PyTorch's streams
// do not synchronise with the legacy default stream that cudaMemcpyFromSymbol would use); then
// that stream is synchronised.
bool take_bad_target(int64_t* value) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  unsigned long long v = kNoBadTarget;
  C10_CUDA_CHECK(cudaMemcpyFromSymbolAsync(&v, g_bad_target, sizeof(v), 0,
                                           cudaMemcpyDeviceToHost, stream));
  static const unsigned long long none = kNoBadTarget;
  C10_CUDA_CHECK(cudaMemcpyToSymbolAsync(g_bad_target, &none, sizeof(none), 0,
                                         cudaMemcpyHostToDevice, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  *value = static_cast<int64_t>(v);
  return v != kNoBadTarget;
}

namespace {

// The device address of g_bad_target on the current device, looked up once per device (the
// kernels, compiled in other translation units, write through it).
unsigned long long* bad_target_address() {
  static std::mutex mutex;
  static std::vector<unsigned long long*> addresses;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  if (addresses.size() <= static_cast<size_t>(device)) addresses.resize(device + 1, nullptr);
  if (addresses[device] == nullptr) {
    void* ptr = nullptr;
    C10_CUDA_CHECK(cudaGetSymbolAddress(&ptr, g_bad_target));
    addresses[device] = static_cast<unsigned long long*>(ptr);
  }
  return addresses[device];
}

struct Prepared {
  at::Tensor x, target, weight, w_sum;
  CeParams p{};
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                 double z, double softcap, bool prob) {
  TORCH_CHECK(logits.is_cuda(), "softmax_ce: argument 'logits' must be a CUDA tensor");
  check_ce_inputs(logits, target, weight, prob);
  const int64_t O = logits.size(0), C = logits.size(1), I = logits.size(2);
  Prepared r;
  r.x = logits.contiguous();
  r.target = target.contiguous();
  CeParams& p = r.p;
  p.w_sum_host = static_cast<double>(C);
  if (weight.has_value() && weight->defined()) {
    r.weight = weight->contiguous();
    r.w_sum = r.weight.sum();  // stays on the device: no synchronisation
    p.weight = r.weight.data_ptr();
    p.w_sum_dev = r.w_sum.data_ptr();
  }
  p.x = r.x.data_ptr();
  if (prob) {
    p.prob = r.target.data_ptr();
  } else {
    p.target = r.target.data_ptr();
    p.target_i32 = r.target.scalar_type() == at::kInt;
  }
  p.bad_target = bad_target_address();
  p.outer = O;
  p.C = C;
  p.inner = I;
  p.ignore_index = ignore_index;
  p.eps = eps;
  p.z = z;
  p.softcap = softcap;
  return r;
}

void dispatch(const CeParams& p, at::ScalarType st, bool prob, Pass pass) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (st) {
    case at::kDouble:
      return launch<double>(p, prob, pass, stream);
    case at::kFloat:
      return launch<float>(p, prob, pass, stream);
    case at::kBFloat16:
      return launch<c10::BFloat16>(p, prob, pass, stream);
    case at::kHalf:
      return launch<c10::Half>(p, prob, pass, stream);
    default:
      TORCH_CHECK(false, "softmax_ce: unsupported dtype ", st);
  }
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           int64_t ignore_index, double eps, double z,
                                           double softcap, bool prob) {
  const c10::cuda::CUDAGuard guard(logits.device());
  Prepared r = prepare(logits, target, weight, ignore_index, eps, z, softcap, prob);
  const int64_t O = logits.size(0), I = logits.size(2);
  at::Tensor loss = at::empty({O, I}, logits.options().dtype(acc_type(logits.scalar_type())));
  at::Tensor lse = at::empty({O, I}, logits.options().dtype(at::kDouble));
  r.p.loss = loss.data_ptr();
  r.p.lse_out = lse.data_ptr<double>();
  dispatch(r.p, logits.scalar_type(), prob, Pass::kForward);
  return {loss, lse};
}

// The per-position upstream gradient [outer, inner] into the kernel parameters; the returned
// tensor (accumulation dtype, strides kept: 0 for a broadcast mean) must outlive the launch.
at::Tensor set_grad_loss(CeParams& p, const at::Tensor& grad_loss, const at::Tensor& logits) {
  check_grad_loss(grad_loss, logits);
  at::Tensor g = grad_loss.to(acc_type(logits.scalar_type()));
  p.grad = g.data_ptr();
  p.grad_stride_outer = g.stride(0);
  p.grad_stride_inner = g.stride(1);
  return g;
}

// The backward into `out` (a fresh tensor when undefined). With `upstream` (a 0-dim tensor) the
// kernels read it first and do nothing when it is 1.
at::Tensor backward_impl(const at::Tensor& grad_loss, const at::Tensor& logits,
                         const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         const at::Tensor& lse, int64_t ignore_index, double eps, double z,
                         double softcap, bool prob, at::Tensor out, const at::Tensor& upstream) {
  const c10::cuda::CUDAGuard guard(logits.device());
  Prepared r = prepare(logits, target, weight, ignore_index, eps, z, softcap, prob);
  check_lse(lse, logits);
  const at::Tensor g = set_grad_loss(r.p, grad_loss, logits);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor u;
  if (upstream.defined()) {
    TORCH_CHECK(upstream.dim() == 0 && upstream.device() == logits.device(),
                "softmax_ce: argument 'upstream' must be a 0-dim tensor on ", logits.device());
    u = upstream.to(acc_type(logits.scalar_type()));
    r.p.skip_if_unit = u.data_ptr();
  }
  if (!out.defined()) out = at::empty_like(r.x, at::MemoryFormat::Contiguous);
  r.p.out = out.data_ptr();
  r.p.lse_in = lse_c.data_ptr<double>();
  dispatch(r.p, logits.scalar_type(), prob, Pass::kBackward);
  return out;
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                    int64_t ignore_index, double eps, double z, double softcap, bool prob,
                    at::Tensor out) {
  return backward_impl(grad_loss, logits, target, weight, lse, ignore_index, eps, z, softcap, prob,
                       out, at::Tensor());
}

// The gradient forward_backward formed for a unit upstream gradient, redone in place for the
// actual one; nothing happens (on the device, no host synchronisation) when that is 1.
void backward_redo(const at::Tensor& upstream, const at::Tensor& grad_loss,
                   const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                   int64_t ignore_index, double eps, double z, double softcap, bool prob,
                   const at::Tensor& out) {
  check_out(out, logits);
  (void)backward_impl(grad_loss, logits, target, weight, lse, ignore_index, eps, z, softcap, prob,
                      out, upstream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps, double z,
    double softcap, bool prob) {
  const c10::cuda::CUDAGuard guard(logits.device());
  Prepared r = prepare(logits, target, weight, ignore_index, eps, z, softcap, prob);
  const int64_t O = logits.size(0), I = logits.size(2);
  const at::Tensor g = set_grad_loss(r.p, grad_loss, logits);
  at::Tensor loss = at::empty({O, I}, logits.options().dtype(acc_type(logits.scalar_type())));
  at::Tensor lse = at::empty({O, I}, logits.options().dtype(at::kDouble));
  at::Tensor out = at::empty_like(r.x, at::MemoryFormat::Contiguous);
  r.p.loss = loss.data_ptr();
  r.p.lse_out = lse.data_ptr<double>();
  r.p.out = out.data_ptr();
  dispatch(r.p, logits.scalar_type(), prob, Pass::kBoth);
  return {loss, lse, out};
}

// Nothing to check on the host: an out-of-range class index is handled on the device.
void validate_inplace(const at::Tensor&, const at::Tensor&, int64_t, bool) {}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce, CUDA, m) {
  CeEntryPoints<&forward, &backward, &validate_inplace, &forward_backward,
                &backward_redo>::register_all(m);
}

}  // namespace softmax_ce::cuda

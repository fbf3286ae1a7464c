// CUDA bindings of softmax_fwd / softmax_bwd (schemas in softmax_ce/ops.py): argument checks,
// allocation, and the launch of softmax_kernels.cuh on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "softmax_kernels.cuh"

namespace softmax_ce::cuda {
namespace {

template <bool kBackward>
void dispatch(const SoftmaxParams& p, at::ScalarType dtype) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kDouble:
      return launch<double, kBackward>(p, stream);
    case at::kFloat:
      return launch<float, kBackward>(p, stream);
    case at::kBFloat16:
      return launch<c10::BFloat16, kBackward>(p, stream);
    case at::kHalf:
      return launch<c10::Half, kBackward>(p, stream);
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "softmax_ce: unsupported dtype ", dtype);
  }
}

void check_3d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "softmax_ce: argument '", name, "' must be [outer, C, inner] (3-D)");
  TORCH_CHECK(t.is_cuda(), "softmax_ce: argument '", name, "' must be a CUDA tensor");
}

at::Tensor softmax_fwd(const at::Tensor& x, bool log) {
  check_3d(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  SoftmaxParams p{xc.data_ptr(), nullptr, nullptr, out.data_ptr(), x.size(0), x.size(1),
                  x.size(2), log, 0};
  dispatch<false>(p, x.scalar_type());
  return out;
}

at::Tensor softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, bool log) {
  check_3d(y, "y");
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.device() == y.device(),
              "softmax_ce: argument 'grad_y' must have y's shape and device");
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const at::Tensor gc = grad_y.to(y.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(yc, at::MemoryFormat::Contiguous);
  SoftmaxParams p{nullptr, yc.data_ptr(), gc.data_ptr(), out.data_ptr(), y.size(0), y.size(1),
                  y.size(2), log, 0};
  dispatch<true>(p, y.scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce, CUDA, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace softmax_ce::cuda

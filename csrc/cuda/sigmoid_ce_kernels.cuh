// Per-element functors of the sigmoid (binary) cross-entropy ops, run by ATen's TensorIterator
// GPU loop (sigmoid_ce_cuda.cu): the formulas are row_math.h's, shared with the CPU kernels.
#pragma once

#include "device_common.cuh"

namespace softmax_ce::cuda {

template <typename T>
struct SigmoidLoss {
  __device__ T operator()(T x, T y, T w, T pw) const {
    using acc_t = typename AccOf<T>::type;
    return static_cast<T>(sigmoid_ce_loss<acc_t>(x, y, w, pw));
  }
};

template <typename T>
struct SigmoidGrad {
  __device__ T operator()(T g, T x, T y, T w, T pw) const {
    using acc_t = typename AccOf<T>::type;
    return static_cast<T>(sigmoid_ce_grad<acc_t>(g, x, y, w, pw));
  }
};

}  // namespace softmax_ce::cuda

// Sigmoid (binary) cross-entropy forward and backward, elementwise over TensorIterator loops.
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

// ------------------------------------------------------------------------------------------
// Sigmoid cross-entropy (elementwise, over TensorIterator loops)
// ------------------------------------------------------------------------------------------

// data = {out, [g], x, y, [w], [pw]}; kGrad selects the backward.
template <typename T, bool kGrad>
void sigmoid_loop_t(const SigmoidArgs& a, char** data, const int64_t* strides, int64_t n) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L, B = 2 * L;
  const int nin = 2 + (kGrad ? 1 : 0) + (a.has_weight ? 1 : 0) + (a.has_pos_weight ? 1 : 0);
  const int ix = kGrad ? 2 : 1;
  const int iw = a.has_weight ? ix + 2 : -1;
  const int ipw = a.has_pos_weight ? ix + 2 + (a.has_weight ? 1 : 0) : -1;
  auto scalar_at = [&](int k, int64_t i) -> acc_t {
    return to_acc(*reinterpret_cast<const T*>(data[k] + i * strides[k]));
  };
  auto element = [&](int64_t i) -> acc_t {
    const acc_t xv = scalar_at(ix, i), yv = scalar_at(ix + 1, i);
    const acc_t wv = iw >= 0 ? scalar_at(iw, i) : acc_t(1);
    const acc_t pwv = ipw >= 0 ? scalar_at(ipw, i) : acc_t(1);
    if constexpr (kGrad) {
      return sigmoid_ce_grad(scalar_at(1, i), xv, yv, wv, pwv);
    } else {
      return sigmoid_ce_loss(xv, yv, wv, pwv);
    }
  };
  bool vectorizable = strides[0] == static_cast<int64_t>(sizeof(T));
  for (int k = 1; k <= nin; ++k) {
    vectorizable = vectorizable && (strides[k] == static_cast<int64_t>(sizeof(T)) || strides[k] == 0);
  }
  int64_t i = 0;
  if (vectorizable) {
    // stride-0 (broadcast) operands are read from a buffer holding their one value
    alignas(64) T bcast[6][B];
    const T* src[6];
    int64_t step[6];
    for (int k = 1; k <= nin; ++k) {
      if (strides[k] == 0) {
        std::fill(bcast[k], bcast[k] + B, *reinterpret_cast<const T*>(data[k]));
        src[k] = bcast[k];
        step[k] = 0;
      } else {
        src[k] = reinterpret_cast<const T*>(data[k]);
        step[k] = B;
      }
    }
    T* dst = reinterpret_cast<T*>(data[0]);
    const V one(acc_t(1));
    for (; i + B <= n; i += B) {
      V r[2];
      V xv[2], yv[2], wv[2] = {one, one}, pwv[2] = {one, one}, gv[2];
      io::load(src[ix] + (step[ix] ? i : 0), xv[0], xv[1]);
      io::load(src[ix + 1] + (step[ix + 1] ? i : 0), yv[0], yv[1]);
      if (iw >= 0) io::load(src[iw] + (step[iw] ? i : 0), wv[0], wv[1]);
      if (ipw >= 0) io::load(src[ipw] + (step[ipw] ? i : 0), pwv[0], pwv[1]);
      if constexpr (kGrad) io::load(src[1] + (step[1] ? i : 0), gv[0], gv[1]);
      for (int h = 0; h < 2; ++h) {  // row_math.h's formulas, for a vector
        if constexpr (kGrad) {
          r[h] = sigmoid_ce_grad_m<VecMath<acc_t>>(gv[h], xv[h], yv[h], wv[h], pwv[h]);
        } else {
          r[h] = sigmoid_ce_loss_m<VecMath<acc_t>>(xv[h], yv[h], wv[h], pwv[h]);
        }
      }
      io::store(dst + i, r[0], r[1]);
    }
  }
  for (; i < n; ++i) {
    *reinterpret_cast<T*>(data[0] + i * strides[0]) = static_cast<T>(element(i));
  }
}

template <bool kGrad>
void sigmoid_dispatch(const SigmoidArgs& a, char** data, const int64_t* strides, int64_t n) {
  switch (a.dtype) {
    case Dtype::f64:
      return sigmoid_loop_t<double, kGrad>(a, data, strides, n);
    case Dtype::f32:
      return sigmoid_loop_t<float, kGrad>(a, data, strides, n);
    case Dtype::bf16:
      return sigmoid_loop_t<c10::BFloat16, kGrad>(a, data, strides, n);
    case Dtype::f16:
      return sigmoid_loop_t<c10::Half, kGrad>(a, data, strides, n);
  }
}

void sigmoid_fwd(const SigmoidArgs& a, char** d, const int64_t* s, int64_t n) {
  sigmoid_dispatch<false>(a, d, s, n);
}
void sigmoid_bwd(const SigmoidArgs& a, char** d, const int64_t* s, int64_t n) {
  sigmoid_dispatch<true>(a, d, s, n);
}

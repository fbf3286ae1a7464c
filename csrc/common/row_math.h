// Per-position math shared by the CPU and CUDA kernels: one source of truth for the loss and
// gradient formulas of softmax cross-entropy (see softmax_ce/autograd.py for the derivation).
//
// Notation, per position: x' = cap(x) (soft-capped logit), M = max_c x'_c, S = sum_c exp(x'_c - M),
// log_s = log(S), lse = M + log_s, p_c = exp(x'_c - lse), eps = label_smoothing, w = class weights
// (all ones when absent), W = sum_c w_c, z = z_loss coefficient.
//
//   class-index target y:  loss = (1-eps) w_y (M - x'_y + log_s) + (eps/C) (W log_s + D) + z lse^2,
//                          D = sum_c w_c (M - x'_c);
//   probability target t:  loss = A log_s + D + z lse^2, a_c = w_c ((1-eps) t_c + eps/C),
//                          A = sum_c a_c, D = sum_c a_c (M - x'_c);
//   gradient:              dloss/dx_c = g [(A + 2 z lse) p_c - b_c] cap'(x_c),
//                          b_c = (eps/C) w_c + (1-eps) w_y [c = y]  or  b_c = a_c,
//                          A = (1-eps) w_y + (eps/C) W              or  A = sum_c a_c.
//
// Keeping M and log_s apart (instead of forming lse first) avoids the cancellation of
// lse - x'_y when |x| is large; the saved lse is float64 for the same reason (split_lse).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SCE_HD __host__ __device__ __forceinline__
#else
#define SCE_HD inline
#endif

namespace softmax_ce {

// The accumulation type: double for double, float for float, bfloat16 and float16.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Overloads that pick the float or double C function on host and device alike.
SCE_HD float sce_tanh(float v) { return tanhf(v); }
SCE_HD double sce_tanh(double v) { return tanh(v); }
SCE_HD float sce_exp(float v) { return expf(v); }
SCE_HD double sce_exp(double v) { return exp(v); }
SCE_HD float sce_log1p(float v) { return log1pf(v); }
SCE_HD double sce_log1p(double v) { return log1p(v); }
SCE_HD float sce_log(float v) { return logf(v); }
SCE_HD double sce_log(double v) { return log(v); }

// Soft-capping: x' = s tanh(x / s), cap'(x) = 1 - tanh(x / s)^2. softcap <= 0 disables it.
template <typename acc_t>
struct Cap {
  acc_t s;
  acc_t inv_s;
  SCE_HD explicit Cap(double softcap)
      : s(static_cast<acc_t>(softcap)),
        inv_s(softcap > 0 ? static_cast<acc_t>(1.0 / softcap) : acc_t(0)) {}
  SCE_HD bool on() const { return s > acc_t(0); }
  SCE_HD acc_t value(acc_t x) const { return on() ? s * sce_tanh(x * inv_s) : x; }
  // x' and cap'(x) together (one tanh)
  SCE_HD acc_t value_and_derivative(acc_t x, acc_t& derivative) const {
    if (!on()) {
      derivative = acc_t(1);
      return x;
    }
    acc_t th = sce_tanh(x * inv_s);
    derivative = acc_t(1) - th * th;
    return s * th;
  }
};

// A float64 lse split into hi + lo in acc_t, so that (x' - hi) - lo is x' - lse to acc_t
// precision even where |lse| is large.
template <typename acc_t>
SCE_HD void split_lse(double lse, acc_t& hi, acc_t& lo) {
  hi = static_cast<acc_t>(lse);
  lo = static_cast<acc_t>(lse - static_cast<double>(hi));
}

// The row statistics' verdict: lse is NaN when the row maximum is not finite (a row of -inf,
// a +inf or a NaN logit), exactly where torch's log_softmax is NaN.
template <typename acc_t>
SCE_HD bool finite_max(acc_t m) {
  return m == m && m != INFINITY && m != -INFINITY;
}

template <typename acc_t>
SCE_HD double lse_from_stats(acc_t m, acc_t log_s) {
  return finite_max(m) ? static_cast<double>(m) + static_cast<double>(log_s) : NAN;
}

// Forward, class-index target. x_y is the capped logit of the target class.
template <typename acc_t>
SCE_HD acc_t ce_index_loss(acc_t m, acc_t log_s, acc_t x_y, acc_t w_y, acc_t dot, acc_t w_sum,
                           acc_t eps, acc_t eps_over_c, acc_t z, double lse) {
  acc_t loss = (acc_t(1) - eps) * w_y * ((m - x_y) + log_s);
  if (eps > acc_t(0)) loss += eps_over_c * (w_sum * log_s + dot);
  if (z > acc_t(0)) loss += z * static_cast<acc_t>(lse * lse);
  return finite_max(m) ? loss : acc_t(NAN);
}

// Forward, probability target: A = sum_c a_c, dot = sum_c a_c (M - x'_c).
template <typename acc_t>
SCE_HD acc_t ce_prob_loss(acc_t m, acc_t log_s, acc_t a_sum, acc_t dot, acc_t z, double lse) {
  acc_t loss = a_sum * log_s + dot;
  if (z > acc_t(0)) loss += z * static_cast<acc_t>(lse * lse);
  return finite_max(m) ? loss : acc_t(NAN);
}

// Backward, any target kind: the coefficient g (A + 2 z lse) of p_c.
template <typename acc_t>
SCE_HD acc_t ce_p_coef(acc_t g, acc_t a, acc_t z, double lse) {
  return g * (a + acc_t(2) * z * static_cast<acc_t>(lse));
}

// Backward, class-index target: A = (1-eps) w_y + (eps/C) W.
template <typename acc_t>
SCE_HD acc_t ce_index_a(acc_t w_y, acc_t w_sum, acc_t eps, acc_t eps_over_c) {
  return (acc_t(1) - eps) * w_y + eps_over_c * w_sum;
}

// The elementary operations of the formulas below for one value. The formulas are written once,
// over a math policy M: ScalarMath here (CUDA threads, CPU scalar tails), a vector of values in
// the CPU kernels (VecMath, csrc/cpu/kernels/vec_math.h).
template <typename acc_t>
struct ScalarMath {
  static SCE_HD acc_t c(double v) { return static_cast<acc_t>(v); }
  static SCE_HD acc_t exp(acc_t v) { return sce_exp(v); }
  static SCE_HD acc_t log1p(acc_t v) { return sce_log1p(v); }
  static SCE_HD acc_t abs(acc_t v) { return v < acc_t(0) ? -v : v; }
  static SCE_HD acc_t neg(acc_t v) { return -v; }
  static SCE_HD acc_t max0(acc_t v) { return v > acc_t(0) ? v : acc_t(0); }
  static SCE_HD acc_t fmadd(acc_t a, acc_t b, acc_t c) { return a * b + c; }
};

// a_c = w_c ((1-eps) t_c + eps/C) for probability targets, from eps1 = 1 - eps.
template <typename M, typename A>
SCE_HD A ce_prob_coef_m(A t, A w, A eps1, A eps_over_c) {
  return w * M::fmadd(t, eps1, eps_over_c);
}

// Sigmoid (binary) cross-entropy, torch's formula:
//   loss = w [(1 - y) x + (1 + (pw - 1) y) log(1 + exp(-x))],
//   dloss/dx = g w [(pw y + 1 - y) sigmoid(x) - pw y].
template <typename M, typename A>
SCE_HD A softplus_neg_m(A x) {  // log(1 + exp(-x)) = log1p(exp(-|x|)) + max(-x, 0), no overflow
  return M::log1p(M::exp(M::neg(M::abs(x)))) + M::max0(M::neg(x));
}

template <typename M, typename A>
SCE_HD A sigmoid_ce_loss_m(A x, A y, A w, A pw) {
  const A one = M::c(1);
  return w * ((one - y) * x + (one + (pw - one) * y) * softplus_neg_m<M>(x));
}

template <typename M, typename A>
SCE_HD A sigmoid_ce_grad_m(A g, A x, A y, A w, A pw) {
  const A one = M::c(1);
  const A s = one / (one + M::exp(M::neg(x)));
  const A pwy = pw * y;
  return g * w * ((pwy + one - y) * s - pwy);
}

// The same formulas for one value.
template <typename acc_t>
SCE_HD acc_t ce_prob_coef(acc_t t, acc_t w, acc_t eps1, acc_t eps_over_c) {
  return ce_prob_coef_m<ScalarMath<acc_t>>(t, w, eps1, eps_over_c);
}

template <typename acc_t>
SCE_HD acc_t sigmoid_ce_loss(acc_t x, acc_t y, acc_t w, acc_t pw) {
  return sigmoid_ce_loss_m<ScalarMath<acc_t>>(x, y, w, pw);
}

template <typename acc_t>
SCE_HD acc_t sigmoid_ce_grad(acc_t g, acc_t x, acc_t y, acc_t w, acc_t pw) {
  return sigmoid_ce_grad_m<ScalarMath<acc_t>>(g, x, y, w, pw);
}

}  // namespace softmax_ce

// Cross-entropy over narrow rows (inner == 1, C <= kNarrowMaxC): vectorised across rows.
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

// A row of a few classes fills a vector or two partly, and its fixed costs (the reductions across
// a vector, the logarithm, the lse in double) are paid per row. Here groups of up to 2L rows are
// transposed into L1 buffers [C][rows] and handed to the block kernels (ce_forward.h,
// ce_backward.h), whose lanes are inner positions: they become rows, a vector holds one class of
// 2L rows, and the per-row costs are shared by the lanes. The gradient is transposed back.
constexpr int64_t kNarrowMaxC = 64;

// dst[c * rows + j] = src[j * C + c] (in), and back (out). A full group of float / double rows
// is read by gathers (one class of 2L rows per pair of gathers).
template <typename T>
inline void transpose_in(const T* src, int64_t rows, int64_t C, T* dst) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    using V = Vectorized<T>;
    using I = at::vec::int_same_size_t<T>;
    using VI = Vectorized<I>;
    constexpr int64_t L = V::size();
    static_assert(VI::size() == L, "one index per lane");
    if (rows == 2 * L) {
      alignas(64) I idx[2 * L];
      for (int64_t i = 0; i < 2 * L; ++i) idx[i] = static_cast<I>(i * C);
      const VI ia = VI::loadu(idx), ib = VI::loadu(idx + L);
      for (int64_t c = 0; c < C; ++c) {
        at::vec::gather<sizeof(T)>(src + c, ia).store(dst + c * rows);
        at::vec::gather<sizeof(T)>(src + c, ib).store(dst + c * rows + L);
      }
      return;
    }
  }
  for (int64_t j = 0; j < rows; ++j) {
    const T* s = src + j * C;
    for (int64_t c = 0; c < C; ++c) dst[c * rows + j] = s[c];
  }
}

template <typename T>
inline void transpose_out(const T* src, int64_t rows, int64_t C, T* dst) {
  for (int64_t j = 0; j < rows; ++j) {
    T* d = dst + j * C;
    for (int64_t c = 0; c < C; ++c) d[c] = src[c * rows + j];
  }
}

// The arguments of rows [r0, r0 + n) as one block of n inner positions ([1, C, n]) held in the
// buffers: per-position pointers offset by r0, the upstream gradient's row stride as its inner
// stride.
template <typename T>
inline CeArgs narrow_args(const CeArgs& a, int64_t r0, int64_t n, const T* xb, T* ob,
                          const T* pb) {
  using acc_t = typename AccOf<T>::type;
  CeArgs s = a;
  s.outer = 1;
  s.inner = n;
  s.x = xb;
  s.out = ob;
  if (a.prob != nullptr) s.prob = pb;
  if (a.target != nullptr) {
    s.target = a.target_int32 ? static_cast<const void*>(static_cast<const int32_t*>(a.target) + r0)
                              : static_cast<const void*>(static_cast<const int64_t*>(a.target) + r0);
  }
  if (a.loss != nullptr) s.loss = static_cast<acc_t*>(a.loss) + r0;
  if (a.lse_out != nullptr) s.lse_out = a.lse_out + r0;
  if (a.lse_in != nullptr) s.lse_in = a.lse_in + r0;
  if (a.grad != nullptr) {
    s.grad = static_cast<const acc_t*>(a.grad) + r0 * a.grad_stride_outer;
    s.grad_stride_outer = 0;
    s.grad_stride_inner = a.grad_stride_outer;
  }
  return s;
}

enum class Pass { kForward, kBackward, kBoth };

template <typename T, bool kCap, Dot kDot, bool kW, Pass kPass>
Status ce_narrow_rows(const CeArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t B = 2 * IO<T>::L;
  constexpr bool kProb = kDot == Dot::kProbabilities;
  alignas(64) T xb[kNarrowMaxC * B];
  alignas(64) T ob[kPass == Pass::kForward ? 1 : kNarrowMaxC * B];
  alignas(64) T pb[kProb ? kNarrowMaxC * B : 1];
  const T* x = static_cast<const T*>(a.x);
  const T* prob = static_cast<const T*>(a.prob);
  T* out = static_cast<T*>(a.out);
  const int64_t C = a.C;
  for (int64_t r0 = begin; r0 < end; r0 += B) {
    const int64_t n = std::min(B, end - r0);
    transpose_in(x + r0 * C, n, C, xb);
    if constexpr (kProb) transpose_in(prob + r0 * C, n, C, pb);
    const CeArgs s = narrow_args<T>(a, r0, n, xb, ob, pb);
    if constexpr (kPass != Pass::kBackward) {
      const Status st = ce_fwd_blocks<T, kCap, kDot, kW>(s, 0, 1);
      if (st.bad_target) return st;
    }
    if constexpr (kPass != Pass::kForward) {
      // the range's targets were validated before an in-place backward (ce_cpu.cpp)
      const Status st = ce_bwd_blocks<T, kCap, kDot, kW>(s, 0, 1);
      if (st.bad_target) return st;
      transpose_out(ob, n, C, out + r0 * C);
    }
  }
  return {};
}

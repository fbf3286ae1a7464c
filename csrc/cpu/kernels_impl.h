// CPU kernels, written once against at::vec::Vectorized and compiled once per instruction set
// by isa_default.cpp / isa_avx2.cpp / isa_avx512.cpp (each sets CPU_CAPABILITY and its target
// before including this file). Everything here lives in the ISA's own namespace (SCE_ISA_NS),
// so the three copies never collide. Kernels see raw pointers only (kernels.h).
//
// Memory traffic: a forward reads each logit once (rows are processed in L1-sized chunks with
// an online max/sum across chunks); a backward reads each logit once and writes the gradient
// once. Arithmetic is in float for float/bf16/fp16 and in double for double.
#pragma once

#ifndef SCE_ISA_NS
#error "kernels_impl.h is included by the isa_*.cpp files only"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/row_math.h"
#include "kernels.h"

namespace softmax_ce::cpu {
namespace SCE_ISA_NS {

using at::vec::Vectorized;

// Loads and stores of two accumulator vectors (2L elements of T); the _n variants touch only the
// first n (< 2L) elements and fill the rest with zeros.
template <typename T, typename Enable = void>
struct IO;

template <typename T>
struct IO<T, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, double>>> {
  using V = Vectorized<T>;
  static constexpr int64_t L = V::size();
  static void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + L);
  }
  static void load_n(const T* p, int64_t n, V& a, V& b) {
    a = n >= L ? V::loadu(p) : (n > 0 ? V::loadu(p, n) : V(T(0)));
    b = n > L ? V::loadu(p + L, n - L) : V(T(0));
  }
  static void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + L);
  }
  static void store_n(T* p, int64_t n, const V& a, const V& b) {
    if (n >= L) {
      a.store(p);
    } else if (n > 0) {
      a.store(p, n);
    }
    if (n > L) b.store(p + L, n - L);
  }
};

template <typename T>
struct IO<T, std::enable_if_t<std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>>> {
  using V = Vectorized<float>;
  using VT = Vectorized<T>;
  static constexpr int64_t L = V::size();
  static_assert(VT::size() == 2 * L, "a reduced-precision vector holds two float vectors");
  static void load(const T* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(VT::loadu(p));
  }
  static void load_n(const T* p, int64_t n, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(VT::loadu(p, n));
  }
  static void store(T* p, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static void store_n(T* p, int64_t n, const V& a, const V& b) {
    if (n > 0) at::vec::convert_from_float<T>(a, b).store(p, n);
  }
};

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](auto& a, auto& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto& a, auto& b) { return a + b; }, v);
}

// exp for arguments in [-inf, ~0]: the fast polynomial version for float (exp(-inf) = 0),
// the accurate one for double (gradcheck runs in double).
// On AVX-512: exp(x) = 2^n * 2^f with n = round(x log2 e), f in [-1/2, 1/2], 2^f by its degree-6
// Taylor polynomial (relative error < 1.3e-7) and the scaling by vscalefps, which also handles
// underflow (x = -inf is clamped to 2^-150 * p = 0). Fewer instructions than exp_u20, which
// matters because the forward and backward are compute-bound at ~1 exp per element.
template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 t = _mm512_max_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                   _mm512_set1_ps(-150.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.540353039338161e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333355814642844e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return Vectorized<float>(_mm512_scalef_ps(p, n));
#else
    return v.exp_u20();
#endif
  } else {
    return v.exp();
  }
}

// exp that keeps NaN (vexp maps it to a finite value): for inputs that may be NaN, such as the
// saved output of log_softmax on a NaN row.
template <typename acc_t>
inline Vectorized<acc_t> vexp_nan(const Vectorized<acc_t>& v) {
  return Vectorized<acc_t>::blendv(vexp(v), v, v.isnan());
}

template <typename acc_t>
inline acc_t nan_max(acc_t running, acc_t chunk) {
  if (running != running || chunk != chunk) return std::numeric_limits<acc_t>::quiet_NaN();
  return chunk > running ? chunk : running;
}

// Vector soft-capping: x' = s tanh(x/s), optionally with cap'(x) = 1 - tanh^2.
template <typename acc_t>
inline Vectorized<acc_t> vcap(const Vectorized<acc_t>& x, acc_t s, acc_t inv_s) {
  return (x * Vectorized<acc_t>(inv_s)).tanh() * Vectorized<acc_t>(s);
}

template <typename acc_t>
inline Vectorized<acc_t> vcap_d(const Vectorized<acc_t>& x, acc_t s, acc_t inv_s,
                                Vectorized<acc_t>& d) {
  using V = Vectorized<acc_t>;
  V th = (x * V(inv_s)).tanh();
  d = V(acc_t(1)) - th * th;
  return th * V(s);
}

// ------------------------------------------------------------------------------------------
// Row statistics of one row (inner == 1), one pass over memory.
//   M = max x', S = sum exp(x' - M), D = sum a_c (M - x'_c), A = sum a_c,
// with a_c = w_c (kDot == 1) or w_c ((1-eps) t_c + eps/C) (kDot == 2), w_c = 1 without weight.
// Rows are processed in chunks of K elements: the chunk maximum first (the chunk then sits in
// L1), then the sums relative to the running maximum; earlier sums are rescaled when the
// maximum grows. D is kept relative to r = M (or 0 while every logit seen is -inf), so masked
// logits contribute a_c * inf (inf, or NaN where a_c = 0) exactly as torch's -a_c log p_c does.
// M is NaN when the row maximum is not finite (the row's lse is then NaN).
// ------------------------------------------------------------------------------------------
template <typename acc_t>
struct RowStats {
  acc_t M, S, D, A;
};

template <typename T, bool kCap, int kDot, bool kW>
inline RowStats<typename AccOf<T>::type> row_stats(const T* x, const T* t,
                                                   const typename AccOf<T>::type* w, int64_t C,
                                                   const Cap<typename AccOf<T>::type>& cap,
                                                   typename AccOf<T>::type eps1,
                                                   typename AccOf<T>::type eps_c) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L;
  constexpr int64_t K = 2048;
  static_assert(K % (2 * L) == 0, "chunk is a whole number of vector pairs");
  constexpr bool kBuf = kCap || !std::is_same_v<T, acc_t>;
  alignas(64) acc_t buf[kBuf ? K : 1];
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  acc_t M = ninf, S = 0, D = 0, A = 0;
  for (int64_t c0 = 0; c0 < C; c0 += K) {
    const int64_t n = std::min(K, C - c0);
    const T* xc = x + c0;
    // pass A: chunk maximum (and x' into the chunk buffer)
    V mx_a(ninf), mx_b(ninf);
    int64_t j = 0;
    for (; j + 2 * L <= n; j += 2 * L) {
      V a, b;
      io::load(xc + j, a, b);
      if constexpr (kCap) {
        a = vcap(a, cap.s, cap.inv_s);
        b = vcap(b, cap.s, cap.inv_s);
      }
      if constexpr (kBuf) {
        a.store(buf + j);
        b.store(buf + j + L);
      }
      mx_a = at::vec::maximum(mx_a, a);
      mx_b = at::vec::maximum(mx_b, b);
    }
    const int64_t rem = n - j;
    if (rem > 0) {
      V a, b;
      io::load_n(xc + j, rem, a, b);
      if constexpr (kCap) {
        a = vcap(a, cap.s, cap.inv_s);
        b = vcap(b, cap.s, cap.inv_s);
      }
      a = V::set(V(ninf), a, std::min(rem, L));
      b = rem > L ? V::set(V(ninf), b, rem - L) : V(ninf);
      if constexpr (kBuf) {
        a.store(buf + j);
        b.store(buf + j + L);
      }
      mx_a = at::vec::maximum(mx_a, a);
      mx_b = at::vec::maximum(mx_b, b);
    }
    const acc_t mk = hmax(at::vec::maximum(mx_a, mx_b));
    const acc_t Mn = nan_max(M, mk);
    if (Mn != Mn || Mn == -ninf) {  // NaN or +inf: the row's lse is NaN, nothing else matters
      return {std::numeric_limits<acc_t>::quiet_NaN(), 0, 0, 0};
    }
    const acc_t r_old = M == ninf ? acc_t(0) : M;
    const acc_t r_new = Mn == ninf ? acc_t(0) : Mn;
    if (Mn != M) {
      S *= std::exp(M - Mn);  // M = -inf: S is 0 anyway
      if constexpr (kDot != 0) D += A * (r_new - r_old);
    }
    M = Mn;
    const bool do_exp = M != ninf;

    // pass B: sums relative to the running maximum, over the chunk (now in L1)
    const V vm(M), vr(r_new), v_eps1(eps1), v_epsc(eps_c);
    V s_a(0), s_b(0), d_a(0), d_b(0), as_a(0), as_b(0);
    auto accumulate = [&](const V& a, const V& b, const V& a_dot, const V& b_dot, const V& ca,
                          const V& cb) {
      if (do_exp) {
        s_a += vexp(a - vm);
        s_b += vexp(b - vm);
      }
      if constexpr (kDot != 0) {
        d_a = at::vec::fmadd(ca, vr - a_dot, d_a);
        d_b = at::vec::fmadd(cb, vr - b_dot, d_b);
        as_a += ca;
        as_b += cb;
      }
    };
    auto coefs = [&](int64_t off, int64_t cnt, V& ca, V& cb) {
      if constexpr (kDot != 0) {
        if constexpr (kW) {
          IO<acc_t>::load_n(w + c0 + off, cnt, ca, cb);
        } else {
          ca = cnt >= L ? V(acc_t(1)) : V::set(V(acc_t(0)), V(acc_t(1)), cnt);
          cb = cnt >= 2 * L ? V(acc_t(1))
                            : (cnt > L ? V::set(V(acc_t(0)), V(acc_t(1)), cnt - L) : V(acc_t(0)));
        }
        if constexpr (kDot == 2) {
          V ta, tb;
          io::load_n(t + c0 + off, cnt, ta, tb);
          ca = ca * at::vec::fmadd(ta, v_eps1, v_epsc);
          cb = cb * at::vec::fmadd(tb, v_eps1, v_epsc);
          if (cnt < 2 * L) {  // eps/C must not leak into unused lanes
            ca = V::set(V(acc_t(0)), ca, std::min(cnt, L));
            cb = cnt > L ? V::set(V(acc_t(0)), cb, cnt - L) : V(acc_t(0));
          }
        }
      } else {
        (void)off;
        (void)cnt;
        (void)ca;
        (void)cb;
      }
    };
    j = 0;
    for (; j + 2 * L <= n; j += 2 * L) {
      V a, b, ca, cb;
      // pass B computes from L1; fetch the next chunk meanwhile so memory never idles
      __builtin_prefetch(xc + n + j);
      __builtin_prefetch(xc + n + j + L);
      if constexpr (kBuf) {
        a = V::loadu(buf + j);
        b = V::loadu(buf + j + L);
      } else {
        io::load(xc + j, a, b);
      }
      coefs(j, 2 * L, ca, cb);
      accumulate(a, b, a, b, ca, cb);
    }
    if (rem > 0) {
      V a, b, ca, cb;
      if constexpr (kBuf) {
        a = V::loadu(buf + j);
        b = V::loadu(buf + j + L);
      } else {
        io::load_n(xc + j, rem, a, b);
        a = V::set(V(ninf), a, std::min(rem, L));
        b = rem > L ? V::set(V(ninf), b, rem - L) : V(ninf);
      }
      coefs(j, rem, ca, cb);
      // unused lanes: x' = -inf (exp -> 0); for the dot they are replaced by r (r - r = 0)
      const V a_dot = V::set(vr, a, std::min(rem, L));
      const V b_dot = rem > L ? V::set(vr, b, rem - L) : vr;
      accumulate(a, b, a_dot, b_dot, ca, cb);
    }
    S += hsum(s_a + s_b);
    if constexpr (kDot != 0) {
      D += hsum(d_a + d_b);
      A += hsum(as_a + as_b);
    }
  }
  if (M == ninf) M = std::numeric_limits<acc_t>::quiet_NaN();  // a row of -inf (or C == 0)
  return {M, S, D, A};
}

template <typename T>
inline typename AccOf<T>::type to_acc(T v) {
  return static_cast<typename AccOf<T>::type>(v);
}

inline int64_t load_target(const CeArgs& a, int64_t idx) {
  return a.target_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(a.target)[idx])
                        : static_cast<const int64_t*>(a.target)[idx];
}

template <typename acc_t>
inline acc_t grad_at(const CeArgs& a, int64_t o, int64_t i) {
  return static_cast<const acc_t*>(a.grad)[o * a.grad_stride_outer + i * a.grad_stride_inner];
}

// ------------------------------------------------------------------------------------------
// Cross-entropy forward
// ------------------------------------------------------------------------------------------

template <typename T, bool kCap, int kDot, bool kW>
Status ce_fwd_rows(const CeArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  const T* x = static_cast<const T*>(a.x);
  const T* prob = static_cast<const T*>(a.prob);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  const int64_t C = a.C;
  const Cap<acc_t> cap(a.softcap);
  const acc_t eps = static_cast<acc_t>(a.eps), eps_c = C > 0 ? static_cast<acc_t>(a.eps / C) : 0;
  const acc_t z = static_cast<acc_t>(a.z), w_sum = static_cast<acc_t>(a.w_sum);
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * C;
    if constexpr (kDot == 2) {
      const auto st = row_stats<T, kCap, 2, kW>(xr, prob + row * C, w, C, cap, 1 - eps, eps_c);
      const acc_t log_s = std::log(st.S);
      const double lse = lse_from_stats(st.M, log_s);
      a.lse_out[row] = lse;
      loss[row] = ce_prob_loss(st.M, log_s, st.A, st.D, z, lse);
    } else {
      const int64_t y = load_target(a, row);
      const bool valid = y != a.ignore_index;
      if (valid && (y < 0 || y >= C)) return {true, y};
      const auto st = row_stats<T, kCap, kDot, kW>(xr, nullptr, w, C, cap, 1 - eps, eps_c);
      const acc_t log_s = std::log(st.S);
      const double lse = lse_from_stats(st.M, log_s);
      a.lse_out[row] = lse;
      if (!valid) {
        loss[row] = 0;
        continue;
      }
      const acc_t x_y = cap.value(to_acc(xr[y]));
      const acc_t w_y = kW ? w[y] : acc_t(1);
      loss[row] = ce_index_loss(st.M, log_s, x_y, w_y, st.D, w_sum, eps, eps_c, z, lse);
    }
  }
  return {};
}

// inner > 1: a unit is a block of up to 2L consecutive inner positions of one outer index; the
// lanes of each vector are those positions and the loop runs over classes (stride inner). With
// a power-of-two stride the lines of one block all fall into the same cache sets, so a second
// pass over memory would miss: classes are processed in chunks copied (as acc_t, capped) into an
// L1 buffer, with an online maximum across chunks, exactly like row_stats. Per lane:
//   M, S = sum exp(x' - M), D = sum a_c (M - x'_c), A = sum a_c, and (kPick) the capped logit of
// the lane's target class, picked by a masked select (class indices compared as acc_t).
template <typename acc_t>
struct BlockStats {
  Vectorized<acc_t> M[2], S[2], D[2], A[2], XY[2];
};

template <typename T, bool kCap, int kDot, bool kW, bool kPick>
inline void block_stats(const T* xb, const T* tb, const typename AccOf<T>::type* w, int64_t C,
                        int64_t inner, int64_t n, const Cap<typename AccOf<T>::type>& cap,
                        typename AccOf<T>::type eps1, typename AccOf<T>::type eps_c,
                        const Vectorized<typename AccOf<T>::type>* ylane,
                        BlockStats<typename AccOf<T>::type>& st) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L, B = 2 * L;
  constexpr int64_t kElems = 4096;
  constexpr int64_t KC = kElems / B;  // classes per chunk
  alignas(64) acc_t buf[kElems];
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const V zero(acc_t(0)), v_eps1(eps1), v_epsc(eps_c);
  for (int h = 0; h < 2; ++h) {
    st.M[h] = V(ninf);
    st.S[h] = st.D[h] = st.A[h] = st.XY[h] = zero;
  }
  V ref[2] = {zero, zero};
  for (int64_t c0 = 0; c0 < C; c0 += KC) {
    const int64_t kc = std::min(KC, C - c0);
    V cm[2] = {V(ninf), V(ninf)};
    for (int64_t k = 0; k < kc; ++k) {  // pass A: strided loads into the buffer, chunk maximum
      V v[2];
      const T* src = xb + (c0 + k) * inner;
      // the next blocks of this class: one stream per class is more than the hardware
      // prefetchers follow when the classes are many strided streams
      __builtin_prefetch(src + 4 * B);
      __builtin_prefetch(src + 4 * B + L);
      if (n == B) {
        io::load(src, v[0], v[1]);
      } else {
        io::load_n(src, n, v[0], v[1]);
      }
      for (int h = 0; h < 2; ++h) {
        if constexpr (kCap) v[h] = vcap(v[h], cap.s, cap.inv_s);
        v[h].store(buf + k * B + h * L);
        cm[h] = at::vec::maximum(cm[h], v[h]);
      }
    }
    for (int h = 0; h < 2; ++h) {  // new running maximum and reference (0 while not finite)
      const V mn = at::vec::maximum(st.M[h], cm[h]);
      const V rn = V::blendv(zero, mn, (mn - mn) == zero);
      const V ro = V::blendv(rn, st.M[h], (st.M[h] - st.M[h]) == zero);
      st.S[h] = st.S[h] * vexp(ro - rn);
      if constexpr (kDot != 0) st.D[h] = at::vec::fmadd(st.A[h], rn - ro, st.D[h]);
      st.M[h] = mn;
      ref[h] = rn;
    }
    for (int64_t k = 0; k < kc; ++k) {  // pass B: from the buffer
      const acc_t c = static_cast<acc_t>(c0 + k);
      V t[2];
      if constexpr (kDot == 2) {
        const T* src = tb + (c0 + k) * inner;
        if (n == B) {
          io::load(src, t[0], t[1]);
        } else {
          io::load_n(src, n, t[0], t[1]);
        }
      }
      const V wc(kW ? w[c0 + k] : acc_t(1));
      for (int h = 0; h < 2; ++h) {
        const V v = V::loadu(buf + k * B + h * L);
        st.S[h] += vexp(v - ref[h]);
        if constexpr (kPick) st.XY[h] = V::blendv(st.XY[h], v, ylane[h] == V(c));
        if constexpr (kDot != 0) {
          V coef = wc;
          if constexpr (kDot == 2) coef = coef * at::vec::fmadd(t[h], v_eps1, v_epsc);
          st.D[h] = at::vec::fmadd(coef, ref[h] - v, st.D[h]);
          st.A[h] += coef;
        }
      }
    }
  }
  // lanes whose maximum is not finite: M = NaN (their lse is NaN)
  const V nanv(std::numeric_limits<acc_t>::quiet_NaN());
  for (int h = 0; h < 2; ++h) st.M[h] = V::blendv(nanv, st.M[h], (st.M[h] - st.M[h]) == zero);
}

template <typename T, bool kCap, int kDot, bool kW>
Status ce_fwd_blocks(const CeArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  using accio = IO<acc_t>;
  constexpr int64_t L = io::L, B = 2 * L;
  const T* x = static_cast<const T*>(a.x);
  const T* prob = static_cast<const T*>(a.prob);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  const int64_t C = a.C, inner = a.inner, nblk = (inner + B - 1) / B;
  const Cap<acc_t> cap(a.softcap);
  const acc_t eps = static_cast<acc_t>(a.eps), eps_c = C > 0 ? static_cast<acc_t>(a.eps / C) : 0;
  const acc_t z = static_cast<acc_t>(a.z), w_sum = static_cast<acc_t>(a.w_sum);
  const V zero(acc_t(0));
  // class indices compared as acc_t are exact below 2^24 for float; beyond, gather the logit
  const bool vec_pick = std::is_same_v<acc_t, double> || C <= (int64_t(1) << 24);
  alignas(64) acc_t Ms[B], Ls[B], YF[B], WY[B], XY[B];
  BlockStats<acc_t> st;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t o = u / nblk, i0 = (u % nblk) * B, n = std::min(B, inner - i0);
    const int64_t base = o * C * inner + i0, pos0 = o * inner + i0;
    if constexpr (kDot != 2) {  // targets: range check, lane class (-1 if ignored), w_y
      for (int64_t j = 0; j < B; ++j) {
        YF[j] = -1;
        WY[j] = 0;
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t y = load_target(a, pos0 + j);
        if (y == a.ignore_index) continue;
        if (y < 0 || y >= C) return {true, y};
        YF[j] = static_cast<acc_t>(y);
        WY[j] = kW ? w[y] : acc_t(1);
        if (!vec_pick) XY[j] = cap.value(to_acc(x[base + y * inner + j]));
      }
    }
    const V ylane[2] = {V::loadu(YF), V::loadu(YF + L)};
    if (kDot != 2 && vec_pick) {
      block_stats<T, kCap, kDot, kW, true>(x + base, nullptr, w, C, inner, n, cap, 1 - eps,
                                           eps_c, ylane, st);
    } else {
      block_stats<T, kCap, kDot, kW, false>(x + base, kDot == 2 ? prob + base : nullptr, w, C,
                                            inner, n, cap, 1 - eps, eps_c, ylane, st);
      if (kDot != 2) {
        st.XY[0] = V::loadu(XY);
        st.XY[1] = V::loadu(XY + L);
      }
    }
    // loss per lane, in vectors (formulas in row_math.h)
    V lo[2];
    for (int h = 0; h < 2; ++h) {
      const V ls = st.S[h].log();
      V l;
      if constexpr (kDot == 2) {
        l = st.A[h] * ls + st.D[h];
      } else {
        l = V(1 - eps) * V::loadu(WY + h * L) * ((st.M[h] - st.XY[h]) + ls);
        if constexpr (kDot == 1) l = l + V(eps_c) * at::vec::fmadd(V(w_sum), ls, st.D[h]);
      }
      if (z > 0) {
        const V lse = st.M[h] + ls;
        l = at::vec::fmadd(V(z) * lse, lse, l);
      }
      l = l + (st.M[h] - st.M[h]);  // NaN lanes (lse NaN) stay NaN whatever the weights
      if constexpr (kDot != 2) l = V::blendv(zero, l, ylane[h] >= zero);  // ignored: exactly 0
      lo[h] = l;
      st.M[h].store(Ms + h * L);
      ls.store(Ls + h * L);
    }
    accio::store_n(loss + pos0, n, lo[0], lo[1]);
    for (int64_t j = 0; j < n; ++j) a.lse_out[pos0 + j] = lse_from_stats(Ms[j], Ls[j]);
  }
  return {};
}

// ------------------------------------------------------------------------------------------
// Cross-entropy backward: grad_c = g [(A + 2 z lse) p_c - b_c] cap'(x_c), written once.
// ------------------------------------------------------------------------------------------

template <typename T, bool kCap, int kDot, bool kW>
Status ce_bwd_rows(const CeArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const T* prob = static_cast<const T*>(a.prob);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const int64_t C = a.C;
  const Cap<acc_t> cap(a.softcap);
  const acc_t eps = static_cast<acc_t>(a.eps), eps_c = C > 0 ? static_cast<acc_t>(a.eps / C) : 0;
  const acc_t z = static_cast<acc_t>(a.z), w_sum = static_cast<acc_t>(a.w_sum);
  const V v_eps1(1 - eps), v_epsc(eps_c);

  // Validate the whole range before writing anything: an in-place backward must not leave a
  // partly overwritten input behind when it raises.
  if constexpr (kDot != 2) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = load_target(a, row);
      if (y != a.ignore_index && (y < 0 || y >= C)) return {true, y};
    }
  }
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * C;
    T* gr = out + row * C;
    const double lse = a.lse_in[row];
    int64_t y = 0;
    bool valid = true;
    if constexpr (kDot != 2) {
      y = load_target(a, row);
      valid = y != a.ignore_index;
    }
    if (lse != lse || !valid) {  // NaN row (as torch), or an ignored row: zero gradient
      const acc_t fill = lse != lse ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
      const V vf(fill);
      int64_t c = 0;
      for (; c + 2 * L <= C; c += 2 * L) io::store(gr + c, vf, vf);
      io::store_n(gr + c, C - c, vf, vf);
      continue;
    }
    const acc_t g = grad_at<acc_t>(a, row, 0);
    acc_t hi, lo;
    split_lse(lse, hi, lo);
    acc_t A;
    const T* tr = kDot == 2 ? prob + row * C : nullptr;
    if constexpr (kDot == 2) {  // A = sum_c a_c, one pass over the row's targets
      V sa(0), sb(0);
      int64_t c = 0;
      for (; c < C; c += 2 * L) {
        const int64_t cnt = std::min(2 * L, C - c);
        V ta, tb, wa(acc_t(1)), wb(acc_t(1));
        io::load_n(tr + c, cnt, ta, tb);
        if constexpr (kW) IO<acc_t>::load_n(w + c, cnt, wa, wb);
        V ca = wa * at::vec::fmadd(ta, v_eps1, v_epsc);
        V cb = wb * at::vec::fmadd(tb, v_eps1, v_epsc);
        if (cnt < 2 * L) {
          ca = V::set(V(acc_t(0)), ca, std::min(cnt, L));
          cb = cnt > L ? V::set(V(acc_t(0)), cb, cnt - L) : V(acc_t(0));
        }
        sa += ca;
        sb += cb;
      }
      A = hsum(sa + sb);
    } else {
      A = ce_index_a(kW ? w[y] : acc_t(1), w_sum, eps, eps_c);
    }
    const acc_t k = ce_prob_scale(g, A, z, lse);
    const acc_t x_y_raw = kDot == 2 ? acc_t(0) : to_acc(xr[y]);  // before an in-place write
    const V vk(k), vhi(hi), vlo(lo), vg(g), vbs(g * eps_c);
    auto grad_of = [&](V xv, int64_t c, int64_t cnt, V& result_a, V& result_b, V xb) {
      V da(acc_t(1)), db(acc_t(1));
      if constexpr (kCap) {
        xv = vcap_d(xv, cap.s, cap.inv_s, da);
        xb = vcap_d(xb, cap.s, cap.inv_s, db);
      }
      V ga = vk * vexp((xv - vhi) - vlo);
      V gb = vk * vexp((xb - vhi) - vlo);
      if constexpr (kDot == 2) {
        V ta, tb, wa(acc_t(1)), wb(acc_t(1));
        io::load_n(tr + c, cnt, ta, tb);
        if constexpr (kW) IO<acc_t>::load_n(w + c, cnt, wa, wb);
        ga = ga - vg * wa * at::vec::fmadd(ta, v_eps1, v_epsc);
        gb = gb - vg * wb * at::vec::fmadd(tb, v_eps1, v_epsc);
      } else if constexpr (kDot == 1) {
        if constexpr (kW) {
          V wa, wb;
          IO<acc_t>::load_n(w + c, cnt, wa, wb);
          ga = ga - vbs * wa;
          gb = gb - vbs * wb;
        } else {
          ga = ga - vbs;
          gb = gb - vbs;
        }
      }
      if constexpr (kCap) {
        ga = ga * da;
        gb = gb * db;
      }
      result_a = ga;
      result_b = gb;
    };
    int64_t c = 0;
    for (; c + 2 * L <= C; c += 2 * L) {
      V xa, xb, ga, gb;
      io::load(xr + c, xa, xb);
      grad_of(xa, c, 2 * L, ga, gb, xb);
      io::store(gr + c, ga, gb);
    }
    if (c < C) {
      V xa, xb, ga, gb;
      io::load_n(xr + c, C - c, xa, xb);
      grad_of(xa, c, C - c, ga, gb, xb);
      io::store_n(gr + c, C - c, ga, gb);
    }
    if constexpr (kDot != 2) {
      // the true class, formed in acc_t and rounded once: g [k' p_y - b_y - (1-eps) w_y] cap'
      acc_t d_y;
      const acc_t xs_y = cap.value_and_derivative(x_y_raw, d_y);
      const acc_t w_y = kW ? w[y] : acc_t(1);
      const acc_t p_y = std::exp((xs_y - hi) - lo);
      const acc_t b_y = (kDot == 1 ? g * eps_c * w_y : acc_t(0)) + g * (1 - eps) * w_y;
      gr[y] = static_cast<T>((k * p_y - b_y) * d_y);
    }
  }
  return {};
}

template <typename T, bool kCap, int kDot, bool kW>
Status ce_bwd_blocks(const CeArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L, B = 2 * L;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const T* prob = static_cast<const T*>(a.prob);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const int64_t C = a.C, inner = a.inner, nblk = (inner + B - 1) / B;
  const Cap<acc_t> cap(a.softcap);
  const acc_t eps = static_cast<acc_t>(a.eps), eps_c = C > 0 ? static_cast<acc_t>(a.eps / C) : 0;
  const acc_t z = static_cast<acc_t>(a.z), w_sum = static_cast<acc_t>(a.w_sum);
  const V v_eps1(1 - eps), v_epsc(eps_c);
  if constexpr (kDot != 2) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t o = u / nblk, i0 = (u % nblk) * B, n = std::min(B, inner - i0);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t y = load_target(a, o * inner + i0 + j);
        if (y != a.ignore_index && (y < 0 || y >= C)) return {true, y};
      }
    }
  }
  // The true class enters as a masked term inside the class loop (lanes whose target is c),
  // so the whole gradient is formed in acc_t and rounded once. Class indices are compared as
  // acc_t, exact below 2^24 for float; beyond that a scalar fix-up after the loop is used.
  const bool vec_true = std::is_same_v<acc_t, double> || C <= (int64_t(1) << 24);
  alignas(64) acc_t K[B], HI[B], LO[B], G[B], BS[B], NANS[B], YF[B], TC[B];
  double LSE[B];
  int64_t Y[B];
  acc_t XY[B];
  for (int64_t u = begin; u < end; ++u) {
    const int64_t o = u / nblk, i0 = (u % nblk) * B, n = std::min(B, inner - i0);
    const int64_t base = o * C * inner + i0;
    bool any_nan = false;
    for (int64_t j = 0; j < B; ++j) {
      K[j] = HI[j] = LO[j] = G[j] = BS[j] = NANS[j] = TC[j] = 0;
      YF[j] = -1;
      Y[j] = -1;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = o * inner + i0 + j;
      const double lse = a.lse_in[pos];
      if (lse != lse) {
        NANS[j] = std::numeric_limits<acc_t>::quiet_NaN();
        any_nan = true;
        continue;
      }
      split_lse(lse, HI[j], LO[j]);
      LSE[j] = lse;
      const acc_t g = grad_at<acc_t>(a, o, i0 + j);
      if constexpr (kDot == 2) {
        G[j] = g;  // k needs A = sum_c a_c, computed below
      } else {
        const int64_t y = load_target(a, pos);
        if (y == a.ignore_index) continue;  // k = b = 0: a zero gradient
        Y[j] = y;
        YF[j] = static_cast<acc_t>(y);
        if (!vec_true) XY[j] = to_acc(x[base + y * inner + j]);
        const acc_t w_y = kW ? w[y] : acc_t(1);
        K[j] = ce_prob_scale(g, ce_index_a(w_y, w_sum, eps, eps_c), z, lse);
        BS[j] = g * eps_c;
        G[j] = g;
        TC[j] = g * (1 - eps) * w_y;
      }
    }
    auto load = [&](const T* p, V& va, V& vb) {
      if (n == B) {
        io::load(p, va, vb);
      } else {
        io::load_n(p, n, va, vb);
      }
    };
    if constexpr (kDot == 2) {
      V sa(0), sb(0);
      for (int64_t c = 0; c < C; ++c) {
        V ta, tb;
        load(prob + base + c * inner, ta, tb);
        const V wc(kW ? w[c] : acc_t(1));
        sa += wc * at::vec::fmadd(ta, v_eps1, v_epsc);
        sb += wc * at::vec::fmadd(tb, v_eps1, v_epsc);
      }
      alignas(64) acc_t As[B];
      sa.store(As);
      sb.store(As + L);
      for (int64_t j = 0; j < n; ++j) {
        if (NANS[j] == NANS[j]) {
          K[j] = ce_prob_scale(G[j], As[j], z, LSE[j]);
        }
      }
    }
    const V ka = V::loadu(K), kb = V::loadu(K + L), ha = V::loadu(HI), hb = V::loadu(HI + L);
    const V la = V::loadu(LO), lb = V::loadu(LO + L), bsa = V::loadu(BS), bsb = V::loadu(BS + L);
    const V ga_ = V::loadu(G), gb_ = V::loadu(G + L), na = V::loadu(NANS), nb = V::loadu(NANS + L);
    const V ya = V::loadu(YF), yb = V::loadu(YF + L), tca = V::loadu(TC), tcb = V::loadu(TC + L);
    const V zero(acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      V xa, xb, da(acc_t(1)), db(acc_t(1));
      const T* src = x + base + c * inner;
      T* dst = out + base + c * inner;
      __builtin_prefetch(src + 4 * B);  // see block_stats
      __builtin_prefetch(src + 4 * B + L);
      __builtin_prefetch(dst + 4 * B, 1);
      __builtin_prefetch(dst + 4 * B + L, 1);
      load(src, xa, xb);
      if constexpr (kCap) {
        xa = vcap_d(xa, cap.s, cap.inv_s, da);
        xb = vcap_d(xb, cap.s, cap.inv_s, db);
      }
      V gra = ka * vexp((xa - ha) - la);
      V grb = kb * vexp((xb - hb) - lb);
      if constexpr (kDot == 2) {
        V ta, tb;
        load(prob + base + c * inner, ta, tb);
        const V wc(kW ? w[c] : acc_t(1));
        gra = gra - ga_ * wc * at::vec::fmadd(ta, v_eps1, v_epsc);
        grb = grb - gb_ * wc * at::vec::fmadd(tb, v_eps1, v_epsc);
      } else if constexpr (kDot == 1) {
        const V wc(kW ? w[c] : acc_t(1));
        gra = gra - bsa * wc;
        grb = grb - bsb * wc;
      }
      if constexpr (kDot != 2) {
        if (vec_true) {
          const V vc(static_cast<acc_t>(c));
          gra = gra - V::blendv(zero, tca, ya == vc);
          grb = grb - V::blendv(zero, tcb, yb == vc);
        }
      }
      if constexpr (kCap) {
        gra = gra * da;
        grb = grb * db;
      }
      if (any_nan) {  // NaN lanes: NaN + anything = NaN, 0 + v = v
        gra = gra + na;
        grb = grb + nb;
      }
      if (n == B) {
        io::store(dst, gra, grb);
      } else {
        io::store_n(dst, n, gra, grb);
      }
    }
    if constexpr (kDot != 2) {
      for (int64_t j = 0; j < n && !vec_true; ++j) {
        if (Y[j] < 0) continue;
        const int64_t y = Y[j];
        acc_t d_y;
        const acc_t xs_y = cap.value_and_derivative(XY[j], d_y);
        const acc_t w_y = kW ? w[y] : acc_t(1);
        const acc_t p_y = std::exp((xs_y - HI[j]) - LO[j]);
        const acc_t b_y = (kDot == 1 ? BS[j] * w_y : acc_t(0)) + G[j] * (1 - eps) * w_y;
        out[base + y * inner + j] = static_cast<T>((K[j] * p_y - b_y) * d_y);
      }
    }
  }
  return {};
}

// Runtime options -> template instantiation.
template <typename T, template <typename, bool, int, bool> class Kernel>
struct CeDispatch {
  template <int kDot>
  static Status with_dot(const CeArgs& a, bool cap, bool w, int64_t begin, int64_t end) {
    if (cap) {
      return w ? Kernel<T, true, kDot, true>::run(a, begin, end)
               : Kernel<T, true, kDot, false>::run(a, begin, end);
    }
    return w ? Kernel<T, false, kDot, true>::run(a, begin, end)
             : Kernel<T, false, kDot, false>::run(a, begin, end);
  }
  static Status run(const CeArgs& a, bool prob, int64_t begin, int64_t end) {
    const bool cap = a.softcap > 0, w = a.weight != nullptr;
    if (prob) return with_dot<2>(a, cap, w, begin, end);
    if (a.eps > 0) return with_dot<1>(a, cap, w, begin, end);
    return with_dot<0>(a, cap, w, begin, end);
  }
};

template <typename T, bool kCap, int kDot, bool kW>
struct FwdKernel {
  static Status run(const CeArgs& a, int64_t begin, int64_t end) {
    return a.inner == 1 ? ce_fwd_rows<T, kCap, kDot, kW>(a, begin, end)
                        : ce_fwd_blocks<T, kCap, kDot, kW>(a, begin, end);
  }
};

template <typename T, bool kCap, int kDot, bool kW>
struct BwdKernel {
  static Status run(const CeArgs& a, int64_t begin, int64_t end) {
    return a.inner == 1 ? ce_bwd_rows<T, kCap, kDot, kW>(a, begin, end)
                        : ce_bwd_blocks<T, kCap, kDot, kW>(a, begin, end);
  }
};

template <template <typename, bool, int, bool> class Kernel>
Status ce_dispatch_dtype(const CeArgs& a, bool prob, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case Dtype::f64:
      return CeDispatch<double, Kernel>::run(a, prob, begin, end);
    case Dtype::f32:
      return CeDispatch<float, Kernel>::run(a, prob, begin, end);
    case Dtype::bf16:
      return CeDispatch<c10::BFloat16, Kernel>::run(a, prob, begin, end);
    case Dtype::f16:
      return CeDispatch<c10::Half, Kernel>::run(a, prob, begin, end);
  }
  return {};
}

Status ce_fwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<FwdKernel>(a, false, b, e);
}
Status ce_bwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<BwdKernel>(a, false, b, e);
}
Status ce_prob_fwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<FwdKernel>(a, true, b, e);
}
Status ce_prob_bwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<BwdKernel>(a, true, b, e);
}

// ------------------------------------------------------------------------------------------
// softmax / log_softmax
// ------------------------------------------------------------------------------------------

template <typename T>
void softmax_fwd_t(const SoftmaxArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L, B = 2 * L;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t C = a.C, inner = a.inner;
  const Cap<acc_t> nocap(0.0);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // vm - vm is 0 for a finite row maximum and NaN otherwise: NaN rows stay NaN through the fast
  // exp, which does not propagate NaN.
  auto finish = [&](const V& v, const V& vm, const V& vls) {
    const V lp = (v - vm) - vls;
    return a.log ? lp : vexp(lp) + (vm - vm);
  };
  if (inner == 1) {
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * C;
      T* yr = out + row * C;
      const auto st = row_stats<T, false, 0, false>(xr, nullptr, nullptr, C, nocap, 1, 0);
      const bool ok = finite_max(st.M);
      const V vm(ok ? st.M : nan), vls(std::log(st.S));
      int64_t c = 0;
      for (; c + B <= C; c += B) {
        V xa, xb;
        io::load(xr + c, xa, xb);
        io::store(yr + c, finish(xa, vm, vls), finish(xb, vm, vls));
      }
      if (c < C) {
        V xa, xb;
        io::load_n(xr + c, C - c, xa, xb);
        io::store_n(yr + c, C - c, finish(xa, vm, vls), finish(xb, vm, vls));
      }
    }
    return;
  }
  const int64_t nblk = (inner + B - 1) / B;
  BlockStats<acc_t> st;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t o = u / nblk, i0 = (u % nblk) * B, n = std::min(B, inner - i0);
    const int64_t base = o * C * inner + i0;
    block_stats<T, false, 0, false, false>(x + base, nullptr, nullptr, C, inner, n, nocap, 1, 0,
                                           nullptr, st);
    const V lsa = st.S[0].log(), lsb = st.S[1].log();
    for (int64_t c = 0; c < C; ++c) {
      V va, vb;
      const T* src = x + base + c * inner;
      T* dst = out + base + c * inner;
      __builtin_prefetch(src + 4 * B);
      __builtin_prefetch(src + 4 * B + L);
      if (n == B) {
        io::load(src, va, vb);
        io::store(dst, finish(va, st.M[0], lsa), finish(vb, st.M[1], lsb));
      } else {
        io::load_n(src, n, va, vb);
        io::store_n(dst, n, finish(va, st.M[0], lsa), finish(vb, st.M[1], lsb));
      }
    }
  }
}

// softmax: gx = y (g - <g, y>);  log_softmax: gx = g - exp(y) sum(g).
template <typename T>
void softmax_bwd_t(const SoftmaxArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L, B = 2 * L;
  const T* y = static_cast<const T*>(a.y);
  const T* g = static_cast<const T*>(a.grad);
  T* out = static_cast<T*>(a.out);
  const int64_t C = a.C, inner = a.inner;
  auto reduce_term = [&](const V& ya, const V& ga) { return a.log ? ga : ga * ya; };
  auto finish = [&](const V& ya, const V& ga, const V& s) {
    return a.log ? ga - vexp_nan(ya) * s : ya * (ga - s);
  };
  if (inner == 1) {
    for (int64_t row = begin; row < end; ++row) {
      const T* yr = y + row * C;
      const T* gr = g + row * C;
      T* dr = out + row * C;
      V sa(0), sb(0);
      int64_t c = 0;
      for (; c + B <= C; c += B) {
        V ya, yb, ga, gb;
        io::load(yr + c, ya, yb);
        io::load(gr + c, ga, gb);
        sa += reduce_term(ya, ga);
        sb += reduce_term(yb, gb);
      }
      if (c < C) {
        V ya, yb, ga, gb;
        io::load_n(yr + c, C - c, ya, yb);
        io::load_n(gr + c, C - c, ga, gb);
        sa += reduce_term(ya, ga);
        sb += reduce_term(yb, gb);
      }
      const V s(hsum(sa + sb));
      for (c = 0; c + B <= C; c += B) {
        V ya, yb, ga, gb;
        io::load(yr + c, ya, yb);
        io::load(gr + c, ga, gb);
        io::store(dr + c, finish(ya, ga, s), finish(yb, gb, s));
      }
      if (c < C) {
        V ya, yb, ga, gb;
        io::load_n(yr + c, C - c, ya, yb);
        io::load_n(gr + c, C - c, ga, gb);
        io::store_n(dr + c, C - c, finish(ya, ga, s), finish(yb, gb, s));
      }
    }
    return;
  }
  const int64_t nblk = (inner + B - 1) / B;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t o = u / nblk, i0 = (u % nblk) * B, n = std::min(B, inner - i0);
    const int64_t base = o * C * inner + i0;
    auto load = [&](const T* p, V& va, V& vb) {
      if (n == B) {
        io::load(p, va, vb);
      } else {
        io::load_n(p, n, va, vb);
      }
    };
    V sa(0), sb(0);
    for (int64_t c = 0; c < C; ++c) {
      V ya, yb, ga, gb;
      load(y + base + c * inner, ya, yb);
      load(g + base + c * inner, ga, gb);
      sa += reduce_term(ya, ga);
      sb += reduce_term(yb, gb);
    }
    for (int64_t c = 0; c < C; ++c) {
      V ya, yb, ga, gb;
      load(y + base + c * inner, ya, yb);
      load(g + base + c * inner, ga, gb);
      T* dst = out + base + c * inner;
      if (n == B) {
        io::store(dst, finish(ya, ga, sa), finish(yb, gb, sb));
      } else {
        io::store_n(dst, n, finish(ya, ga, sa), finish(yb, gb, sb));
      }
    }
  }
}

template <template <typename> class Fn>
void softmax_dispatch(const SoftmaxArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case Dtype::f64:
      return Fn<double>::run(a, begin, end);
    case Dtype::f32:
      return Fn<float>::run(a, begin, end);
    case Dtype::bf16:
      return Fn<c10::BFloat16>::run(a, begin, end);
    case Dtype::f16:
      return Fn<c10::Half>::run(a, begin, end);
  }
}

template <typename T>
struct SoftmaxFwd {
  static void run(const SoftmaxArgs& a, int64_t b, int64_t e) { softmax_fwd_t<T>(a, b, e); }
};
template <typename T>
struct SoftmaxBwd {
  static void run(const SoftmaxArgs& a, int64_t b, int64_t e) { softmax_bwd_t<T>(a, b, e); }
};

void softmax_fwd(const SoftmaxArgs& a, int64_t b, int64_t e) {
  softmax_dispatch<SoftmaxFwd>(a, b, e);
}
void softmax_bwd(const SoftmaxArgs& a, int64_t b, int64_t e) {
  softmax_dispatch<SoftmaxBwd>(a, b, e);
}

// ------------------------------------------------------------------------------------------
// Sigmoid cross-entropy (elementwise, over TensorIterator loops)
// ------------------------------------------------------------------------------------------

// log(1 + exp(-x)) = log1p(exp(-|x|)) + max(-x, 0)
template <typename acc_t>
inline Vectorized<acc_t> vsoftplus_neg(const Vectorized<acc_t>& x) {
  using V = Vectorized<acc_t>;
  return (V(acc_t(0)) - x.abs()).exp().log1p() + at::vec::maximum(V(acc_t(0)) - x, V(acc_t(0)));
}

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
    const V one(acc_t(1)), zero(acc_t(0));
    for (; i + B <= n; i += B) {
      V r[2];
      V xv[2], yv[2], wv[2] = {one, one}, pwv[2] = {one, one}, gv[2];
      io::load(src[ix] + (step[ix] ? i : 0), xv[0], xv[1]);
      io::load(src[ix + 1] + (step[ix + 1] ? i : 0), yv[0], yv[1]);
      if (iw >= 0) io::load(src[iw] + (step[iw] ? i : 0), wv[0], wv[1]);
      if (ipw >= 0) io::load(src[ipw] + (step[ipw] ? i : 0), pwv[0], pwv[1]);
      if constexpr (kGrad) io::load(src[1] + (step[1] ? i : 0), gv[0], gv[1]);
      for (int h = 0; h < 2; ++h) {
        if constexpr (kGrad) {
          const V s = one / (one + (zero - xv[h]).exp());
          const V pwy = pwv[h] * yv[h];
          r[h] = gv[h] * wv[h] * ((pwy + one - yv[h]) * s - pwy);
        } else {
          r[h] = wv[h] * ((one - yv[h]) * xv[h] +
                          (one + (pwv[h] - one) * yv[h]) * vsoftplus_neg(xv[h]));
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

int64_t block_lanes(Dtype dtype) {
  return dtype == Dtype::f64 ? 2 * Vectorized<double>::size() : 2 * Vectorized<float>::size();
}

}  // namespace SCE_ISA_NS

const KernelTable& SCE_ISA_TABLE() {
  static const KernelTable table = {
      SCE_ISA_NAME,
      &SCE_ISA_NS::block_lanes,
      &SCE_ISA_NS::ce_fwd,
      &SCE_ISA_NS::ce_bwd,
      &SCE_ISA_NS::ce_prob_fwd,
      &SCE_ISA_NS::ce_prob_bwd,
      &SCE_ISA_NS::softmax_fwd,
      &SCE_ISA_NS::softmax_bwd,
      &SCE_ISA_NS::sigmoid_fwd,
      &SCE_ISA_NS::sigmoid_bwd,
  };
  return table;
}

}  // namespace softmax_ce::cpu

// Row statistics (max, sum of exponentials, the target-weighted sums) of one row in one
// pass, and the per-position reads (target, upstream gradient) every cross-entropy kernel uses.
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

// ------------------------------------------------------------------------------------------
// Row statistics of one row (inner == 1), one pass over memory.
//   M = max x', S = sum exp(x' - M), D = sum a_c (M - x'_c), A = sum a_c,
// with a_c = w_c (Dot::kSmoothing) or w_c ((1-eps) t_c + eps/C) (Dot::kProbabilities), w_c = 1
// without weight.
// Rows are processed in chunks of K elements: the chunk maximum first (the chunk then sits in
// L1), then the sums relative to the running maximum; earlier sums are rescaled when the
// maximum grows. D is kept relative to r = M (or 0 while every logit seen is -inf), so masked
// logits contribute a_c * inf (inf, or NaN where a_c = 0) exactly as torch's -a_c log p_c does.
// M is NaN when the row maximum is not finite (the row's lse is then NaN).
// ------------------------------------------------------------------------------------------
// Which target-weighted sum D = sum_c a_c (M - x'_c) a cross-entropy kernel forms: none (plain
// class-index targets), a_c = w_c (label smoothing over class indices), or
// a_c = w_c ((1-eps) t_c + eps/C) (probability targets).
enum class Dot { kNone, kSmoothing, kProbabilities };

template <typename acc_t>
struct RowStats {
  acc_t M, S, D, A;
};

// kRowChunk: the chunk length of row_stats.
constexpr int64_t kRowChunk = 2048;

// kKeep (the fused forward+backward): the exponentials are kept, keep[c] = exp(x'_c - ref[k])
// for c in chunk k = c / kRowChunk, ref[k] the running maximum after that chunk (-inf while every
// logit so far is -inf; then keep is 0 there), so that the gradient needs no second exponential:
// p_c = keep[c] exp(ref[k] - lse). Nothing is kept for a row whose maximum is not finite.
template <typename T, bool kCap, Dot kDot, bool kW, bool kKeep = false>
inline RowStats<typename AccOf<T>::type> row_stats(const T* x, const T* t,
                                                   const typename AccOf<T>::type* w, int64_t C,
                                                   const Cap<typename AccOf<T>::type>& cap,
                                                   typename AccOf<T>::type eps1,
                                                   typename AccOf<T>::type eps_c,
                                                   typename AccOf<T>::type* keep = nullptr,
                                                   typename AccOf<T>::type* ref = nullptr) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L;
  constexpr int64_t K = kRowChunk;
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
      if constexpr (kDot != Dot::kNone) D += A * (r_new - r_old);
    }
    M = Mn;
    const bool do_exp = M != ninf;
    if constexpr (kKeep) ref[c0 / K] = M;
    acc_t* kc = kKeep ? keep + c0 : nullptr;

    // pass B: sums relative to the running maximum, over the chunk (now in L1)
    const V vm(M), vr(r_new), v_eps1(eps1), v_epsc(eps_c);
    V s_a(0), s_b(0), d_a(0), d_b(0), as_a(0), as_b(0);
    auto accumulate = [&](const V& a, const V& b, const V& a_dot, const V& b_dot, const V& ca,
                          const V& cb, int64_t off, int64_t cnt) {
      if (do_exp) {
        const V ea = vexp(a - vm), eb = vexp(b - vm);
        s_a += ea;
        s_b += eb;
        if constexpr (kKeep) {
          if (cnt == 2 * L) {
            IO<acc_t>::store(kc + off, ea, eb);
          } else {
            IO<acc_t>::store_n(kc + off, cnt, ea, eb);
          }
        }
      } else if constexpr (kKeep) {
        IO<acc_t>::store_n(kc + off, cnt, V(acc_t(0)), V(acc_t(0)));
      }
      if constexpr (kDot != Dot::kNone) {
        d_a = at::vec::fmadd(ca, vr - a_dot, d_a);
        d_b = at::vec::fmadd(cb, vr - b_dot, d_b);
        as_a += ca;
        as_b += cb;
      }
    };
    auto coefs = [&](int64_t off, int64_t cnt, V& ca, V& cb) {
      if constexpr (kDot != Dot::kNone) {
        if constexpr (kW) {
          IO<acc_t>::load_n(w + c0 + off, cnt, ca, cb);
        } else {
          ca = cnt >= L ? V(acc_t(1)) : V::set(V(acc_t(0)), V(acc_t(1)), cnt);
          cb = cnt >= 2 * L ? V(acc_t(1))
                            : (cnt > L ? V::set(V(acc_t(0)), V(acc_t(1)), cnt - L) : V(acc_t(0)));
        }
        if constexpr (kDot == Dot::kProbabilities) {
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
      accumulate(a, b, a, b, ca, cb, j, 2 * L);
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
      accumulate(a, b, a_dot, b_dot, ca, cb, j, rem);
    }
    S += hsum(s_a + s_b);
    if constexpr (kDot != Dot::kNone) {
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

// A position's class index y and whether it is kept (not ignore_index); a bad-target Status for a
// kept index outside [0, C).
inline Status read_target(const CeArgs& a, int64_t pos, int64_t& y, bool& valid) {
  y = load_target(a, pos);
  valid = y != a.ignore_index;
  if (valid && (y < 0 || y >= a.C)) return {true, y};
  return {};
}

template <typename acc_t>
inline acc_t grad_at(const CeArgs& a, int64_t o, int64_t i) {
  return static_cast<const acc_t*>(a.grad)[o * a.grad_stride_outer + i * a.grad_stride_inner];
}

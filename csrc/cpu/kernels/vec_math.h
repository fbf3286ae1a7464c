// Vector loads and stores (IO), horizontal max / sum, the exponential, NaN-aware
// maximum and the soft-capping function with its derivative.
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

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

// A store of two accumulator vectors that bypasses the caches (non-temporal) where the ISA has
// it and p is aligned to the vector stores' width: a large output that is written once is not
// read first (write-allocate) and does not evict the input. Callers end their range with
// stream_fence(), and stream only outputs whose every store is aligned (a cache line written
// partly by streaming and partly by ordinary stores is many times slower than either).
template <typename T>
inline void stream_store(T* p, const Vectorized<typename AccOf<T>::type>& a,
                         const Vectorized<typename AccOf<T>::type>& b) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  constexpr uintptr_t kWidth = 64;
#else
  constexpr uintptr_t kWidth = 32;
#endif
  if (reinterpret_cast<uintptr_t>(p) % kWidth == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, a);
      _mm512_stream_ps(p + 16, b);
      return;
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(p, a);
      _mm512_stream_pd(p + 8, b);
      return;
    } else {
      const __m512i v = at::vec::convert_from_float<T>(a, b);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
      return;
    }
#else
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + 8, b);
      return;
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, a);
      _mm256_stream_pd(p + 4, b);
      return;
    } else {
      const __m256i v = at::vec::convert_from_float<T>(a, b);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
      return;
    }
#endif
  }
#endif
  IO<T>::store(p, a, b);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

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
// matters because the forward and backward are compute-bound at ~1 exp per element. On AVX2 the
// same polynomial, scaled through the exponent bits.
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
#elif defined(CPU_CAPABILITY_AVX2)
    // the same polynomial; 2^n from the exponent bits, (n + 127) << 23, with t clamped to
    // [-127, 128]: n = -127 gives the bits of +0 (results below 2^-126 flush to 0, as x = -inf
    // must), n = 128 those of +inf
    const __m256 t = _mm256_min_ps(
        _mm256_max_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                      _mm256_set1_ps(-127.0f)),
        _mm256_set1_ps(128.0f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.540353039338161e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.333355814642844e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return Vectorized<float>(_mm256_mul_ps(p, _mm256_castsi256_ps(e)));
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

// row_math.h's math policy for a vector of values: its formulas (the sigmoid cross-entropy, the
// probability-target coefficient) are written once, for one value and for a vector.
template <typename acc_t>
struct VecMath {
  using V = Vectorized<acc_t>;
  static V c(double v) { return V(static_cast<acc_t>(v)); }
  static V exp(const V& v) { return v.exp(); }
  static V log1p(const V& v) { return v.log1p(); }
  static V abs(const V& v) { return v.abs(); }
  static V neg(const V& v) { return V(acc_t(0)) - v; }
  static V max0(const V& v) { return at::vec::maximum(v, V(acc_t(0))); }
  static V fmadd(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
};

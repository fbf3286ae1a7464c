// softmax / log_softmax forward and backward.
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

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
      const auto st = row_stats<T, false, Dot::kNone, false>(xr, nullptr, nullptr, C, nocap, 1, 0);
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
    block_stats<T, false, Dot::kNone, false, false>(x + base, nullptr, nullptr, C, inner, n,
                                                    nocap, 1, 0, nullptr, st);
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

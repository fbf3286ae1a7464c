// Cross-entropy forward: rows (inner == 1) and blocks of inner positions (inner > 1).
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

// ------------------------------------------------------------------------------------------
// Cross-entropy forward
// ------------------------------------------------------------------------------------------

// One row's lse and loss from its statistics, written to lse_out / loss (class indices: the
// target y, valid = not ignored; xr: the row's logits, for the target's). Returns the lse.
template <typename T, bool kCap, Dot kDot, bool kW>
inline double row_loss(const CeArgs& a, int64_t row, const RowStats<typename AccOf<T>::type>& st,
                       const T* xr, int64_t y, bool valid) {
  using acc_t = typename AccOf<T>::type;
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  const Cap<acc_t> cap(a.softcap);
  const acc_t eps = static_cast<acc_t>(a.eps);
  const acc_t eps_c = a.C > 0 ? static_cast<acc_t>(a.eps / a.C) : 0;
  const acc_t z = static_cast<acc_t>(a.z), w_sum = static_cast<acc_t>(a.w_sum);
  const acc_t log_s = std::log(st.S);
  const double lse = lse_from_stats(st.M, log_s);
  a.lse_out[row] = lse;
  if constexpr (kDot == Dot::kProbabilities) {
    (void)xr, (void)y, (void)valid, (void)w, (void)cap, (void)eps, (void)eps_c, (void)w_sum;
    loss[row] = ce_prob_loss(st.M, log_s, st.A, st.D, z, lse);
  } else if (!valid) {
    loss[row] = 0;
  } else {
    const acc_t x_y = cap.value(to_acc(xr[y]));
    const acc_t w_y = kW ? w[y] : acc_t(1);
    loss[row] = ce_index_loss(st.M, log_s, x_y, w_y, st.D, w_sum, eps, eps_c, z, lse);
  }
  return lse;
}

template <typename T, bool kCap, Dot kDot, bool kW>
Status ce_fwd_rows(const CeArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  const T* x = static_cast<const T*>(a.x);
  const T* prob = static_cast<const T*>(a.prob);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const int64_t C = a.C;
  const Cap<acc_t> cap(a.softcap);
  const acc_t eps = static_cast<acc_t>(a.eps), eps_c = C > 0 ? static_cast<acc_t>(a.eps / C) : 0;
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * C;
    int64_t y = 0;
    bool valid = true;
    if constexpr (kDot != Dot::kProbabilities) {
      const Status s = read_target(a, row, y, valid);
      if (s.bad_target) return s;
    }
    const T* tr = kDot == Dot::kProbabilities ? prob + row * C : nullptr;
    const auto st = row_stats<T, kCap, kDot, kW>(xr, tr, w, C, cap, 1 - eps, eps_c);
    row_loss<T, kCap, kDot, kW>(a, row, st, xr, y, valid);
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

template <typename T, bool kCap, Dot kDot, bool kW, bool kPick>
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
      if constexpr (kDot != Dot::kNone) st.D[h] = at::vec::fmadd(st.A[h], rn - ro, st.D[h]);
      st.M[h] = mn;
      ref[h] = rn;
    }
    for (int64_t k = 0; k < kc; ++k) {  // pass B: from the buffer
      const acc_t c = static_cast<acc_t>(c0 + k);
      V t[2];
      if constexpr (kDot == Dot::kProbabilities) {
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
        if constexpr (kDot != Dot::kNone) {
          V coef = wc;
          if constexpr (kDot == Dot::kProbabilities) {
            coef = ce_prob_coef_m<VecMath<acc_t>>(t[h], wc, v_eps1, v_epsc);
          }
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

template <typename T, bool kCap, Dot kDot, bool kW>
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
  alignas(64) acc_t row_max[B], log_sum[B], target_f[B], w_target[B], x_target[B];
  BlockStats<acc_t> st;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t o = u / nblk, i0 = (u % nblk) * B, n = std::min(B, inner - i0);
    const int64_t base = o * C * inner + i0, pos0 = o * inner + i0;
    // targets: range check, lane class (-1 if ignored), w_y
    if constexpr (kDot != Dot::kProbabilities) {
      for (int64_t j = 0; j < B; ++j) {
        target_f[j] = -1;
        w_target[j] = 0;
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t y = load_target(a, pos0 + j);
        if (y == a.ignore_index) continue;
        if (y < 0 || y >= C) return {true, y};
        target_f[j] = static_cast<acc_t>(y);
        w_target[j] = kW ? w[y] : acc_t(1);
        if (!vec_pick) x_target[j] = cap.value(to_acc(x[base + y * inner + j]));
      }
    }
    const V ylane[2] = {V::loadu(target_f), V::loadu(target_f + L)};
    if (kDot != Dot::kProbabilities && vec_pick) {
      block_stats<T, kCap, kDot, kW, true>(x + base, nullptr, w, C, inner, n, cap, 1 - eps,
                                           eps_c, ylane, st);
    } else {
      const T* tb = kDot == Dot::kProbabilities ? prob + base : nullptr;
      block_stats<T, kCap, kDot, kW, false>(x + base, tb, w, C, inner, n, cap, 1 - eps, eps_c,
                                            ylane, st);
      if (kDot != Dot::kProbabilities) {
        st.XY[0] = V::loadu(x_target);
        st.XY[1] = V::loadu(x_target + L);
      }
    }
    // loss per lane, in vectors (formulas in row_math.h)
    V lo[2];
    for (int h = 0; h < 2; ++h) {
      const V ls = st.S[h].log();
      V l;
      if constexpr (kDot == Dot::kProbabilities) {
        l = st.A[h] * ls + st.D[h];
      } else {
        l = V(1 - eps) * V::loadu(w_target + h * L) * ((st.M[h] - st.XY[h]) + ls);
        if constexpr (kDot == Dot::kSmoothing) {
          l = l + V(eps_c) * at::vec::fmadd(V(w_sum), ls, st.D[h]);
        }
      }
      if (z > 0) {
        const V lse = st.M[h] + ls;
        l = at::vec::fmadd(V(z) * lse, lse, l);
      }
      l = l + (st.M[h] - st.M[h]);  // NaN lanes (lse NaN) stay NaN whatever the weights
      if constexpr (kDot != Dot::kProbabilities) {
        l = V::blendv(zero, l, ylane[h] >= zero);  // ignored: exactly 0
      }
      lo[h] = l;
      st.M[h].store(row_max + h * L);
      ls.store(log_sum + h * L);
    }
    accio::store_n(loss + pos0, n, lo[0], lo[1]);
    for (int64_t j = 0; j < n; ++j) a.lse_out[pos0 + j] = lse_from_stats(row_max[j], log_sum[j]);
  }
  return {};
}

// Cross-entropy backward (also the second half of the fused forward+backward, which
// ce_cpu.cpp runs per cache-sized batch of rows): rows and blocks of inner positions.
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

// ------------------------------------------------------------------------------------------
// Cross-entropy backward: grad_c = g [(A + 2 z lse) p_c - b_c] cap'(x_c), written once.
// ------------------------------------------------------------------------------------------

// The parts of one row's gradient that do not depend on how p_c is obtained (recomputed from
// the logits by ce_bwd_rows, or from the exponentials the forward kept, ce_fused_rows).
template <typename T, bool kCap, Dot kDot, bool kW>
struct RowGradient {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using VM = VecMath<acc_t>;
  using io = IO<T>;
  static constexpr int64_t L = io::L;

  const CeArgs& a;
  const T* prob;
  const acc_t* w;
  int64_t C;
  Cap<acc_t> cap;
  acc_t eps, eps_c, z, w_sum;
  V v_eps1, v_epsc;

  explicit RowGradient(const CeArgs& args)
      : a(args),
        prob(static_cast<const T*>(args.prob)),
        w(static_cast<const acc_t*>(args.weight)),
        C(args.C),
        cap(args.softcap),
        eps(static_cast<acc_t>(args.eps)),
        eps_c(args.C > 0 ? static_cast<acc_t>(args.eps / args.C) : acc_t(0)),
        z(static_cast<acc_t>(args.z)),
        w_sum(static_cast<acc_t>(args.w_sum)),
        v_eps1(1 - eps),
        v_epsc(eps_c) {}

  // A NaN row (as torch) or an ignored row: a NaN / zero gradient. True if the row was one.
  bool fill_inactive(T* gr, double lse, bool valid) const {
    if (lse == lse && valid) return false;
    const V vf(lse != lse ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0));
    int64_t c = 0;
    for (; c + 2 * L <= C; c += 2 * L) io::store(gr + c, vf, vf);
    io::store_n(gr + c, C - c, vf, vf);
    return true;
  }

  // A = sum_c a_c: one pass over the row's targets (probabilities), or from w_y (indices).
  acc_t a_sum(const T* tr, int64_t y) const {
    if constexpr (kDot == Dot::kProbabilities) {
      (void)y;
      V sa(0), sb(0);
      for (int64_t c = 0; c < C; c += 2 * L) {
        const int64_t cnt = std::min(2 * L, C - c);
        V ta, tb, wa(acc_t(1)), wb(acc_t(1));
        io::load_n(tr + c, cnt, ta, tb);
        if constexpr (kW) IO<acc_t>::load_n(w + c, cnt, wa, wb);
        V ca = ce_prob_coef_m<VM>(ta, wa, v_eps1, v_epsc);
        V cb = ce_prob_coef_m<VM>(tb, wb, v_eps1, v_epsc);
        if (cnt < 2 * L) {
          ca = V::set(V(acc_t(0)), ca, std::min(cnt, L));
          cb = cnt > L ? V::set(V(acc_t(0)), cb, cnt - L) : V(acc_t(0));
        }
        sa += ca;
        sb += cb;
      }
      return hsum(sa + sb);
    } else {
      (void)tr;
      return ce_index_a(kW ? w[y] : acc_t(1), w_sum, eps, eps_c);
    }
  }

  // grad -= b_c for classes [c, c + cnt) (cnt <= 2L): g w_c eps/C (smoothing), g a_c
  // (probabilities); nothing for plain class indices (the true class is written afterwards).
  void sub_targets(V& ga, V& gb, int64_t c, int64_t cnt, const T* tr, const V& vg,
                   const V& vbs) const {
    if constexpr (kDot == Dot::kProbabilities) {
      V ta, tb, wa(acc_t(1)), wb(acc_t(1));
      io::load_n(tr + c, cnt, ta, tb);
      if constexpr (kW) IO<acc_t>::load_n(w + c, cnt, wa, wb);
      ga = ga - ce_prob_coef_m<VM>(ta, vg * wa, v_eps1, v_epsc);
      gb = gb - ce_prob_coef_m<VM>(tb, vg * wb, v_eps1, v_epsc);
    } else if constexpr (kDot == Dot::kSmoothing) {
      if constexpr (kW) {
        V wa, wb;
        IO<acc_t>::load_n(w + c, cnt, wa, wb);
        ga = ga - vbs * wa;
        gb = gb - vbs * wb;
      } else {
        ga = ga - vbs;
        gb = gb - vbs;
      }
    } else {
      (void)ga, (void)gb, (void)c, (void)cnt, (void)tr, (void)vg, (void)vbs;
    }
  }

  // The true class, formed in acc_t and rounded once: g [k p_y - b_y - (1-eps) w_y] cap'(x_y).
  T true_class(acc_t k, acc_t p_y, acc_t g, int64_t y, acc_t d_y) const {
    const acc_t w_y = kW ? w[y] : acc_t(1);
    const acc_t b_y =
        (kDot == Dot::kSmoothing ? g * eps_c * w_y : acc_t(0)) + g * (1 - eps) * w_y;
    return static_cast<T>((k * p_y - b_y) * d_y);
  }
};

// Without soft-capping, p_c of a row is formed as exp(x_c - ref_k) * exp(ref_k - lse) with ref_k
// the running maximum after chunk k of row_stats — the factors the fused kernel has at hand from
// its kept exponentials (ce_fused.h) — so that the backward kernel and the fused forward+backward
// give the same bits (a second backward, or gradcheck's reentrancy check, recomputes what the
// first one handed over). ref_k: one maximum-only pass over the row.
template <typename T>
inline void chunk_refs(const T* xr, int64_t C, typename AccOf<T>::type* ref) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using io = IO<T>;
  constexpr int64_t L = io::L;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t M = ninf;
  for (int64_t c0 = 0; c0 < C; c0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, C - c0);
    V ma(ninf), mb(ninf);
    int64_t j = 0;
    for (; j + 2 * L <= n; j += 2 * L) {
      V a, b;
      io::load(xr + c0 + j, a, b);
      ma = at::vec::maximum(ma, a);
      mb = at::vec::maximum(mb, b);
    }
    if (j < n) {
      V a, b;
      io::load_n(xr + c0 + j, n - j, a, b);
      ma = at::vec::maximum(ma, V::set(V(ninf), a, std::min(n - j, L)));
      mb = at::vec::maximum(mb, n - j > L ? V::set(V(ninf), b, n - j - L) : V(ninf));
    }
    M = std::max(M, hmax(at::vec::maximum(ma, mb)));
    ref[c0 / kRowChunk] = M;
  }
}

// p_y of the true class from the same two factors, the first by the vector exponential (the
// lane value the chunk's vector pass gives).
template <typename acc_t>
inline acc_t p_from_ref(acc_t x, acc_t ref, acc_t hi, acc_t lo) {
  if (ref == -std::numeric_limits<acc_t>::infinity()) return acc_t(0);
  alignas(64) acc_t e[Vectorized<acc_t>::size()];
  vexp(Vectorized<acc_t>(x) - Vectorized<acc_t>(ref)).store(e);
  return e[0] * std::exp((ref - hi) - lo);
}

// The chunk's factor k exp(ref_k - lse) of p_c (0 where ref_k = -inf: every logit so far -inf).
template <typename acc_t>
inline acc_t chunk_factor(acc_t k, acc_t ref, acc_t hi, acc_t lo) {
  return ref == -std::numeric_limits<acc_t>::infinity() ? acc_t(0)
                                                         : k * std::exp((ref - hi) - lo);
}

template <typename T, bool kCap, Dot kDot, bool kW>
Status ce_bwd_rows(const CeArgs& a, int64_t begin, int64_t end) {
  using RG = RowGradient<T, kCap, kDot, kW>;
  using acc_t = typename RG::acc_t;
  using V = typename RG::V;
  using io = typename RG::io;
  constexpr int64_t L = RG::L;
  const RG rg(a);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t C = a.C;
  thread_local std::vector<acc_t> ref_buf;  // chunk maxima (without soft-capping)
  if (!kCap) ref_buf.resize(std::max<size_t>(ref_buf.size(), (C + kRowChunk - 1) / kRowChunk));
  acc_t* ref = ref_buf.data();

  // Validate the whole range before writing anything: an in-place backward must not leave a
  // partly overwritten input behind when it raises.
  if constexpr (kDot != Dot::kProbabilities) {
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
    if constexpr (kDot != Dot::kProbabilities) y = load_target(a, row);
    if (rg.fill_inactive(gr, lse, kDot == Dot::kProbabilities || y != a.ignore_index)) continue;
    const acc_t g = grad_at<acc_t>(a, row, 0);
    acc_t hi, lo;
    split_lse(lse, hi, lo);
    const T* tr = kDot == Dot::kProbabilities ? rg.prob + row * C : nullptr;
    const acc_t k = ce_p_coef(g, rg.a_sum(tr, y), rg.z, lse);
    // read before an in-place write
    const acc_t x_y_raw = kDot == Dot::kProbabilities ? acc_t(0) : to_acc(xr[y]);
    const V vk(k), vhi(hi), vlo(lo), vg(g), vbs(g * rg.eps_c);
    if constexpr (!kCap) chunk_refs(xr, C, ref);
    V vm, vf;  // !kCap: the chunk's maximum and factor k exp(ref_k - lse)
    auto grad_of = [&](V xa, V xb, int64_t c, int64_t cnt, V& ga, V& gb) {
      V da(acc_t(1)), db(acc_t(1));
      if constexpr (kCap) {
        xa = vcap_d(xa, rg.cap.s, rg.cap.inv_s, da);
        xb = vcap_d(xb, rg.cap.s, rg.cap.inv_s, db);
        ga = vk * vexp((xa - vhi) - vlo);
        gb = vk * vexp((xb - vhi) - vlo);
      } else {
        ga = vf * vexp(xa - vm);
        gb = vf * vexp(xb - vm);
      }
      rg.sub_targets(ga, gb, c, cnt, tr, vg, vbs);
      if constexpr (kCap) {
        ga = ga * da;
        gb = gb * db;
      }
    };
    for (int64_t c0 = 0; c0 < C; c0 += kRowChunk) {
      const int64_t c1 = std::min(C, c0 + kRowChunk);
      if constexpr (!kCap) {
        const acc_t r = ref[c0 / kRowChunk];
        // a chunk of -inf logits only: p = 0 (and no -inf - -inf)
        vm = r == -std::numeric_limits<acc_t>::infinity() ? V(acc_t(0)) : V(r);
        vf = V(chunk_factor(k, r, hi, lo));
      }
      int64_t c = c0;
      for (; c + 2 * L <= c1; c += 2 * L) {
        V xa, xb, ga, gb;
        io::load(xr + c, xa, xb);
        grad_of(xa, xb, c, 2 * L, ga, gb);
        if (a.stream_out) {
          stream_store<T>(gr + c, ga, gb);
        } else {
          io::store(gr + c, ga, gb);
        }
      }
      if (c < c1) {
        V xa, xb, ga, gb;
        io::load_n(xr + c, c1 - c, xa, xb);
        grad_of(xa, xb, c, c1 - c, ga, gb);
        io::store_n(gr + c, c1 - c, ga, gb);
      }
    }
    if constexpr (kDot != Dot::kProbabilities) {
      acc_t d_y;
      const acc_t xs_y = rg.cap.value_and_derivative(x_y_raw, d_y);
      const acc_t p_y = kCap ? std::exp((xs_y - hi) - lo)
                             : p_from_ref(xs_y, ref[y / kRowChunk], hi, lo);
      gr[y] = rg.true_class(k, p_y, g, y, d_y);
    }
  }
  if (a.stream_out) stream_fence();
  return {};
}

template <typename T, bool kCap, Dot kDot, bool kW>
Status ce_bwd_blocks(const CeArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  using V = Vectorized<acc_t>;
  using VM = VecMath<acc_t>;
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
  if constexpr (kDot != Dot::kProbabilities) {
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
  // Per lane (inner position) of the block: p_coef = g (A + 2 z lse), the coefficient of p_c;
  // lse_hi + lse_lo = lse (split for an exact x - lse); upstream = g; smooth_coef = g eps/C (times
  // w_c in the loop); true_coef = g (1 - eps) w_y; target_f = y as acc_t (-1: ignored);
  // nan_poison = NaN where the lse is NaN (added to the lane's gradient), else 0.
  alignas(64) acc_t p_coef[B], lse_hi[B], lse_lo[B], upstream[B], smooth_coef[B];
  alignas(64) acc_t nan_poison[B], target_f[B], true_coef[B];
  double lse_lane[B];
  int64_t target[B];
  acc_t x_target[B];
  for (int64_t u = begin; u < end; ++u) {
    const int64_t o = u / nblk, i0 = (u % nblk) * B, n = std::min(B, inner - i0);
    const int64_t base = o * C * inner + i0;
    bool any_nan = false;
    for (int64_t j = 0; j < B; ++j) {
      p_coef[j] = lse_hi[j] = lse_lo[j] = upstream[j] = smooth_coef[j] = 0;
      nan_poison[j] = true_coef[j] = 0;
      target_f[j] = -1;
      target[j] = -1;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = o * inner + i0 + j;
      const double lse = a.lse_in[pos];
      if (lse != lse) {
        nan_poison[j] = std::numeric_limits<acc_t>::quiet_NaN();
        any_nan = true;
        continue;
      }
      split_lse(lse, lse_hi[j], lse_lo[j]);
      lse_lane[j] = lse;
      const acc_t g = grad_at<acc_t>(a, o, i0 + j);
      if constexpr (kDot == Dot::kProbabilities) {
        upstream[j] = g;  // k needs A = sum_c a_c, computed below
      } else {
        const int64_t y = load_target(a, pos);
        if (y == a.ignore_index) continue;  // k = b = 0: a zero gradient
        target[j] = y;
        target_f[j] = static_cast<acc_t>(y);
        if (!vec_true) x_target[j] = to_acc(x[base + y * inner + j]);
        const acc_t w_y = kW ? w[y] : acc_t(1);
        p_coef[j] = ce_p_coef(g, ce_index_a(w_y, w_sum, eps, eps_c), z, lse);
        smooth_coef[j] = g * eps_c;
        upstream[j] = g;
        true_coef[j] = g * (1 - eps) * w_y;
      }
    }
    auto load = [&](const T* p, V& va, V& vb) {
      if (n == B) {
        io::load(p, va, vb);
      } else {
        io::load_n(p, n, va, vb);
      }
    };
    if constexpr (kDot == Dot::kProbabilities) {
      V sa(0), sb(0);
      for (int64_t c = 0; c < C; ++c) {
        V ta, tb;
        load(prob + base + c * inner, ta, tb);
        const V wc(kW ? w[c] : acc_t(1));
        sa += ce_prob_coef_m<VM>(ta, wc, v_eps1, v_epsc);
        sb += ce_prob_coef_m<VM>(tb, wc, v_eps1, v_epsc);
      }
      alignas(64) acc_t a_sum[B];
      sa.store(a_sum);
      sb.store(a_sum + L);
      for (int64_t j = 0; j < n; ++j) {
        if (nan_poison[j] == nan_poison[j]) {
          p_coef[j] = ce_p_coef(upstream[j], a_sum[j], z, lse_lane[j]);
        }
      }
    }
    const V ka = V::loadu(p_coef), kb = V::loadu(p_coef + L);
    const V ha = V::loadu(lse_hi), hb = V::loadu(lse_hi + L);
    const V la = V::loadu(lse_lo), lb = V::loadu(lse_lo + L);
    const V bsa = V::loadu(smooth_coef), bsb = V::loadu(smooth_coef + L);
    const V ga_ = V::loadu(upstream), gb_ = V::loadu(upstream + L);
    const V na = V::loadu(nan_poison), nb = V::loadu(nan_poison + L);
    const V ya = V::loadu(target_f), yb = V::loadu(target_f + L);
    const V tca = V::loadu(true_coef), tcb = V::loadu(true_coef + L);
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
      if constexpr (kDot == Dot::kProbabilities) {
        V ta, tb;
        load(prob + base + c * inner, ta, tb);
        const V wc(kW ? w[c] : acc_t(1));
        gra = gra - ce_prob_coef_m<VM>(ta, ga_ * wc, v_eps1, v_epsc);
        grb = grb - ce_prob_coef_m<VM>(tb, gb_ * wc, v_eps1, v_epsc);
      } else if constexpr (kDot == Dot::kSmoothing) {
        const V wc(kW ? w[c] : acc_t(1));
        gra = gra - bsa * wc;
        grb = grb - bsb * wc;
      }
      if constexpr (kDot != Dot::kProbabilities) {
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
    if constexpr (kDot != Dot::kProbabilities) {
      for (int64_t j = 0; j < n && !vec_true; ++j) {
        if (target[j] < 0) continue;
        const int64_t y = target[j];
        acc_t d_y;
        const acc_t xs_y = cap.value_and_derivative(x_target[j], d_y);
        const acc_t w_y = kW ? w[y] : acc_t(1);
        const acc_t p_y = std::exp((xs_y - lse_hi[j]) - lse_lo[j]);
        const acc_t b_y = (kDot == Dot::kSmoothing ? smooth_coef[j] * w_y : acc_t(0)) +
                          upstream[j] * (1 - eps) * w_y;
        out[base + y * inner + j] = static_cast<T>((p_coef[j] * p_y - b_y) * d_y);
      }
    }
  }
  return {};
}

// Cross-entropy forward and backward in one call (the gradient formed in the forward pass, for
// the mean / sum reductions): rows with one exponential per logit, everything else as the
// forward then the backward over cache-sized batches of work units.
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

// The forward and backward kernels by layout: rows (inner == 1), narrow rows, or blocks of
// inner positions.
template <typename T, bool kCap, Dot kDot, bool kW>
struct FwdKernel {
  static Status run(const CeArgs& a, int64_t begin, int64_t end) {
    if (a.inner != 1) return ce_fwd_blocks<T, kCap, kDot, kW>(a, begin, end);
    if (a.C <= kNarrowMaxC) return ce_narrow_rows<T, kCap, kDot, kW, Pass::kForward>(a, begin, end);
    return ce_fwd_rows<T, kCap, kDot, kW>(a, begin, end);
  }
};

template <typename T, bool kCap, Dot kDot, bool kW>
struct BwdKernel {
  static Status run(const CeArgs& a, int64_t begin, int64_t end) {
    if (a.inner != 1) return ce_bwd_blocks<T, kCap, kDot, kW>(a, begin, end);
    if (a.C <= kNarrowMaxC) {
      return ce_narrow_rows<T, kCap, kDot, kW, Pass::kBackward>(a, begin, end);
    }
    return ce_bwd_rows<T, kCap, kDot, kW>(a, begin, end);
  }
};

// Rows (inner == 1), no soft-capping: the statistics pass keeps exp(x_c - running maximum)
// (row_stats, kKeep) in float scratch — the gradient buffer itself for float / double logits, a
// per-thread buffer of C floats for half types — and the gradient pass forms
// k p_c - b_c with p_c = keep[c] exp(ref_k - lse) from it: one exponential per logit instead of
// one in each pass (the two passes were compute-bound:
// docs/bench-history/2026-11-30-cpu-kernels-round-2.md). The loss and lse are the forward
// kernel's bit for bit, the gradient the backward kernel's (which forms p_c from the same two
// factors: ce_backward.h, chunk_refs).
template <typename T, Dot kDot, bool kW>
Status ce_fused_rows(const CeArgs& a, int64_t begin, int64_t end) {
  using RG = RowGradient<T, false, kDot, kW>;
  using acc_t = typename RG::acc_t;
  using V = typename RG::V;
  using io = typename RG::io;
  constexpr int64_t L = RG::L;
  constexpr bool kInOut = std::is_same_v<T, acc_t>;  // the gradient buffer holds acc_t
  const RG rg(a);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t C = a.C;
  const int64_t chunks = (C + kRowChunk - 1) / kRowChunk;
  thread_local std::vector<acc_t> keep_buf, ref_buf;
  if (static_cast<int64_t>(ref_buf.size()) < chunks) ref_buf.resize(chunks);
  if (!kInOut && static_cast<int64_t>(keep_buf.size()) < C) keep_buf.resize(C);
  acc_t* ref = ref_buf.data();
  // non-temporal gradient stores for half types only: float / double rows kept their
  // exponentials in the gradient buffer, whose lines are in cache already
  const bool stream = !kInOut && a.stream_out;
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * C;
    T* gr = out + row * C;
    const T* tr = kDot == Dot::kProbabilities ? rg.prob + row * C : nullptr;
    int64_t y = 0;
    bool valid = true;
    if constexpr (kDot != Dot::kProbabilities) {
      const Status s = read_target(a, row, y, valid);
      if (s.bad_target) return s;
    }
    acc_t* keep = kInOut ? reinterpret_cast<acc_t*>(gr) : keep_buf.data();
    const auto st = row_stats<T, false, kDot, kW, true>(xr, tr, rg.w, C, rg.cap, 1 - rg.eps,
                                                        rg.eps_c, keep, ref);
    const double lse = row_loss<T, false, kDot, kW>(a, row, st, xr, y, valid);
    if (rg.fill_inactive(gr, lse, valid)) continue;
    const acc_t g = grad_at<acc_t>(a, row, 0);
    acc_t hi, lo;
    split_lse(lse, hi, lo);
    // every factor as the backward kernel forms it (ce_bwd_rows): the same bits
    const acc_t k = ce_p_coef(g, rg.a_sum(tr, y), rg.z, lse);
    const V vg(g), vbs(g * rg.eps_c);
    const acc_t p_y = kDot == Dot::kProbabilities
                          ? acc_t(0)
                          : p_from_ref(to_acc(xr[y]), ref[y / kRowChunk], hi, lo);
    for (int64_t c0 = 0; c0 < C; c0 += kRowChunk) {
      const int64_t n = std::min(kRowChunk, C - c0);
      const V vf(chunk_factor(k, ref[c0 / kRowChunk], hi, lo));  // 0 where keep is 0
      int64_t j = 0;
      for (; j + 2 * L <= n; j += 2 * L) {
        V ga, gb;
        IO<acc_t>::load(keep + c0 + j, ga, gb);
        ga = vf * ga;
        gb = vf * gb;
        rg.sub_targets(ga, gb, c0 + j, 2 * L, tr, vg, vbs);
        if (stream) {
          stream_store<T>(gr + c0 + j, ga, gb);
        } else {
          io::store(gr + c0 + j, ga, gb);
        }
      }
      if (j < n) {
        V ga, gb;
        IO<acc_t>::load_n(keep + c0 + j, n - j, ga, gb);
        ga = vf * ga;
        gb = vf * gb;
        rg.sub_targets(ga, gb, c0 + j, n - j, tr, vg, vbs);
        io::store_n(gr + c0 + j, n - j, ga, gb);
      }
    }
    if constexpr (kDot != Dot::kProbabilities) gr[y] = rg.true_class(k, p_y, g, y, acc_t(1));
  }
  if (stream) stream_fence();
  return {};
}

// Everything else: the forward kernel over a few work units, then the backward kernel over the
// same units while their logits are still in cache.
template <typename T, bool kCap, Dot kDot, bool kW>
Status ce_fused_batches(const CeArgs& a, int64_t begin, int64_t end) {
  // units per batch: 16384 logits (64 KB in float32, 32 KB in half types, 128 KB in float64)
  // (a row may exceed it: then one row at a time)
  constexpr int64_t kBatchElements = 16384;
  const int64_t lanes = a.inner == 1 ? 1 : block_lanes(a.dtype);
  const int64_t per_unit = std::max<int64_t>(1, a.C * lanes);
  const int64_t batch = std::max<int64_t>(1, kBatchElements / per_unit);
  Status first;
  for (int64_t b = begin; b < end; b += batch) {
    const int64_t e = std::min(end, b + batch);
    const Status s = FwdKernel<T, kCap, kDot, kW>::run(a, b, e);
    if (s.bad_target && !first.bad_target) first = s;
    (void)BwdKernel<T, kCap, kDot, kW>::run(a, b, e);  // a bad target: the forward reported it
  }
  return first;
}

template <typename T, bool kCap, Dot kDot, bool kW>
struct FusedKernel {
  static Status run(const CeArgs& a, int64_t begin, int64_t end) {
    if (a.inner == 1 && a.C <= kNarrowMaxC) {
      return ce_narrow_rows<T, kCap, kDot, kW, Pass::kBoth>(a, begin, end);
    }
    if constexpr (!kCap) {
      if (a.inner == 1) return ce_fused_rows<T, kDot, kW>(a, begin, end);
    }
    return ce_fused_batches<T, kCap, kDot, kW>(a, begin, end);
  }
};

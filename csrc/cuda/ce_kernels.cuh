// CUDA kernels of the cross-entropy ops (schemas in softmax_ce/ops.py; bindings in ce_cuda.cu).
//
// Rows (inner == 1): a group of GROUP threads per row (GROUP <= 32: part of a warp, several rows
// per block; GROUP > 32: the whole block), 16-byte loads (kUnroll in flight per thread), one pass
// over the row with online max/sum, per-row float64 lse. The common case (no soft-capping, no
// smoothing, class-index target) has its own instantiation (kFast) with a minimal inner loop.
// The backward reads the row once and writes the gradient once. The fused forward+backward
// (ce_fwd_bwd: the gradient for an upstream gradient known at forward time) runs both passes in
// one kernel; a block-wide row is kept in shared memory between them. The true-class term is
// folded into the per-element formula, so every gradient element is formed in float and rounded
// once. inner > 1 (e.g. (N, C, H, W)): one thread per position, looping over classes with
// stride inner (coalesced across positions). An out-of-range class index gives that position a
// NaN loss / gradient and is recorded through p.bad_target, never a device-side assert.
//
// Included by ce_launches.cuh (the host side: launch<T>), built once per dtype by
// ce_cuda_<dtype>.cu.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include <algorithm>

#include "ce_launch.h"
#include "device_common.cuh"
#include "launch_config.cuh"

namespace softmax_ce::cuda {

__device__ __forceinline__ void report_bad_target(const CeParams& p, int64_t value) {
  atomicCAS(p.bad_target, kNoBadTarget, static_cast<unsigned long long>(value));
}

// Per-launch constants of the formulas in row_math.h.
template <typename acc_t>
struct CeConsts {
  Cap<acc_t> cap;
  acc_t eps1, eps_c;
  const acc_t* w;
  bool dot, smooth;
  __device__ __forceinline__ CeConsts(const CeParams& p, bool prob)
      : cap(p.softcap),
        eps1(static_cast<acc_t>(1 - p.eps)),
        eps_c(p.C > 0 ? static_cast<acc_t>(p.eps / p.C) : acc_t(0)),
        w(static_cast<const acc_t*>(p.weight)),
        dot(prob || p.eps > 0),
        smooth(p.eps > 0) {}
};

__device__ __forceinline__ int64_t load_target(const CeParams& p, int64_t pos) {
  return p.target_i32 ? static_cast<int64_t>(static_cast<const int32_t*>(p.target)[pos])
                      : static_cast<const int64_t*>(p.target)[pos];
}

template <typename acc_t>
__device__ __forceinline__ acc_t weight_sum(const CeParams& p) {
  return p.w_sum_dev ? *static_cast<const acc_t*>(p.w_sum_dev) : static_cast<acc_t>(p.w_sum_host);
}

// The loss of one position from its statistics (formulas in row_math.h); y and x_y were loaded
// early by the caller (y = ignore_index when probabilities).
template <typename acc_t>
__device__ __forceinline__ void write_loss(const CeParams& p, bool prob, int64_t pos, int64_t y,
                                           acc_t x_y, const Stats<acc_t>& st) {
  const acc_t log_s = dlog(st.s);
  const double lse = lse_from_stats(st.m, log_s);
  p.lse_out[pos] = lse;
  acc_t* loss = static_cast<acc_t*>(p.loss);
  const acc_t z = static_cast<acc_t>(p.z);
  if (prob) {
    loss[pos] = ce_prob_loss(st.m, log_s, st.sa, st.d, z, lse);
    return;
  }
  if (y == p.ignore_index) {
    loss[pos] = acc_t(0);
  } else if (y < 0 || y >= p.C) {
    report_bad_target(p, y);
    loss[pos] = std::numeric_limits<acc_t>::quiet_NaN();
  } else {
    const acc_t* w = static_cast<const acc_t*>(p.weight);
    const acc_t eps = static_cast<acc_t>(p.eps);
    loss[pos] = ce_index_loss(st.m, log_s, x_y, w ? w[y] : acc_t(1), st.d, weight_sum<acc_t>(p),
                              eps, static_cast<acc_t>(p.eps / p.C), z, lse);
  }
}

// Accumulate one visited run of `count` logits (a pack or a single element) into st.
// kFast (no soft-capping, no smoothing, class-index target): a max, then one exp per element;
// NaN logits reach the sum (exp(NaN) = NaN) rather than the maximum, which is NaN-blind.
template <bool kFast, typename T, typename acc_t>
__device__ __forceinline__ void accumulate(Stats<acc_t>& st, const T* vals, int count, int64_t c0,
                                           const T* t_row, bool prob, const CeConsts<acc_t>& kc) {
  acc_t v[kVec<T>];
  ld_run(vals, count, v);
  if (kFast) {
    add_run_fast<kVec<T>>(st, v, count);
    return;
  }
  acc_t vm = -std::numeric_limits<acc_t>::infinity();
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) {
    if (k < count) {
      v[k] = kc.cap.value(v[k]);
      vm = nan_max(vm, v[k]);
    }
  }
  st.rebase(nan_max(st.m, vm));
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) {
    if (k < count) {
      st.add(v[k]);
      if (kc.dot) {
        acc_t coef = kc.w ? kc.w[c0 + k] : acc_t(1);
        if (prob) coef = ce_prob_coef(ld(t_row[c0 + k]), coef, kc.eps1, kc.eps_c);
        st.add_dot(v[k], coef);
      }
    }
  }
}

// This thread's statistics of the elements [begin, begin + n) of a row (x_row, t_row: the row's
// start), before any reduction over threads.
template <typename T, bool kFast, RowCache M = RowCache::kNone, typename acc_t>
__device__ __forceinline__ Stats<acc_t> run_stats(const T* x_row, const T* t_row, int64_t begin,
                                                  int64_t n, int tid, int nthr, bool prob,
                                                  const CeConsts<acc_t>& kc, Pack<T>* cache,
                                                  int64_t cache_packs) {
  Stats<acc_t> st;
  st.init();
  row_foreach<T, M>(
      x_row + begin, n, tid, nthr,
      [&](const T* vals, int count, int64_t c0) {
        accumulate<kFast>(st, vals, count, begin + c0, t_row, prob, kc);
      },
      cache, cache_packs);
  return st;
}

// The forward of one row: its loss and lse written by the group's first thread; every thread of
// the group gets the row's statistics. All threads of the block must call it.
template <typename T, int GROUP, bool kFast, RowCache M = RowCache::kNone, typename acc_t>
__device__ __forceinline__ Stats<acc_t> fwd_row(const CeParams& p, bool prob,
                                                const RowSlot<GROUP>& slot,
                                                const CeConsts<acc_t>& kc, Stats<acc_t>* smem,
                                                Pack<T>* cache = nullptr) {
  const int64_t C = p.C, row = slot.row;
  const T* x = static_cast<const T*>(p.x) + (slot.active ? row * C : 0);
  const T* t_row = prob ? static_cast<const T*>(p.prob) + (slot.active ? row * C : 0) : nullptr;
  // the target and its logit are loaded before the row, so their latency hides behind it
  int64_t y = p.ignore_index;
  acc_t x_y = acc_t(0);
  if (slot.active && slot.tid == 0 && !prob) {
    y = load_target(p, row);
    if (y >= 0 && y < C) x_y = kc.cap.value(ld(x[y]));
  }
  Stats<acc_t> st = run_stats<T, kFast, M>(x, t_row, 0, slot.active ? C : 0, slot.tid, GROUP,
                                            prob, kc, cache, p.cache_packs);
  st = group_reduce<GROUP>(st, smem);
  if (slot.active && slot.tid == 0) write_loss(p, prob, row, y, x_y, st);
  return st;
}

template <typename T, int GROUP, bool kFast>
__global__ void __launch_bounds__(GROUP <= 32 ? 256 : GROUP) ce_fwd_rows_kernel(CeParams p, bool prob) {
  using acc_t = typename AccOf<T>::type;
  __shared__ Stats<acc_t> smem[32];
  const RowSlot<GROUP> slot(p.outer);
  const CeConsts<acc_t> kc(p, prob);
  (void)fwd_row<T, GROUP, kFast>(p, prob, slot, kc, smem);
}

// The forward of one position of [outer, C, inner] (inner > 1): loss and lse written; returns
// the statistics.
template <typename T, bool kFast, typename acc_t>
__device__ __forceinline__ Stats<acc_t> fwd_position(const CeParams& p, bool prob, int64_t pos,
                                                     const CeConsts<acc_t>& kc) {
  constexpr int B = 8;  // classes loaded per batch: loads in flight per thread
  const int64_t C = p.C, I = p.inner, o = pos / I, i = pos - o * I;
  const T* x = static_cast<const T*>(p.x) + o * C * I + i;
  const T* t = prob ? static_cast<const T*>(p.prob) + o * C * I + i : nullptr;
  int64_t y = p.ignore_index;
  acc_t x_y = acc_t(0);
  if (!prob) {
    y = load_target(p, pos);
    if (y >= 0 && y < C) x_y = kc.cap.value(ld(x[y * I]));
  }
  Stats<acc_t> st;
  st.init();
  for (int64_t c0 = 0; c0 < C; c0 += B) {
    T v[B];
    const int cnt = C - c0 < B ? static_cast<int>(C - c0) : B;
#pragma unroll
    for (int k = 0; k < B; ++k) {
      if (k < cnt) v[k] = x[(c0 + k) * I];
    }
    // a strided batch is processed as one run; t / w are indexed from the base
#pragma unroll
    for (int k = 0; k < B; ++k) {
      if (k < cnt) {
        const acc_t a = kFast ? ld(v[k]) : kc.cap.value(ld(v[k]));
        if (kFast) {
          if (a > st.m) st.rebase(a);
          if (st.m > -std::numeric_limits<acc_t>::infinity()) st.s += dexp(a - st.m);
        } else {
          st.rebase(nan_max(st.m, a));
          st.add(a);
          if (kc.dot) {
            acc_t coef = kc.w ? kc.w[c0 + k] : acc_t(1);
            if (prob) coef = ce_prob_coef(ld(t[(c0 + k) * I]), coef, kc.eps1, kc.eps_c);
            st.add_dot(a, coef);
          }
        }
      }
    }
  }
  write_loss(p, prob, pos, y, x_y, st);
  return st;
}

template <typename T, bool kFast>
__global__ void __launch_bounds__(256) ce_fwd_inner_kernel(CeParams p, bool prob) {
  using acc_t = typename AccOf<T>::type;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= p.outer * p.inner) return;
  (void)fwd_position<T, kFast>(p, prob, pos, CeConsts<acc_t>(p, prob));
}

// Per-position backward coefficients: grad_c = (k p_c - b_c - [c == y] tc) cap'(x_c) with
// b_c = bs w_c (class-index smoothing) or g a_c (probabilities).
template <typename acc_t>
struct BwdCoef {
  acc_t hi, lo, g, k, bs, tc;
  int64_t y;
};

// lse: the position's (saved or just computed); a_prob: A for probability targets.
template <typename acc_t>
__device__ __forceinline__ BwdCoef<acc_t> bwd_coef(const CeParams& p, bool prob, int64_t o,
                                                   int64_t i, int64_t pos, double lse,
                                                   acc_t a_prob) {
  BwdCoef<acc_t> cf;
  split_lse(lse, cf.hi, cf.lo);  // a NaN lse makes every p_c (and so the gradient) NaN
  const int64_t g_at = o * p.grad_stride_outer + i * p.grad_stride_inner;
  cf.g = static_cast<const acc_t*>(p.grad)[g_at];
  const acc_t z = static_cast<acc_t>(p.z), eps = static_cast<acc_t>(p.eps);
  const acc_t eps_c = p.C > 0 ? static_cast<acc_t>(p.eps / p.C) : acc_t(0);
  cf.y = -1;
  cf.bs = cf.tc = acc_t(0);
  if (prob) {
    cf.k = ce_p_coef(cf.g, a_prob, z, lse);
    return cf;
  }
  const int64_t y = load_target(p, pos);
  if (y == p.ignore_index) {
    cf.k = acc_t(0);  // a zero gradient (NaN where the logits are, as torch)
    return cf;
  }
  if (y < 0 || y >= p.C) {
    report_bad_target(p, y);
    cf.hi = std::numeric_limits<acc_t>::quiet_NaN();
    cf.k = acc_t(0);
    return cf;
  }
  const acc_t* w = static_cast<const acc_t*>(p.weight);
  const acc_t w_y = w ? w[y] : acc_t(1);
  cf.k = ce_p_coef(cf.g, ce_index_a(w_y, weight_sum<acc_t>(p), eps, eps_c), z, lse);
  cf.bs = cf.g * eps_c;
  cf.tc = cf.g * (acc_t(1) - eps) * w_y;
  cf.y = y;
  return cf;
}

// One gradient element (class c, is_target: c == y); kFast: no soft-capping, no smoothing,
// class-index target.
template <bool kFast, typename T, typename acc_t>
__device__ __forceinline__ acc_t grad_element(const BwdCoef<acc_t>& cf, acc_t xv, int64_t c,
                                              bool is_target, const T* t_c, bool prob,
                                              const CeConsts<acc_t>& kc) {
  if (kFast) {
    const acc_t g = cf.k * dexp_minus(xv, cf.hi, cf.lo);
    return is_target ? g - cf.tc : g;
  }
  acc_t d;
  const acc_t xs = kc.cap.value_and_derivative(xv, d);
  const acc_t pr = dexp_minus(xs, cf.hi, cf.lo);
  acc_t b = acc_t(0);
  if (prob) {
    b = ce_prob_coef(ld(*t_c), cf.g * (kc.w ? kc.w[c] : acc_t(1)), kc.eps1, kc.eps_c);
  } else if (kc.smooth) {
    b = cf.bs * (kc.w ? kc.w[c] : acc_t(1));
  }
  if (is_target) b += cf.tc;
  return (cf.k * pr - b) * d;
}

// The gradient of the elements [begin, begin + n) of a row from its coefficients, visited by
// thread tid of nthr.
template <typename T, bool kFast, RowCache M = RowCache::kNone, typename acc_t>
__device__ __forceinline__ void bwd_run(const CeParams& p, bool prob, int64_t row, int64_t begin,
                                        int64_t n, int tid, int nthr, const CeConsts<acc_t>& kc,
                                        const BwdCoef<acc_t>& cf, const Pack<T>* cache) {
  const int64_t C = p.C;
  const T* x = static_cast<const T*>(p.x) + row * C + begin;
  T* out = static_cast<T*>(p.out) + row * C + begin;
  const T* t_run = prob ? static_cast<const T*>(p.prob) + row * C + begin : nullptr;
  row_foreach<T, M>(
      x, n, tid, nthr,
      [&](const T* vals, int count, int64_t c0) {
        acc_t xv[kVec<T>];
        ld_run(vals, count, xv);
        const int64_t rel = cf.y - begin - c0;  // the target's place in this run, if it is there
        const int r = rel >= 0 && rel < count ? static_cast<int>(rel) : -1;
        T res[kVec<T>];
#pragma unroll
        for (int k = 0; k < kVec<T>; ++k) {
          if (k < count) {
            res[k] = to_t<T>(grad_element<kFast>(cf, xv[k], begin + c0 + k, k == r,
                                                 t_run + c0 + k, prob, kc));
          }
        }
        store_pack(out + c0, res, count);
      },
      const_cast<Pack<T>*>(cache), p.cache_packs);
}

// The gradient of one row (slot.active) from its coefficients.
template <typename T, int GROUP, bool kFast, RowCache M = RowCache::kNone, typename acc_t>
__device__ __forceinline__ void bwd_row(const CeParams& p, bool prob, const RowSlot<GROUP>& slot,
                                        const CeConsts<acc_t>& kc, const BwdCoef<acc_t>& cf,
                                        const Pack<T>* cache = nullptr) {
  bwd_run<T, kFast, M>(p, prob, slot.row, 0, p.C, slot.tid, GROUP, kc, cf, cache);
}

// A backward launched to redo a gradient formed in the forward pass (p.skip_if_unit set) has
// nothing to do when the upstream gradient is 1: that gradient is already in p.out.
template <typename acc_t>
__device__ __forceinline__ bool unit_upstream(const CeParams& p) {
  return p.skip_if_unit != nullptr && *static_cast<const acc_t*>(p.skip_if_unit) == acc_t(1);
}

// A = sum_c w_c ((1-eps) t_c + eps/C) of a row with probability targets (0 otherwise), summed in
// one fixed order by every kernel that needs it, so that a gradient formed in the forward pass
// and one recomputed in a later backward are bit-identical. All threads of the group call it.
template <typename T, int GROUP, typename acc_t>
__device__ __forceinline__ acc_t row_a_prob(const CeParams& p, bool prob,
                                            const RowSlot<GROUP>& slot,
                                            const CeConsts<acc_t>& kc, acc_t* smem) {
  if (!prob) return acc_t(0);
  const int64_t C = p.C, n = slot.active ? C : 0;
  const T* t_row = static_cast<const T*>(p.prob) + (slot.active ? slot.row * C : 0);
  acc_t a = acc_t(0);
  for (int64_t c = slot.tid; c < n; c += GROUP) {
    a += ce_prob_coef(ld(t_row[c]), kc.w ? kc.w[c] : acc_t(1), kc.eps1, kc.eps_c);
  }
  return group_sum<GROUP>(a, smem);
}

template <typename T, int GROUP, bool kFast>
__global__ void __launch_bounds__(GROUP <= 32 ? 256 : GROUP) ce_bwd_rows_kernel(CeParams p, bool prob) {
  using acc_t = typename AccOf<T>::type;
  __shared__ acc_t smem[32];
  if (unit_upstream<acc_t>(p)) return;  // the same for every thread
  const RowSlot<GROUP> slot(p.outer);
  const CeConsts<acc_t> kc(p, prob);
  const acc_t a_prob = row_a_prob<T, GROUP>(p, prob, slot, kc, smem);
  if (!slot.active) return;  // no collective operation below
  const int64_t row = slot.row;
  const BwdCoef<acc_t> cf = bwd_coef<acc_t>(p, prob, row, 0, row, p.lse_in[row], a_prob);
  bwd_row<T, GROUP, kFast>(p, prob, slot, kc, cf);
}

// Forward and backward of a row in one kernel: the statistics pass reads the row, the gradient
// pass reads it again. With class-index targets a block-wide group (GROUP > 32: one row per
// block) keeps the row's first p.cache_packs packs in dynamic shared memory between the passes,
// so the second reads only the rest from global memory (L2, while the block still works on it);
// smaller groups, and probability targets (p.cache_packs = 0), re-read from L2.
template <typename T, int GROUP, bool kFast>
__global__ void __launch_bounds__(GROUP <= 32 ? 256 : GROUP) ce_fwdbwd_rows_kernel(CeParams p, bool prob) {
  using acc_t = typename AccOf<T>::type;
  constexpr RowCache kFill = GROUP > 32 ? RowCache::kFill : RowCache::kNone;
  constexpr RowCache kUse = GROUP > 32 ? RowCache::kUse : RowCache::kNone;
  __shared__ Stats<acc_t> smem[32];
  Pack<T>* cache = reinterpret_cast<Pack<T>*>(g_row_cache);
  const RowSlot<GROUP> slot(p.outer);
  const CeConsts<acc_t> kc(p, prob);
  const Stats<acc_t> st = fwd_row<T, GROUP, kFast, kFill>(p, prob, slot, kc, smem, cache);
  // A as the backward kernel sums it (not the forward's st.sa, summed in another order)
  const acc_t a_prob = row_a_prob<T, GROUP>(p, prob, slot, kc, reinterpret_cast<acc_t*>(smem));
  if (!slot.active) return;
  const double lse = lse_from_stats(st.m, dlog(st.s));  // as write_loss stored it
  const BwdCoef<acc_t> cf = bwd_coef<acc_t>(p, prob, slot.row, 0, slot.row, lse, a_prob);
  bwd_row<T, GROUP, kFast, kUse>(p, prob, slot, kc, cf, cache);
}

// Forward and backward of a wide row with class-index targets over a cluster of blocks (Hopper
// and later, float32 rows: cluster_plan): block `rank` of the row's cluster of K takes the slice
// [rank * slice, (rank + 1) * slice) of the row (the last one the rest), keeps it in its shared
// memory between the passes (up to p.cache_packs packs; the rest is read again), and the K
// partial statistics meet through distributed shared memory, merged by every block in rank order
// (so every block forms the same lse, the one block 0 stores). A row of 128 KB thus takes four
// blocks of 32 KB, several per multiprocessor, where one block holding the whole row would leave
// the multiprocessor waiting at each of its row's barriers.
constexpr int kClusterThreads = 256;

template <typename T, bool kFast>
__global__ void __launch_bounds__(kClusterThreads)
    ce_fwdbwd_cluster_kernel(CeParams p, int64_t slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using acc_t = typename AccOf<T>::type;
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int K = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row = blockIdx.x / K, C = p.C;
  const int64_t begin = std::min<int64_t>(rank * slice, C);
  const int64_t n = rank == K - 1 ? C - begin : std::min<int64_t>(slice, C - begin);
  __shared__ Stats<acc_t> smem[32];
  __shared__ Stats<acc_t> part;  // this block's statistics, read by the cluster
  Pack<T>* cache = reinterpret_cast<Pack<T>*>(g_row_cache);
  const CeConsts<acc_t> kc(p, false);
  const T* x = static_cast<const T*>(p.x) + row * C;
  int64_t y = p.ignore_index;
  acc_t x_y = acc_t(0);
  if (rank == 0 && tid == 0) {
    y = load_target(p, row);
    if (y >= 0 && y < C) x_y = kc.cap.value(ld(x[y]));
  }
  Stats<acc_t> st = run_stats<T, kFast, RowCache::kFill>(x, nullptr, begin, n, tid,
                                                         kClusterThreads, false, kc, cache,
                                                         p.cache_packs);
  st = group_reduce<kClusterThreads>(st, smem);
  if (tid == 0) part = st;
  cluster.sync();  // every block's part is written
  if (tid == 0) {
    Stats<acc_t> all = *cluster.map_shared_rank(&part, 0);
    for (int r = 1; r < K; ++r) all.merge(*cluster.map_shared_rank(&part, r));
    smem[0] = all;
  }
  __syncthreads();
  const Stats<acc_t> all = smem[0];
  cluster.barrier_arrive();  // this block has read the others' parts
  if (rank == 0 && tid == 0) write_loss(p, false, row, y, x_y, all);
  const double lse = lse_from_stats(all.m, dlog(all.s));  // as write_loss stored it
  const BwdCoef<acc_t> cf = bwd_coef<acc_t>(p, false, row, 0, row, lse, acc_t(0));
  bwd_run<T, kFast, RowCache::kUse>(p, false, row, begin, n, tid, kClusterThreads, kc, cf, cache);
  cluster.barrier_wait();  // no block leaves while another may still read its part
#endif
}

// A (as row_a_prob) of one position of [outer, C, inner] (inner > 1), in class order.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t position_a_prob(const CeParams& p, bool prob, int64_t o,
                                                 int64_t i, const CeConsts<acc_t>& kc) {
  if (!prob) return acc_t(0);
  const int64_t C = p.C, I = p.inner;
  const T* t = static_cast<const T*>(p.prob) + o * C * I + i;
  acc_t a = acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    a += ce_prob_coef(ld(t[c * I]), kc.w ? kc.w[c] : acc_t(1), kc.eps1, kc.eps_c);
  }
  return a;
}

// The gradient of one position of [outer, C, inner] (inner > 1).
template <typename T, bool kFast, typename acc_t>
__device__ __forceinline__ void bwd_position(const CeParams& p, bool prob, int64_t pos,
                                             const CeConsts<acc_t>& kc, const BwdCoef<acc_t>& cf) {
  constexpr int B = 8;
  const int64_t C = p.C, I = p.inner, o = pos / I, i = pos - o * I;
  const T* x = static_cast<const T*>(p.x) + o * C * I + i;
  T* out = static_cast<T*>(p.out) + o * C * I + i;
  const T* t = prob ? static_cast<const T*>(p.prob) + o * C * I + i : nullptr;
  for (int64_t c0 = 0; c0 < C; c0 += B) {
    T v[B];
    const int cnt = C - c0 < B ? static_cast<int>(C - c0) : B;
#pragma unroll
    for (int k = 0; k < B; ++k) {  // the whole batch is read before any of it is written
      if (k < cnt) v[k] = x[(c0 + k) * I];
    }
#pragma unroll
    for (int k = 0; k < B; ++k) {
      if (k < cnt) {
        const int64_t c = c0 + k;
        out[c * I] = to_t<T>(grad_element<kFast>(cf, ld(v[k]), c, c == cf.y,
                                                 prob ? t + c * I : nullptr, prob, kc));
      }
    }
  }
}

template <typename T, bool kFast>
__global__ void __launch_bounds__(256) ce_bwd_inner_kernel(CeParams p, bool prob) {
  using acc_t = typename AccOf<T>::type;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= p.outer * p.inner || unit_upstream<acc_t>(p)) return;
  const int64_t I = p.inner, o = pos / I, i = pos - o * I;
  const CeConsts<acc_t> kc(p, prob);
  const acc_t a_prob = position_a_prob<T>(p, prob, o, i, kc);
  const BwdCoef<acc_t> cf = bwd_coef<acc_t>(p, prob, o, i, pos, p.lse_in[pos], a_prob);
  bwd_position<T, kFast>(p, prob, pos, kc, cf);
}

template <typename T, bool kFast>
__global__ void __launch_bounds__(256) ce_fwdbwd_inner_kernel(CeParams p, bool prob) {
  using acc_t = typename AccOf<T>::type;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= p.outer * p.inner) return;
  const int64_t I = p.inner, o = pos / I, i = pos - o * I;
  const CeConsts<acc_t> kc(p, prob);
  const Stats<acc_t> st = fwd_position<T, kFast>(p, prob, pos, kc);
  const double lse = lse_from_stats(st.m, dlog(st.s));
  const BwdCoef<acc_t> cf =
      bwd_coef<acc_t>(p, prob, o, i, pos, lse, position_a_prob<T>(p, prob, o, i, kc));
  bwd_position<T, kFast>(p, prob, pos, kc, cf);
}

}  // namespace softmax_ce::cuda

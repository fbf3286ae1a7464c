// CUDA kernels of softmax_fwd / softmax_bwd over dim 1 of [outer, C, inner], and their launch.
// Rows: a group of threads per row (as the cross-entropy kernels): statistics in one pass, then
// the output in a second pass; a block-wide forward keeps its row in shared memory between the
// two (narrower rows are read again from L2). inner > 1: one thread per position. Raw pointers
// only; the bindings (softmax_cuda.cu) check the tensors.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_common.cuh"
#include "launch_config.cuh"

namespace softmax_ce::cuda {

struct SoftmaxParams {
  const void* x;     // forward input
  const void* y;     // backward: saved output
  const void* grad;  // backward: grad of y
  void* out;
  int64_t outer, C, inner;
  bool log;
  int64_t cache_packs;  // forward, block-wide rows: packs of a row kept in shared memory
};

template <typename acc_t>
__device__ __forceinline__ acc_t softmax_value(acc_t x, acc_t m, acc_t log_s, bool log) {
  const acc_t lp = (x - m) - log_s;
  return log ? lp : dexp(lp);
}

// Row statistics: the maximum (NaN-blind) and the sum of exp; NaN logits reach the sum.
template <typename T, typename acc_t>
__device__ __forceinline__ void softmax_accumulate(Stats<acc_t>& st, const T* vals, int count) {
  acc_t v[kVec<T>];
  ld_run(vals, count, v);
  add_run_fast<kVec<T>>(st, v, count);
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(GROUP <= 32 ? 256 : GROUP) softmax_fwd_rows_kernel(SoftmaxParams p) {
  using acc_t = typename AccOf<T>::type;
  __shared__ Stats<acc_t> smem[32];
  const RowSlot<GROUP> slot(p.outer);
  const int64_t C = p.C, n = slot.active ? C : 0, off = slot.active ? slot.row * C : 0;
  const int tid = slot.tid;
  const T* x = static_cast<const T*>(p.x) + off;
  T* out = static_cast<T*>(p.out) + off;
  constexpr RowCache kFill = GROUP > 32 ? RowCache::kFill : RowCache::kNone;
  constexpr RowCache kUse = GROUP > 32 ? RowCache::kUse : RowCache::kNone;
  Pack<T>* cache = reinterpret_cast<Pack<T>*>(g_row_cache);
  Stats<acc_t> st;
  st.init();
  row_foreach<T, kFill>(
      x, n, tid, GROUP,
      [&](const T* vals, int count, int64_t) { softmax_accumulate(st, vals, count); }, cache,
      p.cache_packs);
  st = group_reduce<GROUP>(st, smem);
  // a non-finite maximum (a row of -inf, or a +inf) makes the row NaN, as torch; NaN logits
  // already made the sum NaN
  const acc_t m = finite(st.m) ? st.m : std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t log_s = dlog(st.s);
  row_foreach<T, kUse>(
      x, n, tid, GROUP,
      [&](const T* vals, int count, int64_t c0) {
        acc_t v[kVec<T>];
        ld_run(vals, count, v);
        T res[kVec<T>];
#pragma unroll
        for (int k = 0; k < kVec<T>; ++k) {
          if (k < count) res[k] = to_t<T>(softmax_value(v[k], m, log_s, p.log));
        }
        store_pack(out + c0, res, count);
      },
      cache, p.cache_packs);
}

// softmax: gx = y (g - <g, y>);  log_softmax: gx = g - exp(y) sum(g).
template <typename T, int GROUP>
__global__ void __launch_bounds__(GROUP <= 32 ? 256 : GROUP) softmax_bwd_rows_kernel(SoftmaxParams p) {
  using acc_t = typename AccOf<T>::type;
  __shared__ acc_t smem[32];
  const RowSlot<GROUP> slot(p.outer);
  const int64_t C = p.C, n = slot.active ? C : 0, off = slot.active ? slot.row * C : 0;
  const int tid = slot.tid;
  const T* y = static_cast<const T*>(p.y) + off;
  const T* g = static_cast<const T*>(p.grad) + off;
  T* out = static_cast<T*>(p.out) + off;
  acc_t s = acc_t(0);
  row_foreach<T>(y, n, tid, GROUP, [&](const T* vals, int count, int64_t c0) {
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) {
      if (k < count) {
        const acc_t gv = ld(g[c0 + k]);
        s += p.log ? gv : gv * ld(vals[k]);
      }
    }
  });
  s = group_sum<GROUP>(s, smem);
  row_foreach<T>(y, n, tid, GROUP, [&](const T* vals, int count, int64_t c0) {
    T res[kVec<T>];
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) {
      if (k < count) {
        const acc_t yv = ld(vals[k]), gv = ld(g[c0 + k]);
        res[k] = to_t<T>(p.log ? gv - dexp(yv) * s : yv * (gv - s));
      }
    }
    store_pack(out + c0, res, count);
  });
}

template <typename T>
__global__ void __launch_bounds__(256) softmax_fwd_inner_kernel(SoftmaxParams p) {
  using acc_t = typename AccOf<T>::type;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= p.outer * p.inner) return;
  const int64_t C = p.C, I = p.inner, o = pos / I, base = o * C * I + (pos - o * I);
  const T* x = static_cast<const T*>(p.x) + base;
  T* out = static_cast<T*>(p.out) + base;
  Stats<acc_t> st;
  st.init();
  for (int64_t c = 0; c < C; ++c) {
    const T v = x[c * I];
    softmax_accumulate(st, &v, 1);
  }
  const acc_t m = finite(st.m) ? st.m : std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t log_s = dlog(st.s);
  for (int64_t c = 0; c < C; ++c) {
    out[c * I] = to_t<T>(softmax_value(ld(x[c * I]), m, log_s, p.log));
  }
}

template <typename T>
__global__ void __launch_bounds__(256) softmax_bwd_inner_kernel(SoftmaxParams p) {
  using acc_t = typename AccOf<T>::type;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= p.outer * p.inner) return;
  const int64_t C = p.C, I = p.inner, o = pos / I, base = o * C * I + (pos - o * I);
  const T* y = static_cast<const T*>(p.y) + base;
  const T* g = static_cast<const T*>(p.grad) + base;
  T* out = static_cast<T*>(p.out) + base;
  acc_t s = acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t gv = ld(g[c * I]);
    s += p.log ? gv : gv * ld(y[c * I]);
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t yv = ld(y[c * I]), gv = ld(g[c * I]);
    out[c * I] = to_t<T>(p.log ? gv - dexp(yv) * s : yv * (gv - s));
  }
}

template <typename T, bool kBackward>
void launch(const SoftmaxParams& p_in, cudaStream_t stream) {
  SoftmaxParams p = p_in;
  p.cache_packs = 0;
  if (p.outer == 0 || p.inner == 0 || p.C == 0) return;
  if (p.inner != 1) {
    const int64_t blocks = (p.outer * p.inner + 255) / 256;
    if (kBackward) {
      softmax_bwd_inner_kernel<T><<<blocks, 256, 0, stream>>>(p);
    } else {
      softmax_fwd_inner_kernel<T><<<blocks, 256, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto go = [&](auto group_c) {
    constexpr int G = decltype(group_c)::value;
    constexpr int threads = RowSlot<G>::kThreads;
    const int64_t blocks = (p.outer + RowSlot<G>::kRows - 1) / RowSlot<G>::kRows;
    if (kBackward) {
      softmax_bwd_rows_kernel<T, G><<<blocks, threads, 0, stream>>>(p);
    } else {
      size_t smem = 0;
      if (G > 32) {
        p.cache_packs = row_cache_packs<T>(
            p.C, reinterpret_cast<const void*>(softmax_fwd_rows_kernel<T, G>), &smem);
      }
      softmax_fwd_rows_kernel<T, G><<<blocks, threads, smem, stream>>>(p);
    }
  };
  switch (kBackward ? row_group(p.C, kVec<T>) : row_group_fused(p.C, kVec<T>)) {
    case 4:
      go(std::integral_constant<int, 4>{});
      break;
    case 32:
      go(std::integral_constant<int, 32>{});
      break;
    case 256:
      go(std::integral_constant<int, 256>{});
      break;
    default:
      go(std::integral_constant<int, 1024>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace softmax_ce::cuda

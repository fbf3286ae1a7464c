// Device helpers shared by the CUDA kernels: accumulation types, 16-byte vector access with
// alignment handling, NaN-aware online softmax statistics and their warp/block reductions.
// Device code only; the host's launch configuration is in launch_config.cuh.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../common/row_math.h"

namespace softmax_ce::cuda {

// Elements of T per 16-byte load.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

// Loads and stores in the accumulation type, with the hardware conversions for bf16 / fp16.
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type ld(T v) {
  return static_cast<typename AccOf<T>::type>(v);
}
template <>
__device__ __forceinline__ float ld<c10::BFloat16>(c10::BFloat16 v) {
  return __bfloat162float(__ushort_as_bfloat16(v.x));
}
template <>
__device__ __forceinline__ float ld<c10::Half>(c10::Half v) {
  return __half2float(__ushort_as_half(v.x));
}

// out[k] = ld(vals[k]) for k < count, where a whole pack (count == kVec) is 16-byte aligned.
// bf16 packs convert two values per 32-bit word with one instruction each (a shift for the low
// half, a mask for the high half) instead of extracting every 16-bit value first.
template <typename T>
__device__ __forceinline__ void ld_run(const T* vals, int count, typename AccOf<T>::type* out) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (count == kVec<T>) {
      const uint32_t* w = reinterpret_cast<const uint32_t*>(vals);
#pragma unroll
      for (int k = 0; k < kVec<T> / 2; ++k) {
        out[2 * k] = __uint_as_float(w[k] << 16);
        out[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
      }
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) {
    if (k < count) out[k] = ld(vals[k]);
  }
}

template <typename T>
__device__ __forceinline__ T to_t(typename AccOf<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ c10::BFloat16 to_t<c10::BFloat16>(float v) {
  return c10::BFloat16(__bfloat16_as_ushort(__float2bfloat16_rn(v)), c10::BFloat16::from_bits());
}
template <>
__device__ __forceinline__ c10::Half to_t<c10::Half>(float v) {
  return c10::Half(__half_as_ushort(__float2half_rn(v)), c10::Half::from_bits());
}

template <typename acc_t>
__device__ __forceinline__ acc_t dexp(acc_t x);
// 2^x on the special-function unit, results below 2^-126 flushed to zero: __expf without -ftz
// adds three instructions per element to keep such subnormal results, which no sum of
// exponentials here can feel (the row's maximum contributes 1) and which differ from a
// probability by less than 2^-126. 2^-inf = 0, 2^inf = inf, NaN stays NaN.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLog2e = 1.4426950408889634f;

template <>
__device__ __forceinline__ float dexp<float>(float x) {
  return ex2_ftz(x * kLog2e);
}
template <>
__device__ __forceinline__ double dexp<double>(double x) {
  return exp(x);
}

// exp(x - hi - lo) for an lse split into hi + lo (split_lse): in float one subtraction, one
// fused multiply-add and the exponential (lo log2 e is a per-row constant).
template <typename acc_t>
__device__ __forceinline__ acc_t dexp_minus(acc_t x, acc_t hi, acc_t lo) {
  return dexp((x - hi) - lo);
}
template <>
__device__ __forceinline__ float dexp_minus<float>(float x, float hi, float lo) {
  return ex2_ftz(fmaf(x - hi, kLog2e, -lo * kLog2e));
}

template <typename acc_t>
__device__ __forceinline__ acc_t dlog(acc_t x) {
  return sce_log(x);
}

template <typename acc_t>
__device__ __forceinline__ bool finite(acc_t v) {
  return v == v && v != std::numeric_limits<acc_t>::infinity() &&
         v != -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || b != b) ? std::numeric_limits<acc_t>::quiet_NaN() : (a > b ? a : b);
}

// Online statistics of a set of (capped) logits x with coefficients a:
//   m = max x (NaN-propagating), s = sum exp(x - r), d = sum a (r - x), sa = sum a,
// with the reference r = m when m is finite and 0 otherwise (so -inf logits contribute
// a * inf to d, as torch's -a log p does, and no exp(-inf - -inf) is ever formed).
template <typename acc_t>
struct Stats {
  acc_t m, s, d, sa;
  __device__ __forceinline__ void init() {
    m = -std::numeric_limits<acc_t>::infinity();
    s = d = sa = acc_t(0);
  }
  __device__ __forceinline__ acc_t ref() const { return finite(m) ? m : acc_t(0); }
  // Move to a new maximum mn >= m (or NaN).
  __device__ __forceinline__ void rebase(acc_t mn) {
    if (mn == m) return;
    const acc_t r_old = ref();
    const acc_t r_new = finite(mn) ? mn : acc_t(0);
    s = finite(m) ? s * dexp(m - mn) : acc_t(0);
    d += sa * (r_new - r_old);
    m = mn;
  }
  __device__ __forceinline__ void add(acc_t v) {
    if (finite(m)) s += dexp(v - m);
  }
  __device__ __forceinline__ void add_dot(acc_t v, acc_t coef) {
    d += coef * (ref() - v);
    sa += coef;
  }
  __device__ __forceinline__ void merge(const Stats& o) {
    const acc_t mn = nan_max(m, o.m);
    Stats b = o;
    rebase(mn);
    b.rebase(mn);
    s += b.s;
    d += b.d;
    sa += b.sa;
  }
};

// Statistics of a run of `count` (<= N) values without coefficients: a max, then one exp per
// element. NaN values reach the sum (exp(NaN) = NaN) rather than the maximum, which is NaN-blind.
template <int N, typename acc_t>
__device__ __forceinline__ void add_run_fast(Stats<acc_t>& st, const acc_t* v, int count) {
  acc_t vm = v[0];
#pragma unroll
  for (int k = 1; k < N; ++k) {
    if (k < count) vm = fmax(vm, v[k]);
  }
  if (vm > st.m) st.rebase(vm);
  if (st.m > -std::numeric_limits<acc_t>::infinity()) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < count) st.s += dexp(v[k] - st.m);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t shfl_xor(acc_t v, int offset, int width) {
  return __shfl_xor_sync(0xffffffffu, v, offset, width);
}

// The row of [outer, C] a thread of a row kernel works on: GROUP threads per row, GROUP <= 32
// being part of a warp (kRows rows per 256-thread block), GROUP > 32 the whole block.
template <int GROUP>
struct RowSlot {
  static constexpr int kThreads = GROUP <= 32 ? 256 : GROUP;
  static constexpr int kRows = GROUP <= 32 ? 256 / GROUP : 1;
  int tid;
  int64_t row;
  bool active;
  __device__ __forceinline__ explicit RowSlot(int64_t outer) {
    const int t = static_cast<int>(threadIdx.x);
    tid = GROUP <= 32 ? t % GROUP : t;
    row = static_cast<int64_t>(blockIdx.x) * kRows + (GROUP <= 32 ? t / GROUP : 0);
    active = row < outer;
  }
};

// Reduce Stats over a group of GROUP threads (power of two). GROUP <= 32: the group is part of a
// warp; GROUP > 32: the group is the whole block (blockDim.x == GROUP), via shared memory.
// Every thread of the group gets the result. All threads of a warp must call it.
template <int GROUP, typename acc_t>
__device__ __forceinline__ Stats<acc_t> group_reduce(Stats<acc_t> st, Stats<acc_t>* smem) {
  constexpr int W = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) {
    Stats<acc_t> o;
    o.m = shfl_xor(st.m, off, W);
    o.s = shfl_xor(st.s, off, W);
    o.d = shfl_xor(st.d, off, W);
    o.sa = shfl_xor(st.sa, off, W);
    st.merge(o);
  }
  if constexpr (GROUP > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) smem[warp] = st;
    __syncthreads();
    if (warp == 0) {
      if (lane < GROUP / 32) {
        st = smem[lane];
      } else {
        st.init();
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        Stats<acc_t> o;
        o.m = shfl_xor(st.m, off, 32);
        o.s = shfl_xor(st.s, off, 32);
        o.d = shfl_xor(st.d, off, 32);
        o.sa = shfl_xor(st.sa, off, 32);
        st.merge(o);
      }
      if (lane == 0) smem[0] = st;
    }
    __syncthreads();
    st = smem[0];
    __syncthreads();  // smem is reused by the caller
  }
  return st;
}

template <int GROUP, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, acc_t* smem) {
  constexpr int W = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) v += shfl_xor(v, off, W);
  if constexpr (GROUP > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
      v = lane < GROUP / 32 ? smem[lane] : acc_t(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += shfl_xor(v, off, 32);
      if (lane == 0) smem[0] = v;
    }
    __syncthreads();
    v = smem[0];
    __syncthreads();
  }
  return v;
}

// Visit the elements [0, n) of a row split over `nthr` threads: an unaligned head element by
// element, then 16-byte packs, then the tail; f(const T* vals, int count, int64_t c0). Packs are
// loaded kUnroll at a time before any is processed, so that several loads per thread are in
// flight (a visit may store to the row it reads: the batch is read before anything is written).
//
// A row read twice (statistics, then outputs) can keep its first `cache_packs` packs in shared
// memory: the first pass (kFill) copies them to `cache`, the second (kUse) reads them from there
// and only the rest from global memory. A pack is visited by the same thread in every pass with
// the same (n, tid, nthr), so a thread reads back only what it stored itself: no barrier needed.
constexpr int kUnroll = 4;

enum class RowCache { kNone, kFill, kUse };

template <typename T, RowCache M = RowCache::kNone, typename F>
__device__ __forceinline__ void row_foreach(const T* row, int64_t n, int tid, int nthr, F&& f,
                                            Pack<T>* cache = nullptr, int64_t cache_packs = 0) {
  constexpr int V = kVec<T>;
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % V);
  const int64_t head = mis ? (V - mis < n ? V - mis : n) : 0;
  for (int64_t c = tid; c < head; c += nthr) {
    const T v = row[c];
    f(&v, 1, c);
  }
  const int64_t nvec = (n - head) / V;
  const Pack<T>* packs = reinterpret_cast<const Pack<T>*>(row + head);
  auto load = [&](int64_t j) -> Pack<T> {
    if (M == RowCache::kUse && j < cache_packs) return cache[j];
    return packs[j];
  };
  auto keep = [&](int64_t j, const Pack<T>& v) {
    if (M == RowCache::kFill && j < cache_packs) cache[j] = v;
  };
  int64_t i = tid;
  for (; i + (kUnroll - 1) * static_cast<int64_t>(nthr) < nvec; i += kUnroll * nthr) {
    Pack<T> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) p[u] = load(i + u * nthr);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) keep(i + u * nthr, p[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) f(p[u].v, V, head + (i + u * nthr) * V);
  }
  for (; i < nvec; i += nthr) {
    const Pack<T> p = load(i);
    keep(i, p);
    f(p.v, V, head + i * V);
  }
  for (int64_t c = head + nvec * V + tid; c < n; c += nthr) {
    const T v = row[c];
    f(&v, 1, c);
  }
}

// Store `count` values at dst: one 16-byte store for a whole pack where dst is 16-byte aligned,
// element by element otherwise. Outputs are plain contiguous tensors (storage offset 0, as their
// fake kernels say), so an input that carries a storage offset (a slice) has its packs at other
// addresses than the output's: those stores take the element path.
template <typename T>
__device__ __forceinline__ void store_pack(T* dst, const T* vals, int count) {
  if (count == kVec<T> && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    Pack<T> p;
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) p.v[k] = vals[k];
    *reinterpret_cast<Pack<T>*>(dst) = p;
  } else {
    for (int k = 0; k < count; ++k) dst[k] = vals[k];
  }
}

// The dynamic shared memory of the kernels that keep a row between two passes.
extern __shared__ __align__(16) unsigned char g_row_cache[];

}  // namespace softmax_ce::cuda

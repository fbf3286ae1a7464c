// The host side of the row kernels' launches: threads per row and the shared-memory row cache
// (its budget, and the attribute that lets a kernel use it). Host code only, no tensors.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include "device_common.cuh"  // kVec

namespace softmax_ce::cuda {

// Threads per row: a few for narrow rows, a warp up to ~256 packs, then a block.
inline int row_group(int64_t C, int vec) {
  const int64_t packs = (C + vec - 1) / vec;
  if (packs <= 8) return 4;
  if (packs <= 512) return 32;
  if (packs <= 16384) return 256;
  return 1024;
}

// Shared memory a block-wide row kernel may use to keep its row between two passes (the fused
// cross-entropy forward+backward, softmax's forward): the device's opt-in maximum less a margin
// for static shared memory, or SOFTMAX_CE_CUDA_ROW_CACHE_KB (0: none), an experiment switch for
// the GPU check script.
inline int64_t row_cache_budget() {
  static const int64_t env_kb = [] {
    const char* v = std::getenv("SOFTMAX_CE_CUDA_ROW_CACHE_KB");
    return v && *v ? std::atoll(v) : int64_t(-1);
  }();
  const int64_t optin =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const int64_t budget = std::max<int64_t>(0, optin - 2048);
  return env_kb >= 0 ? std::min(budget, env_kb * 1024) : budget;
}

// Lets a kernel use the whole row-cache budget of dynamic shared memory (above the default
// 48 KB), once per kernel and device, so that launches inside a CUDA-graph capture (after the
// usual warm-up) make no such call.
inline void allow_dynamic_smem(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, device})) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(row_cache_budget())));
  done.insert({kernel, device});
}

// Threads per row of a kernel that keeps its row in shared memory: as row_group for narrow rows;
// a block of 256 up to 64 KB rows (several blocks per SM, each with its row), then 1024.
inline int row_group_fused(int64_t C, int vec) {
  const int64_t packs = (C + vec - 1) / vec;
  if (packs <= 512) return row_group(C, vec);
  return packs <= 4096 ? 256 : 1024;
}

// The shared-memory row cache of a block-wide row kernel for rows of C elements: the packs it
// keeps (the whole row, or what the budget allows) and, in *smem, the bytes to launch with.
template <typename T>
inline int64_t row_cache_packs(int64_t C, const void* kernel, size_t* smem) {
  const int64_t packs = std::min<int64_t>(C / kVec<T>, row_cache_budget() / 16);
  *smem = static_cast<size_t>(packs) * 16;
  if (*smem > 48 * 1024) allow_dynamic_smem(kernel);
  return packs;
}

// A wide row's split over a cluster of blocks (the fused cross-entropy forward+backward on
// Hopper and later): `blocks` per row (1: no cluster) and each block's slice, in elements (a
// whole number of packs).
struct ClusterPlan {
  int blocks;
  int64_t slice;
};

// Rows wider than one slice (32 KB, or SOFTMAX_CE_CUDA_CLUSTER_SLICE_KB) go to a cluster of the
// power of two of blocks that gives slices of at most that size, up to 8 (the portable cluster
// size; or SOFTMAX_CE_CUDA_CLUSTER, 0 or 1: none), the last two experiment switches for the GPU
// check script. Wider rows than 8 slices take 8 larger slices. float32 rows only, as measured
// (H200, docs/bench-history/2026-11-29-gpu-h200.md): (8192, 32000) float32 0.81 -> 0.69 ms;
// bfloat16 rows were slower in clusters ((8192, 32000) 0.44 -> 0.50 ms, (4096, 128256) 0.93 ->
// 0.96 ms) and keep one block per row; float64 was not measured.
inline ClusterPlan cluster_plan(int64_t C, int elem_size, int vec, int64_t outer) {
  static const int max_blocks = [] {
    const char* v = std::getenv("SOFTMAX_CE_CUDA_CLUSTER");
    return v && *v ? std::clamp(std::atoi(v), 1, 8) : 8;
  }();
  static const int64_t slice_bytes = [] {
    const char* v = std::getenv("SOFTMAX_CE_CUDA_CLUSTER_SLICE_KB");
    return v && *v ? std::max<int64_t>(1, std::atoll(v)) * 1024 : int64_t(32 * 1024);
  }();
  const ClusterPlan none{1, C};
  if (elem_size != 4 || max_blocks < 2 || at::cuda::getCurrentDeviceProperties()->major < 9) {
    return none;
  }
  if (C * elem_size <= slice_bytes) return none;
  int k = 2;
  while (k < max_blocks && k * slice_bytes < C * elem_size) k *= 2;
  if (outer > (int64_t(1) << 31) / k - 1) return none;  // grid of outer * k blocks
  const int64_t packs = (C + vec - 1) / vec;
  return {k, (packs + k - 1) / k * vec};
}

// The shared-memory cache of a slice of `packs` packs: what the budget allows; bytes in *smem.
inline int64_t slice_cache_packs(int64_t packs, const void* kernel, size_t* smem) {
  const int64_t kept = std::min<int64_t>(packs, row_cache_budget() / 16);
  *smem = static_cast<size_t>(kept) * 16;
  if (*smem > 48 * 1024) allow_dynamic_smem(kernel);
  return kept;
}

// The launch configuration of a 1-D grid of `grid` blocks of `threads` threads in clusters of
// `blocks`, with `smem` bytes of dynamic shared memory; *attr holds its cluster attribute.
inline cudaLaunchConfig_t cluster_config(int64_t grid, int threads, int blocks, size_t smem,
                                         cudaStream_t stream, cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = blocks;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether a cluster of `blocks` blocks of `threads` threads and `smem` bytes of dynamic shared
// memory can run on this device (asked once per kernel, device and shape).
inline bool cluster_fits(const void* kernel, int blocks, int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, int, size_t>, bool> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(kernel, device, blocks, threads, smem);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(blocks, threads, blocks, smem, nullptr, &attr);
  int clusters = 0;
  const bool fits = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess &&
                    clusters > 0;
  (void)cudaGetLastError();  // a refusal is an answer, not a pending error
  known[key] = fits;
  return fits;
}

// Launches kernel on a 1-D grid of `grid` blocks in clusters of `blocks`.
template <typename... Params, typename... Args>
inline void launch_cluster(void (*kernel)(Params...), int64_t grid, int threads, int blocks,
                           size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(grid, threads, blocks, smem, stream, &attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

}  // namespace softmax_ce::cuda

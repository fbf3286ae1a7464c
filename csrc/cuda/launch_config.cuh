// The host side of the row kernels' launches: threads per row and the shared-memory row cache
// (its budget, and the attribute that lets a kernel use it). Host code only, no tensors.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <set>
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

}  // namespace softmax_ce::cuda

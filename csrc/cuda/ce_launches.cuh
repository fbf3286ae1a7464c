// The host side of the cross-entropy kernels (ce_kernels.cuh): the launch configuration of the
// row and inner kernels for one dtype. Included once per dtype by ce_cuda_<dtype>.cu, which
// instantiates launch<T>.
#pragma once

#include "ce_kernels.cuh"

namespace softmax_ce::cuda {

template <typename T, bool kFast>
void launch_rows(const CeParams& p_in, bool prob, Pass pass, cudaStream_t stream) {
  CeParams p = p_in;
  p.cache_packs = 0;
  auto go = [&](auto group_c) {
    constexpr int G = decltype(group_c)::value;
    constexpr int threads = RowSlot<G>::kThreads;
    const int64_t blocks = (p.outer + RowSlot<G>::kRows - 1) / RowSlot<G>::kRows;
    switch (pass) {
      case Pass::kForward:
        return ce_fwd_rows_kernel<T, G, kFast><<<blocks, threads, 0, stream>>>(p, prob);
      case Pass::kBackward:
        return ce_bwd_rows_kernel<T, G, kFast><<<blocks, threads, 0, stream>>>(p, prob);
      case Pass::kBoth: {
        size_t smem = 0;
        if (G > 32 && !prob) {
          p.cache_packs = row_cache_packs<T>(
              p.C, reinterpret_cast<const void*>(ce_fwdbwd_rows_kernel<T, G, kFast>), &smem);
        }
        return ce_fwdbwd_rows_kernel<T, G, kFast><<<blocks, threads, smem, stream>>>(p, prob);
      }
    }
  };
  if (pass == Pass::kBoth && !prob) {
    const ClusterPlan plan = cluster_plan(p.C, sizeof(T), kVec<T>, p.outer);
    if (plan.blocks > 1) {
      auto kernel = ce_fwdbwd_cluster_kernel<T, kFast>;
      size_t smem = 0;
      p.cache_packs = slice_cache_packs(plan.slice / kVec<T>, reinterpret_cast<const void*>(kernel),
                                        &smem);
      if (cluster_fits(reinterpret_cast<const void*>(kernel), plan.blocks, kClusterThreads, smem)) {
        launch_cluster(kernel, p.outer * plan.blocks, kClusterThreads, plan.blocks, smem, stream,
                       p, plan.slice);
        return;
      }
      p.cache_packs = 0;
    }
  }
  // Probability targets keep the backward's group size (and so its order of summing A): a
  // gradient formed in the forward pass equals, bit for bit, one recomputed by a later backward
  // (gradcheck's reentrancy check); their rows are re-read from L2 instead of shared memory.
  const bool cached = pass == Pass::kBoth && !prob;
  switch (cached ? row_group_fused(p.C, kVec<T>) : row_group(p.C, kVec<T>)) {
    case 4:
      return go(std::integral_constant<int, 4>{});
    case 32:
      return go(std::integral_constant<int, 32>{});
    case 256:
      return go(std::integral_constant<int, 256>{});
    default:
      return go(std::integral_constant<int, 1024>{});
  }
}

template <typename T, bool kFast>
void launch_inner(const CeParams& p, bool prob, Pass pass, cudaStream_t stream) {
  const int64_t blocks = (p.outer * p.inner + 255) / 256;
  switch (pass) {
    case Pass::kForward:
      return ce_fwd_inner_kernel<T, kFast><<<blocks, 256, 0, stream>>>(p, prob);
    case Pass::kBackward:
      return ce_bwd_inner_kernel<T, kFast><<<blocks, 256, 0, stream>>>(p, prob);
    case Pass::kBoth:
      return ce_fwdbwd_inner_kernel<T, kFast><<<blocks, 256, 0, stream>>>(p, prob);
  }
}

template <typename T>
void launch(const CeParams& p, bool prob, Pass pass, cudaStream_t stream) {
  if (p.outer == 0 || p.inner == 0) return;
  const bool fast = !prob && p.softcap <= 0 && p.eps <= 0;
  if (p.inner == 1) {
    if (fast) {
      launch_rows<T, true>(p, prob, pass, stream);
    } else {
      launch_rows<T, false>(p, prob, pass, stream);
    }
  } else {
    if (fast) {
      launch_inner<T, true>(p, prob, pass, stream);
    } else {
      launch_inner<T, false>(p, prob, pass, stream);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace softmax_ce::cuda

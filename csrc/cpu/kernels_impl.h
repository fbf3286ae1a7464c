// CPU kernels, written once against at::vec::Vectorized and compiled once per instruction set
// by isa_default.cpp / isa_avx2.cpp / isa_avx512.cpp (each sets CPU_CAPABILITY and its target
// before including this file). Everything here lives in the ISA's own namespace (SCE_ISA_NS),
// so the three copies never collide. Kernels see raw pointers only (kernels.h).
//
// Memory traffic: a forward reads each logit once (rows are processed in L1-sized chunks with
// an online max/sum across chunks); a backward reads each logit once and writes the gradient
// once; the fused forward+backward does both in one pass over memory, rows with one exponential
// per logit (ce_fused.h). Rows of few classes are computed across rows (ce_narrow.h).
// Arithmetic is in float for float/bf16/fp16 and in double for double.
#pragma once

#ifndef SCE_ISA_NS
#error "kernels_impl.h is included by the isa_*.cpp files only"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/row_math.h"
#include "kernels.h"

namespace softmax_ce::cpu {
namespace SCE_ISA_NS {

using at::vec::Vectorized;

int64_t block_lanes(Dtype dtype) {
  return dtype == Dtype::f64 ? 2 * Vectorized<double>::size() : 2 * Vectorized<float>::size();
}

// One topic per header (csrc/cpu/kernels/), in dependency order.
#include "kernels/vec_math.h"
#include "kernels/row_stats.h"
#include "kernels/ce_forward.h"
#include "kernels/ce_backward.h"
#include "kernels/ce_narrow.h"
#include "kernels/ce_fused.h"
#include "kernels/ce_dispatch.h"
#include "kernels/softmax.h"
#include "kernels/sigmoid.h"

}  // namespace SCE_ISA_NS

const KernelTable& SCE_ISA_TABLE() {
  static const KernelTable table = {
      SCE_ISA_NAME,
      &SCE_ISA_NS::block_lanes,
      &SCE_ISA_NS::ce_fwd,
      &SCE_ISA_NS::ce_bwd,
      &SCE_ISA_NS::ce_prob_fwd,
      &SCE_ISA_NS::ce_prob_bwd,
      &SCE_ISA_NS::ce_fwd_bwd,
      &SCE_ISA_NS::ce_prob_fwd_bwd,
      &SCE_ISA_NS::softmax_fwd,
      &SCE_ISA_NS::softmax_bwd,
      &SCE_ISA_NS::sigmoid_fwd,
      &SCE_ISA_NS::sigmoid_bwd,
  };
  return table;
}

}  // namespace softmax_ce::cpu

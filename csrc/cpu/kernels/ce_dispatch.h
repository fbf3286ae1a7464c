// Runtime options (dtype, capping, target kind, weight) -> the kernels' template
// instantiations, and the cross-entropy entries of the kernel table.
// Part of the CPU kernels: included by kernels_impl.h inside the ISA's namespace (SCE_ISA_NS),
// once per instruction set, after the headers it needs; it includes nothing itself.
#pragma once

#ifndef SCE_ISA_NS
#error "csrc/cpu/kernels/*.h are included by kernels_impl.h only"
#endif

// Runtime options -> template instantiation.
template <typename T, template <typename, bool, Dot, bool> class Kernel>
struct CeDispatch {
  template <Dot kDot>
  static Status with_dot(const CeArgs& a, bool cap, bool w, int64_t begin, int64_t end) {
    if (cap) {
      return w ? Kernel<T, true, kDot, true>::run(a, begin, end)
               : Kernel<T, true, kDot, false>::run(a, begin, end);
    }
    return w ? Kernel<T, false, kDot, true>::run(a, begin, end)
             : Kernel<T, false, kDot, false>::run(a, begin, end);
  }
  static Status run(const CeArgs& a, bool prob, int64_t begin, int64_t end) {
    const bool cap = a.softcap > 0, w = a.weight != nullptr;
    if (prob) return with_dot<Dot::kProbabilities>(a, cap, w, begin, end);
    if (a.eps > 0) return with_dot<Dot::kSmoothing>(a, cap, w, begin, end);
    return with_dot<Dot::kNone>(a, cap, w, begin, end);
  }
};

template <template <typename, bool, Dot, bool> class Kernel>
Status ce_dispatch_dtype(const CeArgs& a, bool prob, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case Dtype::f64:
      return CeDispatch<double, Kernel>::run(a, prob, begin, end);
    case Dtype::f32:
      return CeDispatch<float, Kernel>::run(a, prob, begin, end);
    case Dtype::bf16:
      return CeDispatch<c10::BFloat16, Kernel>::run(a, prob, begin, end);
    case Dtype::f16:
      return CeDispatch<c10::Half, Kernel>::run(a, prob, begin, end);
  }
  return {};
}

Status ce_fwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<FwdKernel>(a, false, b, e);
}
Status ce_bwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<BwdKernel>(a, false, b, e);
}
Status ce_prob_fwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<FwdKernel>(a, true, b, e);
}
Status ce_prob_bwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<BwdKernel>(a, true, b, e);
}
Status ce_fwd_bwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<FusedKernel>(a, false, b, e);
}
Status ce_prob_fwd_bwd(const CeArgs& a, int64_t b, int64_t e) {
  return ce_dispatch_dtype<FusedKernel>(a, true, b, e);
}

#include "bindings.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace softmax_ce::cpu {

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.dim() == 3, "softmax_ce: argument '", name,
              "' must be [outer, C, inner] (3-D), got ", logits.dim(), "-D");
  TORCH_CHECK(logits.device().is_cpu(), "softmax_ce: argument '", name, "' must be on the CPU");
  (void)to_dtype(logits, name);
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096;
  constexpr size_t kMinBytes = size_t(4) << 20;
  if (out.nbytes() >= kMinBytes) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(out.data_ptr()) + kPage - 1) & ~(kPage - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(out.data_ptr()) + out.nbytes()) & ~(kPage - 1);
    if (end > begin) {
      // Advice only: if the kernel refuses (THP disabled), 4 KB pages serve as before.
      (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
    }
  }
#endif
  return out;
}

int64_t work_units(int64_t outer, int64_t inner, int64_t lanes) {
  return inner == 1 ? outer : outer * ((inner + lanes - 1) / lanes);
}

void run_ce(CeFn fn, const CeArgs& args, int64_t lanes) {
  const int64_t units = work_units(args.outer, args.inner, lanes);
  if (units == 0) return;
  const int64_t per_unit = std::max<int64_t>(1, args.C * (args.inner == 1 ? 1 : lanes));
  const int64_t grain = std::max<int64_t>(1, 32768 / per_unit);
  std::atomic<bool> bad{false};
  std::atomic<int64_t> value{0};
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    const Status s = fn(args, begin, end);
    if (s.bad_target && !bad.exchange(true)) value = s.value;
  });
  TORCH_CHECK_INDEX(!bad.load(), "Target ", value.load(),
                    " is out of bounds: argument 'target' must hold class indices in [0, ",
                    args.C, ") or ignore_index (", args.ignore_index, ").");
}

}  // namespace softmax_ce::cpu

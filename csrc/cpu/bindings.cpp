#include "bindings.h"

#include <c10/util/accumulate.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

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

namespace {

// A small cache of large output buffers. The one N x C output of a backward (the gradient) and
// the outputs of softmax are freshly allocated on every call, and first-touch page faults on a
// fresh buffer can cost more than the kernel's own traffic (DESIGN.md, Performance model; what
// one virtual machine showed is in BENCHMARKS.md). So freed output buffers are kept (at most
// kSlots of them) and handed out again when a new output fits, like a caching allocator.
// softmax_ce.empty_cache() releases them. New buffers are 2 MB aligned and advised into
// transparent huge pages (Linux, THP in madvise mode).
class OutputCache {
 public:
  static constexpr size_t kSlots = 4;
  static constexpr size_t kAlign = size_t(2) << 20;

  void* take(size_t bytes, size_t* capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = blocks_.size();
      for (size_t i = 0; i < blocks_.size(); ++i) {
        const size_t b = blocks_[i].second;
        if (b >= bytes && b <= 2 * bytes && (best == blocks_.size() || b < blocks_[best].second)) {
          best = i;
        }
      }
      if (best != blocks_.size()) {
        void* ptr = blocks_[best].first;
        *capacity = blocks_[best].second;
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
        return ptr;
      }
    }
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, kAlign, rounded) == 0 && ptr != nullptr,
                "softmax_ce: out of memory allocating ", rounded, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: 4 KB pages serve if refused
#endif
    *capacity = rounded;
    return ptr;
  }

  void give(void* ptr, size_t capacity) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.emplace_back(ptr, capacity);
      if (blocks_.size() > kSlots) {
        evicted = blocks_.front().first;
        blocks_.erase(blocks_.begin());
      }
    }
    std::free(evicted);
  }

  void clear() {
    std::vector<std::pair<void*, size_t>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(blocks_);
    }
    for (auto& b : blocks) std::free(b.first);
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
};

OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive exit
  return *cache;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kMinBytes = size_t(4) << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinBytes) return at::empty(sizes, options);
  size_t capacity = 0;
  void* ptr = output_cache().take(bytes, &capacity);
  return at::from_blob(
      ptr, sizes, [capacity](void* p) { output_cache().give(p, capacity); }, options);
}

void empty_output_cache() { output_cache().clear(); }

int64_t work_units(int64_t outer, int64_t inner, int64_t lanes) {
  return inner == 1 ? outer : outer * ((inner + lanes - 1) / lanes);
}

namespace {

// Runs body(begin, end) -> Status over all units in parallel; raises torch's IndexError for the
// first bad target any range reported.
template <typename Body>
void run_units(const CeArgs& args, int64_t lanes, Body&& body) {
  const int64_t units = work_units(args.outer, args.inner, lanes);
  if (units == 0) return;
  const int64_t per_unit = std::max<int64_t>(1, args.C * (args.inner == 1 ? 1 : lanes));
  const int64_t grain = std::max<int64_t>(1, 32768 / per_unit);
  std::atomic<bool> bad{false};
  std::atomic<int64_t> value{0};
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    const Status s = body(begin, end);
    if (s.bad_target && !bad.exchange(true)) value = s.value;
  });
  TORCH_CHECK_INDEX(!bad.load(), "Target ", value.load(),
                    " is out of bounds: argument 'target' must hold class indices in [0, ",
                    args.C, ") or ignore_index (", args.ignore_index, ").");
}

}  // namespace

void run_ce(CeFn fn, const CeArgs& args, int64_t lanes) {
  run_units(args, lanes, [&](int64_t begin, int64_t end) { return fn(args, begin, end); });
}

}  // namespace softmax_ce::cpu

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
// one virtual machine showed is in docs/bench-history/2026-11-28-cpu.md). So freed output buffers
// are kept (at most kSlots of them) and handed out again when a new output fits, like a caching
// allocator. softmax_ce.empty_cache() releases them. New buffers are 2 MB aligned and advised into
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

namespace {

template <typename T>
double chunk_sum(const T* p, int64_t n) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) s[k] += static_cast<double>(p[i + k]);
  }
  for (int k = 0; i < n; ++i, ++k) s[k] += static_cast<double>(p[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename T>
T fixed_sum_of(const T* p, int64_t n) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks <= 1) return static_cast<T>(chunk_sum(p, n));
  std::vector<double> part(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      part[k] = chunk_sum(p + k * kChunk, std::min(kChunk, n - k * kChunk));
    }
  });
  double s = 0;
  for (const double v : part) s += v;
  return static_cast<T>(s);
}

}  // namespace

float fixed_sum(const float* values, int64_t n) { return fixed_sum_of(values, n); }
double fixed_sum(const double* values, int64_t n) { return fixed_sum_of(values, n); }

at::Tensor fixed_sum(const at::Tensor& values) {
  TORCH_CHECK(values.device().is_cpu(), "softmax_ce: argument 'values' must be on the CPU");
  const at::ScalarType st = values.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              "softmax_ce: argument 'values' must be float32 or float64, got ", st);
  const at::Tensor v = values.contiguous();
  if (st == at::kFloat) {
    return at::scalar_tensor(fixed_sum_of(v.data_ptr<float>(), v.numel()), v.options());
  }
  return at::scalar_tensor(fixed_sum_of(v.data_ptr<double>(), v.numel()), v.options());
}

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

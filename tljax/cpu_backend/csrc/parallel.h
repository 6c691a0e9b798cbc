// Work sharing over XLA:CPU's intra-op thread pool for the FFI kernels.
#ifndef TLJAX_CPU_BACKEND_CSRC_PARALLEL_H_
#define TLJAX_CPU_BACKEND_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace tljax {

// Runs body(item, worker) for item in [0, items) on up to `max_workers`
// threads of XLA's pool, the calling thread included. The caller waits only
// for items that some thread has claimed, never for a helper to start, so a
// busy or absent pool cannot deadlock it; helpers that start late find no
// work and leave without touching `body`. Worker ids are below
// max(1, pool.num_threads()), so per-worker scratch can be sized by it.
template <class Body>
inline int ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, int64_t max_workers, Body& body) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> workers{0};
  };
  auto shared = std::make_shared<Shared>();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t workers = std::max<int64_t>(1, std::min({threads, items, max_workers}));
  auto work = [shared, items, &body]() {
    int worker = shared->workers.fetch_add(1);
    for (;;) {
      int64_t item = shared->next.fetch_add(1);
      if (item >= items) break;
      body(item, worker);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < workers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
  return static_cast<int>(workers);
}

// Reductions that must not depend on scheduling: [0, items) is cut into `slots`
// contiguous ranges, run in parallel, each in order by one thread; body(slot, item)
// accumulates into the slot's own buffer, which the caller sums in slot order.
// Results are then bit-identical from run to run (a resumed training run
// matches an uninterrupted one).
template <class Body>
inline void ParallelSlots(xla::ffi::ThreadPool& pool, int64_t items, int64_t slots, Body& body) {
  auto range = [&](int64_t slot, int) {
    for (int64_t i = slot * items / slots, end = (slot + 1) * items / slots; i < end; ++i)
      body(slot, i);
  };
  ParallelFor(pool, slots, slots, range);
}

// How many slots a reduction into `bytes`-sized buffers gets: from the shapes
// alone (never the thread count), at most 16 and about 64 MB of buffers.
inline int64_t ReductionSlots(int64_t items, int64_t bytes) {
  int64_t by_memory = (int64_t{64} << 20) / std::max<int64_t>(1, bytes);
  return std::max<int64_t>(1, std::min({items, int64_t{16}, std::max<int64_t>(2, by_memory)}));
}

// The buffers of such a reduction: slot 0 accumulates straight into the
// (zeroed) output, the others into their own zeroed copies; Finish() adds them
// to the output in slot order.
class SlotSums {
 public:
  SlotSums(float* out, int64_t size, int64_t slots)
      : out_(out), size_(size), rest_(static_cast<size_t>((slots - 1) * size), 0.0f) {
    std::fill(out, out + size, 0.0f);
  }
  float* operator[](int64_t slot) {
    return slot == 0 ? out_ : rest_.data() + (slot - 1) * size_;
  }
  // Each element is still summed in slot order; threads only split the elements.
  void Finish(xla::ffi::ThreadPool& pool) {
    const int64_t slots = 1 + static_cast<int64_t>(rest_.size()) / std::max<int64_t>(1, size_);
    if (slots == 1) return;
    const int64_t piece = 16384, pieces = (size_ + piece - 1) / piece;
    auto add = [&](int64_t i, int) {
      const int64_t lo = i * piece, hi = std::min(size_, lo + piece);
      for (int64_t s = 1; s < slots; ++s) {
        const float* src = rest_.data() + (s - 1) * size_;
        for (int64_t t = lo; t < hi; ++t) out_[t] += src[t];
      }
    };
    ParallelFor(pool, pieces, pieces, add);
  }

 private:
  float* out_;
  int64_t size_;
  std::vector<float> rest_;
};

}  // namespace tljax

#endif  // TLJAX_CPU_BACKEND_CSRC_PARALLEL_H_

// A parallel loop on XLA's intra-op thread pool, shared by cpu_kernels.cc and onednn_conv.cc.
// Work items are claimed from an atomic counter by the calling thread and by tasks scheduled on
// the pool, so a task that starts late finds nothing to do, a busy pool leaves the work to the
// caller, and the call never waits on a task that has not started.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace xrayjax {

struct ForState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

// Runs fn(item) for item in [0, n) on `workers` threads (the caller is one of them).
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int workers, const F& fn) {
  auto state = std::make_shared<ForState>();
  auto run = [state, n, &fn] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  // A late task only reads `state` (kept alive by its own reference) and exits.
  for (int w = 1; w < workers; ++w) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// out = the sum of `parts` buffers of `size` floats laid end to end, added in order.
inline void SumInOrder(const float* acc, int parts, int64_t size, float* out) {
  std::memcpy(out, acc, size * sizeof(float));
  for (int p = 1; p < parts; ++p) {
    const float* a = acc + static_cast<size_t>(p) * size;
    for (int64_t i = 0; i < size; ++i) out[i] += a[i];
  }
}

// Work items for `items` units of work: one per pool thread, at most one per unit.
inline int Workers(xla::ffi::ThreadPool& pool, int64_t items) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return static_cast<int>(std::min(threads, std::max<int64_t>(1, items)));
}

}  // namespace xrayjax

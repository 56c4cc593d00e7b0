// A parallel loop on XLA's intra-op thread pool, shared by cpu_kernels.cc and onednn_*.cc, and
// the batch slices the oneDNN calls run on it.
// Work items are claimed from an atomic counter by the calling thread and by tasks scheduled on
// the pool, so a task that starts late finds nothing to do, a busy pool leaves the work to the
// caller, and the call never waits on a task that has not started.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>

#include <omp.h>

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

// The oneDNN calls split a batch of n images into `parts` slices: slice p holds images
// [n * p / parts, n * (p + 1) / parts), so slices come in at most two sizes. Size i = 0 is the
// smaller, i = 1 the larger; a primitive is made for each.
inline int64_t SliceSize(int64_t n, int parts, int i) { return (n + i * (parts - 1)) / parts; }

// Runs body(p, n0, n, i) for every slice p (first image n0, n images, size i) on `parts`
// threads of XLA's pool, each with oneDNN single-threaded (it starts no OpenMP threads of its
// own). Returns the message of an exception a slice threw, or "".
template <typename F>
std::string ForSlices(xla::ffi::ThreadPool& pool, int64_t batch, int parts, const F& body) {
  std::mutex mu;
  std::string error;
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    const int64_t n0 = batch * p / parts, n = batch * (p + 1) / parts - n0;
    try {
      omp_set_num_threads(1);
      body(p, n0, n, n == batch / parts ? 0 : 1);
    } catch (const std::exception& err) {
      std::lock_guard<std::mutex> lock(mu);
      error = err.what();
    }
  });
  return error;
}

}  // namespace xrayjax

// xrayjax's own CPU kernels:
//   - the 1x1 convolution weight gradient, which XLA's CPU backend runs far below this
//     machine's peak and oneDNN does not beat where 1x1 convolutions cost most
//     (docs/performance.md; larger convolutions and max pooling run through oneDNN,
//     onednn_*.cc);
//   - Threefry-2x32, jax.random's hash, which XLA compiles afresh for every draw (a loop per
//     parameter tensor: most of a deep network's initialisation's compile time); this one is
//     compiled once, bit for bit the same function.
// Registered through jax.ffi by xrayjax/kernels/__init__.py, which compiles this file on first
// use; tested against lax and jax.random's known answers in tests/test_kernels.py.
//
// They run on XLA's intra-op thread pool (parallel.h). Each work item's share of the sums is
// fixed and sums are added in item order, so results are the same whichever thread ran what.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cblas.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using xrayjax::ParallelFor;
using xrayjax::SumInOrder;
using xrayjax::Workers;

extern "C" void scipy_openblas_set_num_threads(int);

namespace {

// 1x1 conv weight gradient: dw[0, 0, ci, co] = sum over rows k = (n, y, x) of
// x[k, ci] * g[k, co], one GEMM with a transposed operand. x: (N, H, W, Ci), g: (N, H, W, Co).
// Two schedules:
//   tiles of `tile` rows (each read from memory once); workers accumulate privately and the
//     sums are added at the end;
//   a block of output channels per work item, over all rows, when the private sums would take
//     more than `private_bytes` (wide layers on many threads).
ffi::Error PointwiseWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw, int64_t tile,
                          int64_t private_bytes) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] || xd[2] != gd[2] ||
      tile <= 0) {
    return ffi::Error::InvalidArgument("pointwise_weight_grad: operands are not (N, H, W, Ci) and (N, H, W, Co)");
  }
  const int64_t Ci = xd[3], Co = gd[3], rows = xd[0] * xd[1] * xd[2];
  const float* X = x.typed_data();
  const float* G = g.typed_data();
  float* D = dw->typed_data();
  static const bool single = (scipy_openblas_set_num_threads(1), true);  // ours: XLA's pool
  (void)single;
  const int64_t tiles = (rows + tile - 1) / tile;
  const int workers = Workers(pool, tiles);
  if (workers * Ci * Co * int64_t{sizeof(float)} <= private_bytes) {
    // Work item w sums a fixed, contiguous range of tiles into its own buffer, and the buffers
    // are added in order: the result does not depend on which thread ran what, so training is
    // bit-reproducible (resumed runs match uninterrupted ones).
    std::vector<float> acc(static_cast<size_t>(workers) * Ci * Co, 0.f);
    ParallelFor(pool, workers, workers, [&](int64_t w) {
      float* out = acc.data() + static_cast<size_t>(w) * Ci * Co;
      for (int64_t t = tiles * w / workers; t < tiles * (w + 1) / workers; ++t) {
        const int64_t k0 = t * tile, k = std::min(tile, rows - k0);
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Ci, Co, k, 1.f, X + k0 * Ci,
                          Ci, G + k0 * Co, Co, 1.f, out, Co);
      }
    });
    SumInOrder(acc.data(), workers, Ci * Co, D);
  } else {
    const int64_t block = Co >= 256 ? 128 : Co;
    const int64_t blocks = (Co + block - 1) / block;
    ParallelFor(pool, blocks, Workers(pool, blocks), [&](int64_t item) {
      const int64_t c0 = item * block;
      scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Ci, std::min(block, Co - c0),
                        rows, 1.f, X, Ci, G + c0, Co, 0.f, D + c0, Co);
    });
  }
  return ffi::Error::Success();
}

// Threefry-2x32 (20 rounds; Salmon et al. 2011) as jax.random computes it
// (jax/_src/random/threefry2x32.py): (y1, y2) = hash of the counters (x1, x2) under the key
// (k1, k2), element by element; the counters have the results' shape, the key is one pair or
// one pair per element.
inline uint32_t RotateLeft(uint32_t v, int d) { return (v << d) | (v >> (32 - d)); }

void Threefry(uint32_t k0, uint32_t k1, uint32_t& x0, uint32_t& x1) {
  static constexpr int kRotations[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  x0 += ks[0];
  x1 += ks[1];
  for (int i = 0; i < 5; ++i) {
    for (int r : kRotations[i % 2]) {
      x0 += x1;
      x1 = RotateLeft(x1, r) ^ x0;
    }
    x0 += ks[(i + 1) % 3];
    x1 += ks[(i + 2) % 3] + static_cast<uint32_t>(i + 1);
  }
}

ffi::Error Threefry2x32(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> k1, ffi::Buffer<ffi::U32> k2,
                        ffi::Buffer<ffi::U32> x1, ffi::Buffer<ffi::U32> x2,
                        ffi::ResultBuffer<ffi::U32> y1, ffi::ResultBuffer<ffi::U32> y2) {
  const int64_t n = y1->element_count(), keys = k1.element_count();
  if (k2.element_count() != keys || (keys != 1 && keys != n) || x1.element_count() != n ||
      x2.element_count() != n) {
    return ffi::Error::InvalidArgument("threefry2x32: operands and results differ in size");
  }
  const int64_t step = keys == 1 ? 0 : 1;  // one key for every element, or one each
  const uint32_t *K1 = k1.typed_data(), *K2 = k2.typed_data();
  const uint32_t *X1 = x1.typed_data(), *X2 = x2.typed_data();
  uint32_t *Y1 = y1->typed_data(), *Y2 = y2->typed_data();
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  ParallelFor(pool, chunks, Workers(pool, chunks), [&](int64_t c) {
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
      uint32_t a = X1[i], b = X2[i];
      Threefry(K1[i * step], K2[i * step], a, b);
      Y1[i] = a;
      Y2[i] = b;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(xrayjax_threefry2x32, Threefry2x32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(xrayjax_pointwise_weight_grad, PointwiseWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tile")
                                  .Attr<int64_t>("private_bytes"));

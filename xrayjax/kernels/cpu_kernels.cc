// xrayjax's own CPU kernels: the 1x1 convolution weight gradient and max pooling's input
// gradient, which XLA's CPU backend runs far below this machine's peak and oneDNN does not beat
// (docs/performance.md; larger convolutions run through oneDNN, onednn_conv.cc). Registered
// through jax.ffi by xrayjax/kernels/__init__.py, which compiles this file on first use; values
// and gradients are tested against lax in tests/test_kernels.py.
//
// Both run on XLA's intra-op thread pool (parallel.h). Each work item's share of the sums is
// fixed and sums are added in item order, so results are the same whichever thread ran what.
#include <algorithm>
#include <cstdint>
#include <cstring>
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

// Max pooling's input gradient: each window's gradient goes to the first position (row-major
// within the window) holding its maximum, as XLA's select-and-scatter with `ge` does for
// jax.grad of lax.reduce_window max. x: (N, H, W, C), g: (N, Ho, Wo, C), dx: (N, H, W, C);
// window (kh, kw), strides (sh, sw), low padding (pt, pl): positions outside x are never chosen.
// XLA's CPU backend differentiates reduce-window through a reduce-window with four index
// outputs and a scatter; this reads x and g once. A work item is one image, so the windows
// that overlap add into dx in one fixed order.
ffi::Error MaxPoolGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                       ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pl) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[3] != gd[3] || kh <= 0 ||
      kw <= 0 || sh <= 0 || sw <= 0 || pt < 0 || pl < 0 || kh * kw > 255) {
    return ffi::Error::InvalidArgument("max_pool_grad: operands are not (N, H, W, C) and (N, Ho, Wo, C), or the window is not positive");
  }
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], Ho = gd[1], Wo = gd[2];
  const float* X = x.typed_data();
  const float* G = g.typed_data();
  float* D = dx->typed_data();
  ParallelFor(pool, N, Workers(pool, N), [&](int64_t n) {
    std::vector<float> best(C);
    std::vector<uint8_t> arg(C);
    float* dn = D + n * H * W * C;
    std::memset(dn, 0, H * W * C * sizeof(float));
    for (int64_t oy = 0; oy < Ho; ++oy) {
      const int64_t y0 = oy * sh - pt;
      for (int64_t ox = 0; ox < Wo; ++ox) {
        const int64_t x0 = ox * sw - pl;
        bool first = true;
        for (int64_t ky = 0; ky < kh; ++ky) {
          const int64_t y = y0 + ky;
          if (y < 0 || y >= H) continue;
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t xx = x0 + kx;
            if (xx < 0 || xx >= W) continue;
            const float* __restrict v = X + ((n * H + y) * W + xx) * C;
            const uint8_t tap = static_cast<uint8_t>(ky * kw + kx);
            if (first) {
              for (int64_t c = 0; c < C; ++c) { best[c] = v[c]; arg[c] = tap; }
              first = false;
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const bool more = v[c] > best[c];
                best[c] = more ? v[c] : best[c];
                arg[c] = more ? tap : arg[c];
              }
            }
          }
        }
        if (first) continue;  // a window wholly in the padding
        const float* __restrict gv = G + ((n * Ho + oy) * Wo + ox) * C;
        for (int64_t ky = 0; ky < kh; ++ky) {
          const int64_t y = y0 + ky;
          if (y < 0 || y >= H) continue;
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t xx = x0 + kx;
            if (xx < 0 || xx >= W) continue;
            float* __restrict d = dn + (y * W + xx) * C;
            const uint8_t tap = static_cast<uint8_t>(ky * kw + kx);
            for (int64_t c = 0; c < C; ++c) d[c] += arg[c] == tap ? gv[c] : 0.f;
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(xrayjax_pointwise_weight_grad, PointwiseWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tile")
                                  .Attr<int64_t>("private_bytes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(xrayjax_max_pool_grad, MaxPoolGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

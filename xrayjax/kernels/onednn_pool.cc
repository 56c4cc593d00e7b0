// Float32 NHWC max pooling through oneDNN, registered with jax.ffi by
// xrayjax/kernels/__init__.py (compiled with onednn_conv.cc). Values and gradients are tested
// against lax in tests/test_kernels.py.
//
//   xrayjax_dnnl_max_pool_fwd(x[N,H,W,C]) -> y[N,Ho,Wo,C], ws[N,Ho,Wo,C] (uint8)
//   xrayjax_dnnl_max_pool_bwd(g[N,Ho,Wo,C], ws) -> dx[N,H,W,C]
// The workspace ws is each window's chosen tap (its first maximum in row-major order, as XLA
// chooses; padded positions are never chosen), which the input gradient reads instead of x.
// Attributes: window kh, kw, strides sh, sw and low paddings pt, pl; the high paddings follow
// from the shapes. Threads as in onednn_conv.cc: one single-threaded primitive per slice of
// the batch on XLA's pool; a slice's windows add into its own images only, in a fixed order.
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

namespace {

struct Key {
  int64_t backward, n, h, w, c, ho, wo, kh, kw, sh, sw, pt, pl;
  int64_t pb = 0, pr = 0;  // set by Run
  auto Tie() const {
    return std::tie(backward, n, h, w, c, ho, wo, kh, kw, sh, sw, pt, pl, pb, pr);
  }
  bool operator<(const Key& o) const { return Tie() < o.Tie(); }
};

std::mutex g_mu;  // guards g_cache
std::map<Key, dnnl::primitive> g_cache;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::memory::desc Map(int64_t n, int64_t c, int64_t h, int64_t w, dt type = dt::f32) {
  return dnnl::memory::desc({n, c, h, w}, type, tag::nhwc);
}

// The primitive for key k (single-threaded, as onednn_conv.cc's), created on first use.
dnnl::primitive Get(const Key& k) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto found = g_cache.find(k);
  if (found != g_cache.end()) return found->second;
  const auto src = Map(k.n, k.c, k.h, k.w), dst = Map(k.n, k.c, k.ho, k.wo);
  const dnnl::memory::dims strides{k.sh, k.sw}, kernel{k.kh, k.kw}, dilation{0, 0},
      low{k.pt, k.pl}, high{k.pb, k.pr};
  dnnl::pooling_forward::primitive_desc fwd(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, src, dst,
      strides, kernel, dilation, low, high);
  // Our workspace is the (N, Ho, Wo, C) uint8 array XLA allocates.
  if (fwd.workspace_desc() != Map(k.n, k.c, k.ho, k.wo, dt::u8)) {
    throw std::runtime_error("oneDNN's max pooling wants a workspace other than one byte per "
                             "output in the output's layout");
  }
  dnnl::primitive prim;
  if (k.backward) {
    prim = dnnl::pooling_backward(dnnl::pooling_backward::primitive_desc(
        Engine(), dnnl::algorithm::pooling_max, src, dst, strides, kernel, dilation, low, high,
        fwd));
  } else {
    prim = dnnl::pooling_forward(fwd);
  }
  return g_cache.emplace(k, prim).first->second;
}

// Pass k.backward of max pooling in slices of the batch: x -> (y, ws), or (g, ws) -> dx.
ffi::Error Run(ffi::ThreadPool& pool, Key k, const float* in, const uint8_t* ws_in,
               float* out, uint8_t* ws_out) {
  // The high paddings the shapes imply (none where the last window stops short of the end).
  k.pb = std::max<int64_t>(0, (k.ho - 1) * k.sh + k.kh - k.h - k.pt);
  k.pr = std::max<int64_t>(0, (k.wo - 1) * k.sw + k.kw - k.w - k.pl);
  if (k.kh <= 0 || k.kw <= 0 || k.sh <= 0 || k.sw <= 0 || k.pt < 0 || k.pl < 0 ||
      k.pt >= k.kh || k.pl >= k.kw || k.pb >= k.kh || k.pr >= k.kw ||
      (k.h + k.pt + k.pb - k.kh) / k.sh + 1 != k.ho ||
      (k.w + k.pl + k.pr - k.kw) / k.sw + 1 != k.wo) {
    return ffi::Error::InvalidArgument(
        "dnnl_max_pool: the shapes, window, strides and padding do not agree");
  }
  const int parts = xrayjax::Workers(pool, k.n);
  const int64_t x_image = k.h * k.w * k.c, y_image = k.ho * k.wo * k.c;
  omp_set_num_threads(1);
  dnnl::primitive prims[2];
  try {
    for (int i = 0; i < 2; ++i) {
      Key slice = k;
      slice.n = xrayjax::SliceSize(k.n, parts, i);
      prims[i] = Get(slice);
    }
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("dnnl_max_pool: oneDNN failed: ") + err.what());
  }
  const std::string error = xrayjax::ForSlices(pool, k.n, parts, [&](int64_t, int64_t n0,
                                                                      int64_t n, int i) {
    auto& engine = Engine();
    dnnl::stream stream(engine);
    const auto x = Map(n, k.c, k.h, k.w), y = Map(n, k.c, k.ho, k.wo),
               ws = Map(n, k.c, k.ho, k.wo, dt::u8);
    if (k.backward) {
      prims[i].execute(stream, {
          {DNNL_ARG_DIFF_DST, dnnl::memory(y, engine, const_cast<float*>(in) + n0 * y_image)},
          {DNNL_ARG_WORKSPACE,
           dnnl::memory(ws, engine, const_cast<uint8_t*>(ws_in) + n0 * y_image)},
          {DNNL_ARG_DIFF_SRC, dnnl::memory(x, engine, out + n0 * x_image)}});
    } else {
      prims[i].execute(stream, {
          {DNNL_ARG_SRC, dnnl::memory(x, engine, const_cast<float*>(in) + n0 * x_image)},
          {DNNL_ARG_DST, dnnl::memory(y, engine, out + n0 * y_image)},
          {DNNL_ARG_WORKSPACE, dnnl::memory(ws, engine, ws_out + n0 * y_image)}});
    }
    stream.wait();
  });
  if (!error.empty()) return ffi::Error::Internal("dnnl_max_pool: oneDNN failed: " + error);
  return ffi::Error::Success();
}

const ffi::Error kBadShapes = ffi::Error::InvalidArgument(
    "dnnl_max_pool: operands are not (N, H, W, C) and (N, Ho, Wo, C) maps of one N and C, with "
    "one workspace byte per output");

// Whether x (N, H, W, C) and y (N, Ho, Wo, C) are maps of one N and C, and ws is shaped as y.
bool Agree(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y,
           ffi::Span<const int64_t> ws) {
  return x.size() == 4 && y.size() == 4 && x[0] == y[0] && x[3] == y[3] &&
         std::equal(y.begin(), y.end(), ws.begin(), ws.end());
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::U8> ws, int64_t kh, int64_t kw, int64_t sh,
                   int64_t sw, int64_t pt, int64_t pl) {
  const auto a = x.dimensions(), b = y->dimensions();
  if (!Agree(a, b, ws->dimensions())) return kBadShapes;
  const Key k{0, a[0], a[1], a[2], a[3], b[1], b[2], kh, kw, sh, sw, pt, pl};
  return Run(pool, k, x.typed_data(), nullptr, y->typed_data(), ws->typed_data());
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> ws,
                    ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t sh,
                    int64_t sw, int64_t pt, int64_t pl) {
  const auto a = dx->dimensions(), b = g.dimensions();
  if (!Agree(a, b, ws.dimensions())) return kBadShapes;
  const Key k{1, a[0], a[1], a[2], a[3], b[1], b[2], kh, kw, sh, sw, pt, pl};
  return Run(pool, k, g.typed_data(), ws.typed_data(), dx->typed_data(), nullptr);
}

}  // namespace

// The attributes both handlers take, in one place.
template <typename Binding>
auto WithWindow(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("kh")
      .template Attr<int64_t>("kw")
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pl");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(xrayjax_dnnl_max_pool_fwd, Forward,
                              WithWindow(ffi::Ffi::Bind()
                                             .Ctx<ffi::ThreadPool>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::U8>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(xrayjax_dnnl_max_pool_bwd, Backward,
                              WithWindow(ffi::Ffi::Bind()
                                             .Ctx<ffi::ThreadPool>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::U8>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()));

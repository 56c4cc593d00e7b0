// Float32 NHWC/HWIO 2-D convolutions through oneDNN (the library TensorFlow's CPU kernels call),
// registered with jax.ffi by xrayjax/kernels/__init__.py, which compiles this file on first use
// against the onednn-cpu-gomp wheel. Values and gradients are tested against lax in
// tests/test_kernels.py.
//
// Three targets, one per pass of a convolution with G groups (G = C: depthwise):
//   xrayjax_dnnl_conv_fwd(x[N,H,W,Ci], w[KH,KW,Ci/G,Co]) -> y[N,Ho,Wo,Co]
//   xrayjax_dnnl_conv_bwd_data(g[N,Ho,Wo,Co], w) -> dx[N,H,W,Ci]
//   xrayjax_dnnl_conv_bwd_weights(x, g) -> dw[KH,KW,Ci/G,Co]
// Attributes: the stride s and the low paddings pt, pl; the high paddings follow from the
// output's size (oneDNN wants the one the shapes imply: a VALID conv whose last window stops
// short of the input's end has a smaller one).
//
// Activations are used in place as nhwc (oneDNN's blocked activation layouts cost reorders of
// whole maps and were slower here); weights are described with explicit strides and reordered
// to and from the layout the primitive asks for. Primitives are created once per
// (pass, shapes, attributes, threads) key: oneDNN fixes a primitive's thread split when it is
// created. Calls run one at a time under one lock, each on as many OpenMP threads as XLA's
// intra-op pool has (a second call at once would only oversubscribe the cores), which lets all
// calls share one weight buffer and one scratchpad instead of one per primitive. At a fixed
// thread count the results are the same run to run.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dt = dnnl::memory::data_type;
using dims = dnnl::memory::dims;

namespace {

enum Pass { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Key {
  int64_t pass, n, h, w, ci, ho, wo, co, kh, kw, s, pt, pl, pb, pr, groups, threads;
  auto Tie() const {
    return std::tie(pass, n, h, w, ci, ho, wo, co, kh, kw, s, pt, pl, pb, pr, groups, threads);
  }
  bool operator<(const Key& o) const { return Tie() < o.Tie(); }
};

struct Entry {
  dnnl::primitive prim;
  dnnl::memory::desc weights_user, weights_prim, scratchpad;
  dnnl::reorder weights_reorder;  // user -> primitive (inputs) or back (the weight gradient)
  bool reorder = false;
};

// A 64-byte aligned buffer that only grows.
struct Buffer {
  std::unique_ptr<void, decltype(&std::free)> data{nullptr, &std::free};
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes > size) {
      size = (bytes + 63) / 64 * 64;
      data.reset(std::aligned_alloc(64, size));
    }
    return data.get();
  }
};

std::mutex g_mu;  // guards everything below, and serialises the calls
std::map<Key, std::unique_ptr<Entry>> g_cache;
Buffer g_weights, g_scratchpad;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::memory::desc Activations(int64_t n, int64_t c, int64_t h, int64_t w) {
  return dnnl::memory::desc({n, c, h, w}, dt::f32, dnnl::memory::format_tag::nhwc);
}

// JAX's HWIO weights (KH, KW, Ci/G, Co) as oneDNN's {O, I, KH, KW}, or {G, O/G, I/G, KH, KW}.
dnnl::memory::desc Weights(const Key& k) {
  const int64_t g = k.groups, cig = k.ci / g, cog = k.co / g;
  if (g == 1) {
    return dnnl::memory::desc({k.co, k.ci, k.kh, k.kw}, dt::f32,
                              dims{1, k.co, k.kw * k.ci * k.co, k.ci * k.co});
  }
  return dnnl::memory::desc({g, cog, cig, k.kh, k.kw}, dt::f32,
                            dims{cog, 1, k.co, k.kw * cig * k.co, cig * k.co});
}

Entry* Get(const Key& k) {
  auto found = g_cache.find(k);
  if (found != g_cache.end()) return found->second.get();
  auto e = std::make_unique<Entry>();
  const auto src = Activations(k.n, k.ci, k.h, k.w), dst = Activations(k.n, k.co, k.ho, k.wo);
  e->weights_user = Weights(k);
  const dnnl::memory::desc any_weights(e->weights_user.get_dims(), dt::f32,
                                       dnnl::memory::format_tag::any);
  const dims strides{k.s, k.s}, dilation{0, 0}, low{k.pt, k.pl}, high{k.pb, k.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      Engine(), dnnl::prop_kind::forward_training, algo, src, any_weights, dnnl::memory::desc(),
      dst, strides, dilation, low, high, attr);
  if (k.pass == kFwd) {
    e->prim = dnnl::convolution_forward(fwd);
    e->weights_prim = fwd.weights_desc();
    e->scratchpad = fwd.scratchpad_desc();
  } else if (k.pass == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), algo, src, any_weights, dst, strides, dilation, low, high, fwd, attr);
    e->prim = dnnl::convolution_backward_data(pd);
    e->weights_prim = pd.weights_desc();
    e->scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), algo, src, any_weights, dst, strides, dilation, low, high, fwd, attr);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->weights_prim = pd.diff_weights_desc();
    e->scratchpad = pd.scratchpad_desc();
  }
  e->reorder = e->weights_prim != e->weights_user;
  if (e->reorder) {
    e->weights_reorder = k.pass == kBwdWeights
        ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e->weights_prim, Engine(),
                                                      e->weights_user))
        : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e->weights_user, Engine(),
                                                      e->weights_prim));
  }
  return g_cache.emplace(k, std::move(e)).first->second.get();
}

// Runs pass k.pass on activations `act` (x, or g for the input gradient), the other operand
// `other` (w, or g for the weight gradient) and the result `out`.
ffi::Error Run(Key k, int64_t threads, const float* act, const float* other, float* out) {
  // The high paddings the shapes imply (see the top of the file).
  k.pb = (k.ho - 1) * k.s + k.kh - k.h - k.pt;
  k.pr = (k.wo - 1) * k.s + k.kw - k.w - k.pl;
  if (k.ci % k.groups || k.co % k.groups || k.pb < -k.s || k.pr < -k.s) {
    return ffi::Error::InvalidArgument("dnnl_conv: shapes, groups and padding do not agree");
  }
  std::lock_guard<std::mutex> lock(g_mu);
  omp_set_num_threads(static_cast<int>(threads));
  k.threads = threads;
  try {
    Entry* e = Get(k);
    auto& engine = Engine();
    dnnl::stream stream(engine);
    const auto src = Activations(k.n, k.ci, k.h, k.w), dst = Activations(k.n, k.co, k.ho, k.wo);
    dnnl::memory scratchpad(e->scratchpad, engine, g_scratchpad.Get(e->scratchpad.get_size()));
    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SCRATCHPAD, scratchpad}};
    if (k.pass == kBwdWeights) {
      dnnl::memory user(e->weights_user, engine, out);
      dnnl::memory weights = e->reorder
          ? dnnl::memory(e->weights_prim, engine, g_weights.Get(e->weights_prim.get_size()))
          : user;
      args.insert({{DNNL_ARG_SRC, dnnl::memory(src, engine, const_cast<float*>(act))},
                   {DNNL_ARG_DIFF_DST, dnnl::memory(dst, engine, const_cast<float*>(other))},
                   {DNNL_ARG_DIFF_WEIGHTS, weights}});
      e->prim.execute(stream, args);
      if (e->reorder) e->weights_reorder.execute(stream, weights, user);
    } else {
      dnnl::memory user(e->weights_user, engine, const_cast<float*>(other));
      dnnl::memory weights = user;
      if (e->reorder) {
        weights = dnnl::memory(e->weights_prim, engine, g_weights.Get(e->weights_prim.get_size()));
        e->weights_reorder.execute(stream, user, weights);
      }
      args.insert({DNNL_ARG_WEIGHTS, weights});
      if (k.pass == kFwd) {
        args.insert({{DNNL_ARG_SRC, dnnl::memory(src, engine, const_cast<float*>(act))},
                     {DNNL_ARG_DST, dnnl::memory(dst, engine, out)}});
      } else {
        args.insert({{DNNL_ARG_DIFF_DST, dnnl::memory(dst, engine, const_cast<float*>(act))},
                     {DNNL_ARG_DIFF_SRC, dnnl::memory(src, engine, out)}});
      }
      e->prim.execute(stream, args);
    }
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("dnnl_conv: oneDNN failed: ") + err.what());
  }
  return ffi::Error::Success();
}

Key MakeKey(int64_t pass, ffi::Span<const int64_t> x, ffi::Span<const int64_t> y,
            ffi::Span<const int64_t> w, int64_t s, int64_t pt, int64_t pl, int64_t groups) {
  return Key{pass, x[0], x[1], x[2], x[3], y[1], y[2], y[3], w[0], w[1], s, pt, pl, 0, 0,
             groups, 0};
}

bool Nhwc(ffi::Span<const int64_t> d) { return d.size() == 4; }

ffi::Error Fwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
               ffi::ResultBuffer<ffi::F32> y, int64_t s, int64_t pt, int64_t pl,
               int64_t groups) {
  if (!Nhwc(x.dimensions()) || !Nhwc(w.dimensions()) || !Nhwc(y->dimensions())) {
    return ffi::Error::InvalidArgument("dnnl_conv_fwd: operands are not 4-D");
  }
  return Run(MakeKey(kFwd, x.dimensions(), y->dimensions(), w.dimensions(), s, pt, pl, groups),
             pool.num_threads(), x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error BwdData(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> dx, int64_t s, int64_t pt, int64_t pl,
                   int64_t groups) {
  if (!Nhwc(g.dimensions()) || !Nhwc(w.dimensions()) || !Nhwc(dx->dimensions())) {
    return ffi::Error::InvalidArgument("dnnl_conv_bwd_data: operands are not 4-D");
  }
  return Run(MakeKey(kBwdData, dx->dimensions(), g.dimensions(), w.dimensions(), s, pt, pl,
                     groups),
             pool.num_threads(), g.typed_data(), w.typed_data(), dx->typed_data());
}

ffi::Error BwdWeights(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t s, int64_t pt, int64_t pl,
                      int64_t groups) {
  if (!Nhwc(x.dimensions()) || !Nhwc(g.dimensions()) || !Nhwc(dw->dimensions())) {
    return ffi::Error::InvalidArgument("dnnl_conv_bwd_weights: operands are not 4-D");
  }
  return Run(MakeKey(kBwdWeights, x.dimensions(), g.dimensions(), dw->dimensions(), s, pt, pl,
                     groups),
             pool.num_threads(), x.typed_data(), g.typed_data(), dw->typed_data());
}

}  // namespace

#define XRAYJAX_DNNL_CONV(name, fn)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                             \
                                ffi::Ffi::Bind()                      \
                                    .Ctx<ffi::ThreadPool>()           \
                                    .Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Ret<ffi::Buffer<ffi::F32>>()     \
                                    .Attr<int64_t>("s")               \
                                    .Attr<int64_t>("pt")              \
                                    .Attr<int64_t>("pl")              \
                                    .Attr<int64_t>("groups"));

XRAYJAX_DNNL_CONV(xrayjax_dnnl_conv_fwd, Fwd)
XRAYJAX_DNNL_CONV(xrayjax_dnnl_conv_bwd_data, BwdData)
XRAYJAX_DNNL_CONV(xrayjax_dnnl_conv_bwd_weights, BwdWeights)

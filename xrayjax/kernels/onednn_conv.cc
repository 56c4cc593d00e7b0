// Float32 NHWC/HWIO 2-D convolutions through oneDNN (the library TensorFlow's CPU kernels call),
// registered with jax.ffi by xrayjax/kernels/__init__.py, which compiles this file on first use
// against the onednn-cpu-gomp wheel. Values and gradients are tested against lax in
// tests/test_kernels.py.
//
// Three targets, one per pass of a convolution with G groups (G = C: depthwise):
//   xrayjax_dnnl_conv_fwd(x[N,H,W,Ci], w[KH,KW,Ci/G,Co]) -> y[N,Ho,Wo,Co]
//   xrayjax_dnnl_conv_bwd_data(g[N,Ho,Wo,Co], w) -> dx[N,H,W,Ci]
//   xrayjax_dnnl_conv_bwd_weights(x, g) -> dw[KH,KW,Ci/G,Co]
// and a forward pass with a bias and a ReLU (VGG16's layers), fused as TensorFlow fuses them:
// oneDNN adds the bias and applies the ReLU as it writes each output (the bias's gradient stays
// XLA's sum, so training matches the unfused layers bit for bit):
//   xrayjax_dnnl_conv_bias_relu_fwd(x, w, b[Co]) -> y = max(conv(x, w) + b, 0)
// Stride-1 3x3 SAME convolutions with 128 channels or more on each side run their forward pass
// (fused or not) and input gradient as Winograd F(2x2, 3x3) instead (RunWinograd, below).
// Attributes: the stride s and the low paddings pt, pl; the high paddings follow from the
// output's size (oneDNN wants the one the shapes imply: a VALID conv whose last window stops
// short of the input's end has a smaller one).
//
// Activations are used in place as nhwc (oneDNN's blocked activation layouts cost reorders of
// whole maps and were slower here), except by a dense weight gradient that runs AVX2's direct
// kernel (`jit:avx2`): it runs far faster on blocked layouts, so each slice reorders its maps
// there in chunks of at most 16 MiB (ChunkImages). Weights are described with explicit strides
// and reordered to and from the layout the primitive asks for.
//
// Threads: a call splits its batch into one slice per thread of XLA's intra-op pool and runs
// each slice as a single-threaded oneDNN primitive on that pool (parallel.h), so oneDNN never
// starts OpenMP threads of its own: when XLA runs two branches of a model side by side, each
// call's slices queue behind the other branch's work instead of competing with it for the
// cores. The weight gradient's slices are summed in slice order, so results do not depend on
// which thread ran what. Primitives are created once per (pass, shapes, attributes) and run
// concurrently, each execution with its own scratchpad.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dt = dnnl::memory::data_type;
using dims = dnnl::memory::dims;

namespace {

enum Pass { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Key {
  int64_t pass, n, h, w, ci, ho, wo, co, kh, kw, s, pt, pl, pb, pr, groups;
  int64_t bias = 0;     // forward only: with a bias and a ReLU
  int64_t blocked = 0;  // weight gradient only: on the activation layouts oneDNN prefers
  auto Tie() const {
    return std::tie(pass, n, h, w, ci, ho, wo, co, kh, kw, s, pt, pl, pb, pr, groups, bias,
                    blocked);
  }
  bool operator<(const Key& o) const { return Tie() < o.Tie(); }
};

struct Entry {
  dnnl::primitive prim;
  dnnl::memory::desc weights_user, weights_prim, scratchpad;
  dnnl::reorder weights_reorder;  // user -> primitive (inputs) or back (the weight gradient)
  bool reorder = false;
  // With Key::blocked: the activations' layouts and their reorders from nhwc.
  dnnl::memory::desc src_prim, dst_prim;
  dnnl::reorder src_reorder, dst_reorder;
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

std::mutex g_mu;  // guards g_cache and g_chunks
std::map<Key, std::unique_ptr<Entry>> g_cache;
std::map<Key, int64_t> g_chunks;
// Per thread: a call's reordered weights or summed slices, a slice's weight gradient in the
// primitive's layout and a chunk's, a slice's scratchpad, and a chunk's activations.
thread_local Buffer t_call, t_slice_weights, t_chunk_weights, t_scratchpad, t_src, t_dst;

// A weight gradient's chunk of reordered activations (input and output gradient) holds at
// most this many bytes, or one image.
constexpr int64_t kChunkBytes = 16 << 20;
// Below this many multiply-adds an image, a weight gradient stays on nhwc: reordering its
// maps costs about what the blocked kernel saves (docs/performance.md).
constexpr int64_t kBlockedMinMacs = 16 << 20;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::memory::desc Activations(int64_t n, int64_t c, int64_t h, int64_t w) {
  return dnnl::memory::desc({n, c, h, w}, dt::f32, dnnl::memory::format_tag::nhwc);
}

// The bias, one value per output channel, as a binary post-op's operand.
dnnl::memory::desc Bias(int64_t co) {
  return dnnl::memory::desc({1, co, 1, 1}, dt::f32, dnnl::memory::format_tag::nhwc);
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

dnnl::memory::desc Any(const dnnl::memory::desc& d) {
  return dnnl::memory::desc(d.get_dims(), dt::f32, dnnl::memory::format_tag::any);
}

// The descriptors of key k's pass on activations src and dst (nhwc, or `any`) and weights in
// the layout the primitive prefers: the forward pass's, which the backward passes take as a
// hint, and with it the backward pass's, if k is one.
struct Descs {
  dnnl::convolution_forward::primitive_desc fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights;
};

Descs MakeDescs(const Key& k, const dnnl::memory::desc& src, const dnnl::memory::desc& dst) {
  const auto weights = Any(Weights(k));
  const dims strides{k.s, k.s}, dilation{0, 0}, low{k.pt, k.pl}, high{k.pb, k.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (k.pass == kFwd && k.bias) {
    // The bias as a post-op, not the convolution's own: some kernels (AVX2's) start their
    // sums from the bias, which rounds differently from XLA's add after the convolution.
    dnnl::post_ops ops;
    ops.append_binary(dnnl::algorithm::binary_add, Bias(k.co));
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(ops);
  }
  const auto algo = dnnl::algorithm::convolution_direct;
  Descs d;
  d.fwd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, algo, src, weights, dnnl::memory::desc(),
      dst, strides, dilation, low, high, attr);
  if (k.pass == kBwdData) {
    d.bwd_data = dnnl::convolution_backward_data::primitive_desc(
        Engine(), algo, src, weights, dst, strides, dilation, low, high, d.fwd, attr);
  } else if (k.pass == kBwdWeights) {
    d.bwd_weights = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), algo, src, weights, dst, strides, dilation, low, high, d.fwd, attr);
  }
  return d;
}

// Images per chunk when weight-gradient key k runs on the activation layouts oneDNN prefers,
// or 0 where it runs on nhwc: grouped and depthwise convolutions and small ones (their
// reorders cost more than they save), and wherever oneDNN's nhwc kernel is not AVX2's direct
// one, or it prefers nhwc. On nhwc that kernel runs at down to half the speed it reaches on
// blocked layouts, reorders included; AVX-512's direct kernel runs as fast on nhwc, where the
// reorders were pure cost (docs/performance.md). Decided from descriptors alone, once per layer
// shape; chunks bound the reordered copies.
int64_t ChunkImages(Key k) {
  if (k.groups != 1 || k.ho * k.wo * k.kh * k.kw * k.ci * k.co < kBlockedMinMacs) return 0;
  k.n = 1;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto found = g_chunks.find(k);
    if (found != g_chunks.end()) return found->second;
  }
  const auto src = Activations(1, k.ci, k.h, k.w), dst = Activations(1, k.co, k.ho, k.wo);
  int64_t images = 0;
  if (std::string(MakeDescs(k, src, dst).bwd_weights.impl_info_str()) == "jit:avx2") {
    const auto pd = MakeDescs(k, Any(src), Any(dst)).bwd_weights;
    if (pd.src_desc() != src || pd.diff_dst_desc() != dst) {
      const int64_t image = pd.src_desc().get_size() + pd.diff_dst_desc().get_size();
      images = std::max<int64_t>(1, kChunkBytes / image);
    }
  }
  std::lock_guard<std::mutex> lock(g_mu);
  return g_chunks.emplace(k, images).first->second;
}

// The primitive for key k, created on first use (single-threaded: the caller has set OpenMP's
// thread count to 1, which oneDNN reads when it creates a primitive).
Entry* Get(const Key& k) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto found = g_cache.find(k);
  if (found != g_cache.end()) return found->second.get();
  auto e = std::make_unique<Entry>();
  const auto src = Activations(k.n, k.ci, k.h, k.w), dst = Activations(k.n, k.co, k.ho, k.wo);
  const Descs d = k.blocked ? MakeDescs(k, Any(src), Any(dst)) : MakeDescs(k, src, dst);
  e->weights_user = Weights(k);
  if (k.pass == kFwd) {
    e->prim = dnnl::convolution_forward(d.fwd);
    e->weights_prim = d.fwd.weights_desc();
    e->scratchpad = d.fwd.scratchpad_desc();
  } else if (k.pass == kBwdData) {
    e->prim = dnnl::convolution_backward_data(d.bwd_data);
    e->weights_prim = d.bwd_data.weights_desc();
    e->scratchpad = d.bwd_data.scratchpad_desc();
  } else {
    e->prim = dnnl::convolution_backward_weights(d.bwd_weights);
    e->weights_prim = d.bwd_weights.diff_weights_desc();
    e->scratchpad = d.bwd_weights.scratchpad_desc();
    if (k.blocked) {
      e->src_prim = d.bwd_weights.src_desc();
      e->dst_prim = d.bwd_weights.diff_dst_desc();
      e->src_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(Engine(), src, Engine(), e->src_prim));
      e->dst_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(Engine(), dst, Engine(), e->dst_prim));
    }
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

// --- Winograd F(2x2, 3x3): stride-1 3x3 "same" convolutions with many channels ---------------
// Their forward pass and input gradient compute each 2x2 block of outputs from a 4x4 block of
// inputs (a tile) with 16 products a pair of channels instead of 36 (Lavin and Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2016): transformed inputs V = B^T d B and
// weights U = G g G^T, 16 matrix products M = V U (oneDNN's matmul) over a block of tiles, and
// outputs A^T M A. oneDNN 3.2 has no Winograd convolution on these CPUs. The results differ
// from the direct convolution's by round-off; each output is computed by one thread in a
// fixed order, so runs stay bit-reproducible. Where it runs, and what it gains there:
// docs/performance.md. XRAYJAX_WINOGRAD=0 keeps the direct convolution everywhere.
constexpr int64_t kWinoMinChannels = 128, kWinoMinSize = 4;

bool WinogradEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("XRAYJAX_WINOGRAD");
    return !(v && std::string(v) == "0");
  }();
  return enabled;
}

bool UseWinograd(const Key& k) {
  return WinogradEnabled() && k.pass != kBwdWeights && k.groups == 1 && k.kh == 3 && k.kw == 3 &&
         k.s == 1 && k.pt == 1 && k.pl == 1 && k.ho == k.h && k.wo == k.w &&
         std::min(k.ci, k.co) >= kWinoMinChannels &&
         std::min(k.h, k.w) >= kWinoMinSize;
}

// The 16 matrix products of a block of `tb` tiles, (16, tb, cin) x (16, cin, cout): the
// weights are stored (16, ci, co) as the HWIO weights are, so the input gradient
// (cin = co, cout = ci) reads them transposed.
struct WinoKey {
  int64_t tb, cin, cout, transposed;
  auto Tie() const { return std::tie(tb, cin, cout, transposed); }
  bool operator<(const WinoKey& o) const { return Tie() < o.Tie(); }
};

struct WinoEntry {
  dnnl::matmul prim;
  dnnl::memory::desc src, weights, dst, scratchpad;
};

std::map<WinoKey, std::unique_ptr<WinoEntry>> g_wino;  // guarded by g_mu
thread_local Buffer t_zeros;

WinoEntry* GetMatmul(const WinoKey& k) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto found = g_wino.find(k);
  if (found != g_wino.end()) return found->second.get();
  auto e = std::make_unique<WinoEntry>();
  e->src = dnnl::memory::desc({16, k.tb, k.cin}, dt::f32, dnnl::memory::format_tag::abc);
  e->dst = dnnl::memory::desc({16, k.tb, k.cout}, dt::f32, dnnl::memory::format_tag::abc);
  e->weights = k.transposed
      ? dnnl::memory::desc({16, k.cin, k.cout}, dt::f32, dims{k.cin * k.cout, 1, k.cin})
      : dnnl::memory::desc({16, k.cin, k.cout}, dt::f32, dnnl::memory::format_tag::abc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(Engine(), e->src, e->weights, e->dst, attr);
  e->prim = dnnl::matmul(pd);
  e->scratchpad = pd.scratchpad_desc();
  return g_wino.emplace(k, std::move(e)).first->second.get();
}

// U[p][c][o] = (G g G^T)[p] for g = w[:, :, c, o] (HWIO), or for the input gradient the same of
// w rotated by 180 degrees; rows c in [c0, c1).
void TransformWeights(const float* w, int64_t ci, int64_t co, bool rotate, int64_t c0,
                      int64_t c1, float* U) {
  for (int64_t c = c0; c < c1; ++c) {
    const float* g[9];
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        const int a = rotate ? 2 - i : i, b = rotate ? 2 - j : j;
        g[i * 3 + j] = w + ((a * 3 + b) * ci + c) * co;
      }
    }
    float* u = U + c * co;
    const int64_t plane = ci * co;
#pragma omp simd
    for (int64_t o = 0; o < co; ++o) {
      float t[4][3];  // G g: rows of G times g's columns
      for (int j = 0; j < 3; ++j) {
        const float g0 = g[j][o], g1 = g[3 + j][o], g2 = g[6 + j][o];
        t[0][j] = g0;
        t[1][j] = .5f * (g0 + g1 + g2);
        t[2][j] = .5f * (g0 - g1 + g2);
        t[3][j] = g2;
      }
      for (int i = 0; i < 4; ++i) {  // (G g) G^T
        u[(i * 4 + 0) * plane + o] = t[i][0];
        u[(i * 4 + 1) * plane + o] = .5f * (t[i][0] + t[i][1] + t[i][2]);
        u[(i * 4 + 2) * plane + o] = .5f * (t[i][0] - t[i][1] + t[i][2]);
        u[(i * 4 + 3) * plane + o] = t[i][2];
      }
    }
  }
}

// The forward pass (with k.bias, plus the bias and the ReLU) or the input gradient of key k
// (UseWinograd) on activations `act`, weights w, into `out`, in slices of the batch.
ffi::Error RunWinograd(ffi::ThreadPool& pool, const Key& k, const float* act, const float* w,
                       float* out, const float* bias) {
  const bool fwd = k.pass == kFwd;
  const int64_t cin = fwd ? k.ci : k.co, cout = fwd ? k.co : k.ci, h = k.h, wd = k.w;
  const int64_t th = (h + 1) / 2, tw = (wd + 1) / 2, per_image = th * tw;
  // Tiles a block (16 x block x channels floats transformed at a time): 256 for 256 channels,
  // 128 for 512; in a one-thread harness 128-512 and 64-128 ran within 4% of each other.
  const int64_t block = std::clamp<int64_t>(65536 / std::max(cin, cout), 32, 512);
  float* U = static_cast<float*>(t_call.Get(16 * k.ci * k.co * sizeof(float)));
  constexpr int64_t kRows = 16;
  const int64_t row_blocks = (k.ci + kRows - 1) / kRows;
  xrayjax::ParallelFor(pool, row_blocks, xrayjax::Workers(pool, row_blocks), [&](int64_t r) {
    TransformWeights(w, k.ci, k.co, !fwd, r * kRows, std::min(k.ci, (r + 1) * kRows), U);
  });
  auto& engine = Engine();
  const std::string error = xrayjax::ForSlices(pool, k.n, xrayjax::Workers(pool, k.n),
                                               [&](int64_t, int64_t n0, int64_t n, int) {
    const float* x = act + n0 * h * wd * cin;
    float* y = out + n0 * h * wd * cout;
    const int64_t tiles = n * per_image;
    float* zeros = static_cast<float*>(t_zeros.Get(cin * sizeof(float)));
    std::fill_n(zeros, cin, 0.f);
    dnnl::stream stream(engine);
    for (int64_t t0 = 0; t0 < tiles; t0 += block) {
      const int64_t tb = std::min(block, tiles - t0);
      WinoEntry* e = GetMatmul({tb, cin, cout, !fwd});
      float* V = static_cast<float*>(t_src.Get(e->src.get_size()));
      float* M = static_cast<float*>(t_dst.Get(e->dst.get_size()));
      // V = B^T d B for each tile's 4x4 inputs d (zeros outside the map).
      const int64_t vp = tb * cin;
      for (int64_t t = 0; t < tb; ++t) {
        const int64_t img = (t0 + t) / per_image, r = (t0 + t) % per_image;
        const int64_t y0 = 2 * (r / tw) - 1, x0 = 2 * (r % tw) - 1;
        const float* d[16];
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 4; ++j) {
            const int64_t yy = y0 + i, xx = x0 + j;
            d[i * 4 + j] = yy < 0 || yy >= h || xx < 0 || xx >= wd
                ? zeros : x + ((img * h + yy) * wd + xx) * cin;
          }
        }
        float* v = V + t * cin;
#pragma omp simd
        for (int64_t c = 0; c < cin; ++c) {
          float q[4][4];  // B^T d
          for (int j = 0; j < 4; ++j) {
            const float d0 = d[j][c], d1 = d[4 + j][c], d2 = d[8 + j][c], d3 = d[12 + j][c];
            q[0][j] = d0 - d2;
            q[1][j] = d1 + d2;
            q[2][j] = d2 - d1;
            q[3][j] = d1 - d3;
          }
          for (int i = 0; i < 4; ++i) {  // (B^T d) B
            v[(i * 4 + 0) * vp + c] = q[i][0] - q[i][2];
            v[(i * 4 + 1) * vp + c] = q[i][1] + q[i][2];
            v[(i * 4 + 2) * vp + c] = q[i][2] - q[i][1];
            v[(i * 4 + 3) * vp + c] = q[i][1] - q[i][3];
          }
        }
      }
      dnnl::memory scratchpad(e->scratchpad, engine, t_scratchpad.Get(e->scratchpad.get_size()));
      e->prim.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(e->src, engine, V)},
                               {DNNL_ARG_WEIGHTS, dnnl::memory(e->weights, engine, U)},
                               {DNNL_ARG_DST, dnnl::memory(e->dst, engine, M)},
                               {DNNL_ARG_SCRATCHPAD, scratchpad}});
      stream.wait();
      // Outputs A^T M A, plus the bias and the ReLU (added after the sum, as XLA adds them).
      const int64_t mp = tb * cout;
      for (int64_t t = 0; t < tb; ++t) {
        const int64_t img = (t0 + t) / per_image, r = (t0 + t) % per_image;
        const int64_t y0 = 2 * (r / tw), x0 = 2 * (r % tw);
        const bool right = x0 + 1 < wd, down = y0 + 1 < h;
        const float* m = M + t * cout;
        float* o = y + ((img * h + y0) * wd + x0) * cout;
#pragma omp simd
        for (int64_t c = 0; c < cout; ++c) {
          float s[2][4];  // A^T M
          for (int j = 0; j < 4; ++j) {
            const float m0 = m[j * mp + c], m1 = m[(4 + j) * mp + c],
                        m2 = m[(8 + j) * mp + c], m3 = m[(12 + j) * mp + c];
            s[0][j] = m0 + m1 + m2;
            s[1][j] = m1 - m2 - m3;
          }
          float a[4] = {s[0][0] + s[0][1] + s[0][2], s[0][1] - s[0][2] - s[0][3],
                        s[1][0] + s[1][1] + s[1][2], s[1][1] - s[1][2] - s[1][3]};
          if (bias) {
            for (float& v : a) v = std::max(v + bias[c], 0.f);
          }
          o[c] = a[0];
          if (right) o[cout + c] = a[1];
          if (down) o[wd * cout + c] = a[2];
          if (down && right) o[(wd + 1) * cout + c] = a[3];
        }
      }
    }
  });
  if (!error.empty()) return ffi::Error::Internal("dnnl_conv: oneDNN failed: " + error);
  return ffi::Error::Success();
}

// Runs pass k.pass on activations `act` (x, or g for the input gradient), the other operand
// `other` (w, or g for the weight gradient) and the result `out`, in slices of the batch; with
// k.bias, the forward pass reads the bias `bias`.
ffi::Error Run(ffi::ThreadPool& pool, Key k, const float* act, const float* other, float* out,
               const float* bias = nullptr) {
  // The high paddings the shapes imply (see the top of the file).
  k.pb = (k.ho - 1) * k.s + k.kh - k.h - k.pt;
  k.pr = (k.wo - 1) * k.s + k.kw - k.w - k.pl;
  if (k.ci % k.groups || k.co % k.groups || k.pb < -k.s || k.pr < -k.s) {
    return ffi::Error::InvalidArgument("dnnl_conv: shapes, groups and padding do not agree");
  }
  if (k.n == 0) {  // an empty batch: empty maps, and a weight gradient of zeros
    if (k.pass == kBwdWeights) std::fill_n(out, k.kh * k.kw * (k.ci / k.groups) * k.co, 0.f);
    return ffi::Error::Success();
  }
  if (UseWinograd(k)) return RunWinograd(pool, k, act, other, out, bias);
  // Slice p holds images [n * p / parts, n * (p + 1) / parts): at most two sizes.
  const int parts = xrayjax::Workers(pool, k.n);
  const int64_t x_image = k.h * k.w * k.ci, y_image = k.ho * k.wo * k.co;
  omp_set_num_threads(1);
  // Per slice size i: the primitive for its images, or with chunks (a weight gradient on
  // blocked layouts, ChunkImages), for its full chunks and for its last, shorter one (tails).
  Entry* entries[2];
  Entry* tails[2] = {nullptr, nullptr};
  int64_t chunk = 0;
  try {
    if (k.pass == kBwdWeights) chunk = ChunkImages(k);
    for (int i = 0; i < 2; ++i) {
      Key slice = k;
      const int64_t images = xrayjax::SliceSize(k.n, parts, i);
      slice.blocked = chunk > 0;
      slice.n = chunk ? std::min(chunk, images) : images;
      entries[i] = Get(slice);
      if (images % slice.n) {
        slice.n = images % slice.n;
        tails[i] = Get(slice);
      }
    }
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("dnnl_conv: oneDNN failed: ") + err.what());
  }
  auto& engine = Engine();
  const size_t user_bytes = entries[0]->weights_user.get_size();
  // Inputs' weights, reordered once per call (each slice size may want its own layout).
  void* weights[2] = {const_cast<float*>(other), const_cast<float*>(other)};
  if (k.pass != kBwdWeights) {
    char* buffer = static_cast<char*>(t_call.Get(entries[0]->weights_prim.get_size() +
                                                 entries[1]->weights_prim.get_size()));
    dnnl::stream stream(engine);
    dnnl::memory user(entries[0]->weights_user, engine, const_cast<float*>(other));
    for (int i = 0; i < 2; ++i) {
      Entry* e = entries[i];
      if (!e->reorder) continue;
      if (i == 1 && e->weights_prim == entries[0]->weights_prim) {
        weights[1] = weights[0];
        continue;
      }
      weights[i] = buffer + i * entries[0]->weights_prim.get_size();
      dnnl::memory reordered(e->weights_prim, engine, weights[i]);
      e->weights_reorder.execute(stream, user, reordered);
    }
    stream.wait();
  }
  // The weight gradient's slices, in the user's layout, to be summed in order.
  float* sums = parts == 1 || k.pass != kBwdWeights
      ? nullptr : static_cast<float*>(t_call.Get(parts * user_bytes));
  const std::string error = xrayjax::ForSlices(pool, k.n, parts, [&](int64_t p, int64_t n0,
                                                                      int64_t n, int i) {
    Entry* e = entries[i];
    dnnl::stream stream(engine);
    if (k.pass == kBwdWeights) {
      // The slice's chunks in order, each one's gradient added to the first's.
      float* part = sums ? sums + p * (user_bytes / sizeof(float)) : out;
      const int64_t full = chunk ? std::min(chunk, n) : n;
      for (int64_t c0 = 0; c0 < n; c0 += full) {
        const int64_t m = std::min(full, n - c0);
        Entry* c = m == full ? e : tails[i];
        float* sum = c0 ? static_cast<float*>(t_chunk_weights.Get(user_bytes)) : part;
        dnnl::memory user(c->weights_user, engine, sum);
        dnnl::memory x(Activations(m, k.ci, k.h, k.w), engine,
                       const_cast<float*>(act) + (n0 + c0) * x_image);
        dnnl::memory g(Activations(m, k.co, k.ho, k.wo), engine,
                       const_cast<float*>(other) + (n0 + c0) * y_image);
        if (chunk) {
          dnnl::memory xb(c->src_prim, engine, t_src.Get(c->src_prim.get_size()));
          dnnl::memory gb(c->dst_prim, engine, t_dst.Get(c->dst_prim.get_size()));
          c->src_reorder.execute(stream, x, xb);
          c->dst_reorder.execute(stream, g, gb);
          x = xb;
          g = gb;
        }
        dnnl::memory dw = c->reorder
            ? dnnl::memory(c->weights_prim, engine,
                           t_slice_weights.Get(c->weights_prim.get_size()))
            : user;
        dnnl::memory scratchpad(c->scratchpad, engine,
                                t_scratchpad.Get(c->scratchpad.get_size()));
        c->prim.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, g},
                                 {DNNL_ARG_DIFF_WEIGHTS, dw}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
        if (c->reorder) c->weights_reorder.execute(stream, dw, user);
        stream.wait();
        if (c0) {
          for (size_t j = 0; j < user_bytes / sizeof(float); ++j) part[j] += sum[j];
        }
      }
    } else {
      const auto src = Activations(n, k.ci, k.h, k.w), dst = Activations(n, k.co, k.ho, k.wo);
      dnnl::memory scratchpad(e->scratchpad, engine, t_scratchpad.Get(e->scratchpad.get_size()));
      std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SCRATCHPAD, scratchpad}};
      args.insert({DNNL_ARG_WEIGHTS, dnnl::memory(e->weights_prim, engine, weights[i])});
      if (k.pass == kFwd) {
        if (k.bias) {
          args.insert({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                       dnnl::memory(Bias(k.co), engine, const_cast<float*>(bias))});
        }
        args.insert({{DNNL_ARG_SRC,
                      dnnl::memory(src, engine, const_cast<float*>(act) + n0 * x_image)},
                     {DNNL_ARG_DST, dnnl::memory(dst, engine, out + n0 * y_image)}});
      } else {
        args.insert({{DNNL_ARG_DIFF_DST,
                      dnnl::memory(dst, engine, const_cast<float*>(act) + n0 * y_image)},
                     {DNNL_ARG_DIFF_SRC, dnnl::memory(src, engine, out + n0 * x_image)}});
      }
      e->prim.execute(stream, args);
    }
    stream.wait();
  });
  if (!error.empty()) {
    return ffi::Error::Internal("dnnl_conv: oneDNN failed: " + error);
  }
  if (sums) xrayjax::SumInOrder(sums, parts, user_bytes / sizeof(float), out);
  return ffi::Error::Success();
}

// The key of pass P on operands `a` and `b` and result `r`, which play the parts of the input
// x, the output y and the weights w as the top of the file lists (nullopt: not all 4-D).
template <Pass P>
std::optional<Key> MakeKey(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b,
                           ffi::Span<const int64_t> r, int64_t s, int64_t pt, int64_t pl,
                           int64_t groups, int64_t bias) {
  const ffi::Span<const int64_t> d[3] = {a, b, r};
  if (d[0].size() != 4 || d[1].size() != 4 || d[2].size() != 4) return std::nullopt;
  constexpr int kX[3] = {0, 2, 0}, kY[3] = {2, 0, 1}, kW[3] = {1, 1, 2};
  const auto x = d[kX[P]], y = d[kY[P]], w = d[kW[P]];
  return Key{P, x[0], x[1], x[2], x[3], y[1], y[2], y[3], w[0], w[1], s, pt, pl, 0, 0, groups,
             bias};
}

const ffi::Error kNot4D = ffi::Error::InvalidArgument("dnnl_conv: operands are not 4-D");

// One handler per pass.
template <Pass P>
ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> r, int64_t s, int64_t pt, int64_t pl,
                int64_t groups) {
  const auto k = MakeKey<P>(a.dimensions(), b.dimensions(), r->dimensions(), s, pt, pl, groups, 0);
  if (!k) return kNot4D;
  return Run(pool, *k, a.typed_data(), b.typed_data(), r->typed_data());
}

ffi::Error ConvBiasRelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t s,
                        int64_t pt, int64_t pl, int64_t groups) {
  const auto k = MakeKey<kFwd>(x.dimensions(), w.dimensions(), y->dimensions(), s, pt, pl,
                               groups, 1);
  if (!k) return kNot4D;
  if (b.dimensions().size() != 1 || b.dimensions()[0] != k->co) {
    return ffi::Error::InvalidArgument("dnnl_conv: the bias is not one value per output channel");
  }
  return Run(pool, *k, x.typed_data(), w.typed_data(), y->typed_data(), b.typed_data());
}

}  // namespace

#define XRAYJAX_DNNL_CONV(name, pass)                                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Conv<pass>,                     \
                                ffi::Ffi::Bind()                      \
                                    .Ctx<ffi::ThreadPool>()           \
                                    .Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Ret<ffi::Buffer<ffi::F32>>()     \
                                    .Attr<int64_t>("s")               \
                                    .Attr<int64_t>("pt")              \
                                    .Attr<int64_t>("pl")              \
                                    .Attr<int64_t>("groups"));

// For status(): whether Winograd's layers run (the library reads XRAYJAX_WINOGRAD once).
extern "C" int xrayjax_winograd_enabled() { return WinogradEnabled(); }

XRAYJAX_DNNL_CONV(xrayjax_dnnl_conv_fwd, kFwd)
XRAYJAX_DNNL_CONV(xrayjax_dnnl_conv_bwd_data, kBwdData)
XRAYJAX_DNNL_CONV(xrayjax_dnnl_conv_bwd_weights, kBwdWeights)

XLA_FFI_DEFINE_HANDLER_SYMBOL(xrayjax_dnnl_conv_bias_relu_fwd, ConvBiasRelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("groups"));

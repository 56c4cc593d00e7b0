"""CPU kernels for what XLA's CPU backend runs slowly: convolutions and max pooling through oneDNN,
and our own 1x1 weight gradient.

XLA's CPU backend runs convolutions well below this machine's peak, and grouped (depthwise) ones
far below it (docs/performance.md has the figures). Every float32 convolution with a kernel
larger than 1x1 (dense, strided, grouped, depthwise) runs its forward pass, input gradient and
weight gradient through oneDNN (`onednn_conv.cc`), the library TensorFlow's CPU kernels call,
from the `onednn-cpu-gomp` wheel; stride-1 3x3 SAME ones with 128 channels or more on each side
run their forward pass and input gradient as Winograd F(2x2, 3x3) there (2.25 times fewer
multiplications; our transforms, oneDNN's matmul for the products; `XRAYJAX_WINOGRAD=0` keeps
the direct convolution, whose results differ by round-off). 1x1 convolutions run their forward
pass through oneDNN too, their input gradient as one matrix product (XLA's `dot_general`), and
their weight gradient as a native OpenBLAS `sgemm` (`cpu_kernels.cc`), where XLA first copies
both operands into transposed layouts and oneDNN was slower (the figures are in
docs/performance.md). Overlapping
max pools (the ResNets' stem, Xception) run oneDNN's forward pass, which records each window's
first maximum, and its input gradient, which reads that record (`onednn_pool.cc`), where XLA
differentiates reduce-window through four index arrays and a scatter. jax.random's hash,
Threefry-2x32, is one native call too (`cpu_kernels.cc`): jax lowers it on the CPU to a loop
that XLA compiles anew for every tensor drawn, most of a deep network's initialisation's compile
time; the bits are the same.

The files are compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`) into
one library in `$XRAYJAX_CACHE/kernels` (default `~/.cache/xrayjax/kernels`, `xrayjax/build.py`),
keyed by the sources, the compiler and its flags, jax's and oneDNN's versions and the CPU, and
registered through `jax.ffi`. Where it cannot be built (no compiler, no oneDNN or OpenBLAS
wheel: oneDNN's are for x86-64 Linux) or `XRAYJAX_NATIVE=0` is set, the models use XLA's forms:
`status()` says which ran and why, and runs write it into their log.

`conv`, `conv_bias_relu`, `pointwise` and `max_pool` are the ops (`jax.custom_vjp`, each one
jitted function, so a process traces it once per shape). The kernels run on the CPU backend
only (`lax.platform_dependent`: a program lowered for an accelerator keeps XLA's forms), for
float32 operands (other dtypes, and machines without the kernels, take XLA's).
Threefry's is a CPU lowering of `jax.extend.random.threefry2x32_p`, registered with the kernels
(a program lowered before they load, or for an accelerator, keeps jax's).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import pathlib
import platform
from importlib import metadata, resources

import jax
import jax.extend.random as jax_random
import jax.numpy as jnp
from jax import lax
from jax.interpreters import mlir

from xrayjax import build

NHWC = ("NHWC", "HWIO", "NHWC")
_SOURCES = ("cpu_kernels.cc", "onednn_conv.cc", "onednn_pool.cc")
_HEADERS = ("parallel.h",)
_TARGETS = ("xrayjax_pointwise_weight_grad", "xrayjax_dnnl_conv_fwd",
            "xrayjax_dnnl_conv_bwd_data", "xrayjax_dnnl_conv_bwd_weights",
            "xrayjax_dnnl_conv_bias_relu_fwd", "xrayjax_dnnl_max_pool_fwd",
            "xrayjax_dnnl_max_pool_bwd", "xrayjax_threefry2x32")


def _cpu_identity() -> str:
  """What `-march=native` depends on, so a cache shared between machines never mixes CPUs."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
  except OSError:
    return platform.processor() or platform.machine()


def _onednn() -> tuple[str, pathlib.Path, pathlib.Path]:
  """oneDNN's version, header directory and library directory, from its PyPI wheels."""
  def find(dist: str, name: str) -> pathlib.Path:
    try:
      files = metadata.files(dist) or ()
    except metadata.PackageNotFoundError:
      raise RuntimeError(f"oneDNN is not installed (no {dist} wheel; it exists for x86-64 "
                         "Linux: pip install onednn-devel-cpu-gomp)") from None
    for f in files:
      if str(f).endswith(name):
        return pathlib.Path(f.locate()).resolve()
    raise RuntimeError(f"the {dist} wheel has no {name}")
  lib = find("onednn-cpu-gomp", "libdnnl.so.3")
  include = find("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp").parents[2]
  return metadata.version("onednn-cpu-gomp"), include, lib.parent


def _build() -> pathlib.Path:
  """Compiles the kernels (once per key) and returns the shared library's path."""
  import scipy_openblas32  # pylint: disable=import-outside-toplevel

  dnnl_version, dnnl_include, dnnl_lib = _onednn()
  blas_lib = scipy_openblas32.get_lib_dir()
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
           f"-I{jax.ffi.include_dir()}", f"-I{scipy_openblas32.get_include_dir()}",
           f"-I{dnnl_include}", f"-L{blas_lib}", f"-l{scipy_openblas32.get_library()}",
           f"-L{dnnl_lib}", "-l:libdnnl.so.3", f"-Wl,-rpath,{blas_lib}:{dnnl_lib}"]
  files = {name: (resources.files(__package__) / name).read_bytes()
           for name in _SOURCES + _HEADERS}
  return build.library("xrayjax_kernels", files, _SOURCES, flags,
                       depends=(jax.__version__, dnnl_version, _cpu_identity()))


@functools.cache
def _load() -> tuple[bool, str]:
  if os.environ.get("XRAYJAX_NATIVE", "1") == "0":
    return False, "XLA's convolutions (XRAYJAX_NATIVE=0)"
  try:
    path = _build()
    lib = ctypes.cdll.LoadLibrary(str(path))
    for name in _TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    mlir.register_lowering(jax_random.threefry2x32_p,
                           mlir.lower_fun(_threefry2x32, multiple_results=True), platform="cpu")
  except (ImportError, OSError, RuntimeError) as e:
    logging.warning("xrayjax.kernels: using XLA's convolutions on the CPU: %s", e)
    return False, f"XLA's convolutions (native kernels unavailable: {e})"
  winograd = ("for wide 3x3 layers" if lib.xrayjax_winograd_enabled()
              else "off: XRAYJAX_WINOGRAD=0")
  return True, (f"native CPU kernels: oneDNN {_onednn()[0]} convolutions (Winograd F(2x2, 3x3) "
                f"{winograd}) and max pooling, Threefry-2x32 ({path})")


def _threefry2x32(k1, k2, x1, x2):
  """jax.random's hash on the CPU (jax's own rule lowers it to a loop that XLA compiles anew
  for every parameter tensor drawn): the same bits, from one native kernel."""
  shape = jnp.broadcast_shapes(k1.shape, k2.shape, x1.shape, x2.shape)
  if math.prod(shape) == 0:
    return jnp.zeros(shape, jnp.uint32), jnp.zeros(shape, jnp.uint32)
  if k1.size == k2.size == 1:  # one key (every draw of a network's initialisation): not copied
    k1, k2 = k1.reshape(()), k2.reshape(())
  else:
    k1, k2 = jnp.broadcast_to(k1, shape), jnp.broadcast_to(k2, shape)
  out = jax.ShapeDtypeStruct(shape, jnp.uint32)
  return jax.ffi.ffi_call("xrayjax_threefry2x32", (out, out), vmap_method="broadcast_all")(
      k1, k2, jnp.broadcast_to(x1, shape), jnp.broadcast_to(x2, shape))


def native() -> bool:
  """Whether the native kernels are built and registered (builds them on first call)."""
  return _load()[0]


def status() -> str:
  """One line saying which convolutions the CPU backend runs, and why."""
  return _load()[1]


def _require():
  if not native():
    raise RuntimeError(f"xrayjax.kernels: the native kernels are not available: {status()}")


def _use_native(x, w) -> bool:
  return x.dtype == w.dtype == jnp.float32 and native()


Padding = tuple[tuple[int, int], tuple[int, int]]


@functools.cache
def _jit(op, *static):
  """`op` jitted, one per op: a process traces each op once per shape and static arguments,
  not once per call (both branches of every platform_dependent and each gradient); XLA
  inlines it, so programs compile as before."""
  return jax.jit(op, static_argnums=static)


# --- convolutions with a kernel larger than 1x1: oneDNN ----------------------------------------


def _depthwise_xla(x, w, padding: Padding):
  """Depthwise conv (w: kh, kw, 1, C) as kh * kw shifted, channel-scaled copies of the input,
  which XLA fuses into one loop (its grouped convolutions run far below peak on the CPU)."""
  kh, kw = w.shape[:2]
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return sum(x[:, i:i + out_h, j:j + out_w] * w[i, j, 0] for i in range(kh) for j in range(kw))


def _conv_xla(x, w, stride: int, padding: Padding, groups: int):
  """XLA's form of `conv` (accelerators, other dtypes, machines without the kernels)."""
  if stride == 1 and w.shape[2] == 1 and groups == x.shape[-1] == w.shape[-1]:
    return _depthwise_xla(x, w, padding)
  return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC,
                                  feature_group_count=groups)


def _dnnl(name: str, shapes, *operands, stride: int, padding: Padding, groups: int):
  """Calls oneDNN's target `name` on float32 `operands`; `shapes` is the result's shape, or a
  list of the results' shapes."""
  results = (jax.ShapeDtypeStruct(shapes, jnp.float32) if isinstance(shapes, tuple)
             else [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
  call = jax.ffi.ffi_call(name, results, vmap_method="sequential")
  return call(*operands, s=stride, pt=padding[0][0], pl=padding[1][0], groups=groups)


def _conv_shape(x, w, stride: int, padding: Padding, groups: int) -> tuple[int, ...]:
  return jax.eval_shape(functools.partial(_conv_xla, stride=stride, padding=padding,
                                          groups=groups), x, w).shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_native(x, w, stride: int, padding: Padding, groups: int):
  shape = _conv_shape(x, w, stride, padding, groups)
  attrs = dict(stride=stride, padding=padding, groups=groups)
  return lax.platform_dependent(
      x, w, cpu=lambda x, w: _dnnl("xrayjax_dnnl_conv_fwd", shape, x, w, **attrs),
      default=lambda x, w: _conv_xla(x, w, stride, padding, groups))


def _conv_native_fwd(x, w, stride, padding, groups):
  return _conv_native(x, w, stride, padding, groups), (x, w)


def _input_gradient(x, w, g, stride: int, padding: Padding, groups: int):
  attrs = dict(stride=stride, padding=padding, groups=groups)
  return lax.platform_dependent(
      g, w, cpu=lambda g, w: _dnnl("xrayjax_dnnl_conv_bwd_data", x.shape, g, w, **attrs),
      default=lambda g, w: jax.vjp(lambda x: _conv_xla(x, w, **attrs), x)[1](g)[0])


def _weight_gradient_xla(x, w, g, stride: int, padding: Padding, groups: int):
  return jax.vjp(lambda w: _conv_xla(x, w, stride, padding, groups), w)[1](g)[0]


def _conv_native_bwd(stride, padding, groups, res, g):
  x, w = res
  attrs = dict(stride=stride, padding=padding, groups=groups)
  dw = lax.platform_dependent(
      x, g, cpu=lambda x, g: _dnnl("xrayjax_dnnl_conv_bwd_weights", w.shape, x, g, **attrs),
      default=lambda x, g: _weight_gradient_xla(x, w, g, **attrs))
  return _input_gradient(x, w, g, **attrs), dw


_conv_native.defvjp(_conv_native_fwd, _conv_native_bwd)


def conv(x, w, stride: int, padding: Padding, groups: int = 1):
  """An NHWC/HWIO conv at stride (s, s) with non-negative padding ((top, bottom), (left,
  right)) and `groups` feature groups (w: kh, kw, Ci / groups, Co; groups = Ci = Co is a
  depthwise conv): oneDNN's three passes on the CPU for float32, else XLA's."""
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  if _use_native(x, w):
    return _jit(_conv_native, 2, 3, 4)(x, w, int(stride), padding, int(groups))
  return _conv_xla(x, w, int(stride), padding, int(groups))


def _conv_bias_relu_xla(x, w, b, stride: int, padding: Padding, groups: int):
  return jax.nn.relu(_conv_xla(x, w, stride, padding, groups) + b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_bias_relu_native(x, w, b, stride: int, padding: Padding, groups: int):
  shape = _conv_shape(x, w, stride, padding, groups)
  attrs = dict(stride=stride, padding=padding, groups=groups)
  return lax.platform_dependent(
      x, w, b, cpu=lambda x, w, b: _dnnl("xrayjax_dnnl_conv_bias_relu_fwd", shape, x, w, b,
                                         **attrs),
      default=lambda x, w, b: _conv_bias_relu_xla(x, w, b, **attrs))


def _conv_bias_relu_fwd(x, w, b, stride, padding, groups):
  y = _conv_bias_relu_native(x, w, b, stride, padding, groups)
  return y, (x, w, y)


def _conv_bias_relu_bwd(stride, padding, groups, res, g):
  x, w, y = res
  attrs = dict(stride=stride, padding=padding, groups=groups)
  g = jnp.where(y > 0, g, 0)  # the ReLU's gradient: y > 0 exactly where conv + b > 0
  dw = lax.platform_dependent(
      x, g, cpu=lambda x, g: _dnnl("xrayjax_dnnl_conv_bwd_weights", w.shape, x, g, **attrs),
      default=lambda x, g: _weight_gradient_xla(x, w, g, **attrs))
  db = jnp.sum(g, (0, 1, 2))  # XLA's order, as for an unfused bias: training stays bit-identical
  return _input_gradient(x, w, g, **attrs), dw, db


_conv_bias_relu_native.defvjp(_conv_bias_relu_fwd, _conv_bias_relu_bwd)


def conv_bias_relu(x, w, b, stride: int, padding: Padding, groups: int = 1):
  """max(conv(x, w) + b, 0), as `conv` with a bias b (Co,) and a ReLU: on the CPU for float32
  one oneDNN convolution that adds the bias and applies the ReLU as it writes its output
  (TensorFlow fuses them so), with `conv`'s gradients and XLA's sum for the bias's; XLA's conv,
  add and ReLU elsewhere."""
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  if _use_native(x, w) and b.dtype == jnp.float32:
    return _jit(_conv_bias_relu_native, 3, 4, 5)(x, w, b, int(stride), padding, int(groups))
  return _conv_bias_relu_xla(x, w, b, int(stride), padding, int(groups))


# --- 1x1 convolutions: a matrix product, and a native weight gradient ----------------------------


def _rows_per_tile(cin: int, cout: int) -> int:
  """Rows per tile so that a tile of both operands (~384 KiB) stays in a core's L2."""
  return max(256, (96 * 1024) // (cin + cout))


def pointwise_weight_grad(x, g, private_bytes: int = 64 << 20):
  """The native weight gradient of a 1x1 NHWC conv, x^T g over every position: (1, 1, Ci, Co),
  float32. Workers sum tiles of rows privately unless their sums would take more than
  `private_bytes`; then each takes a block of output channels (see cpu_kernels.cc)."""
  _require()  # registers the FFI targets in this process
  ci, co = x.shape[-1], g.shape[-1]
  call = jax.ffi.ffi_call("xrayjax_pointwise_weight_grad",
                          jax.ShapeDtypeStruct((1, 1, ci, co), jnp.float32),
                          vmap_method="sequential")
  return call(x, g, tile=_rows_per_tile(ci, co), private_bytes=private_bytes)


def pointwise_product(x, w, precision=None):
  """A 1x1 conv (w: 1, 1, Ci, Co) as one matrix product over the channels."""
  return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())), precision=precision)


def _pointwise_forward(x, w):
  """oneDNN's 1x1 convolution on the CPU, XLA's matrix product elsewhere."""
  shape = (*x.shape[:3], w.shape[-1])
  return lax.platform_dependent(
      x, w, cpu=lambda x, w: _dnnl("xrayjax_dnnl_conv_fwd", shape, x, w, stride=1,
                                   padding=((0, 0), (0, 0)), groups=1),
      default=pointwise_product)


@jax.custom_vjp
def _pointwise_native(x, w):
  return _pointwise_forward(x, w)


def _pointwise_native_fwd(x, w):
  return _pointwise_forward(x, w), (x, w)


def _pointwise_native_bwd(res, g):
  x, w = res
  (dx,) = jax.vjp(lambda x: pointwise_product(x, w), x)[1](g)
  xla = lambda x, g: jax.vjp(lambda w: pointwise_product(x, w), w)[1](g)[0]
  return dx, lax.platform_dependent(x, g, cpu=pointwise_weight_grad, default=xla)


_pointwise_native.defvjp(_pointwise_native_fwd, _pointwise_native_bwd)


def pointwise(x, w):
  """A 1x1 NHWC/HWIO conv at stride 1 without padding (stride the input first)."""
  return (_jit(_pointwise_native) if _use_native(x, w) else pointwise_product)(x, w)


# --- max pooling: oneDNN -------------------------------------------------------------------------


def _max_pool_xla(x, window: tuple[int, int], strides: tuple[int, int], padding: Padding):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *padding, (0, 0)))


def _pool_attrs(window, strides, padding: Padding) -> dict:
  (kh, kw), (sh, sw) = window, strides
  return dict(kh=kh, kw=kw, sh=sh, sw=sw, pt=padding[0][0], pl=padding[1][0])


def _max_pool_dnnl_fwd(x, window, strides, padding):
  """oneDNN's pooled maps and, for the gradient, each window's chosen tap (uint8, one per
  output): the input gradient reads those, not x."""
  shape = jax.eval_shape(lambda x: _max_pool_xla(x, window, strides, padding), x).shape
  results = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.uint8))
  call = jax.ffi.ffi_call("xrayjax_dnnl_max_pool_fwd", results, vmap_method="sequential")
  y, taps = lax.platform_dependent(
      x, cpu=lambda x: tuple(call(x, **_pool_attrs(window, strides, padding))),
      default=lambda x: (_max_pool_xla(x, window, strides, padding),
                         jnp.zeros(shape, jnp.uint8)))  # unread by XLA's gradient: dropped
  return y, (x, taps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_dnnl(x, window, strides, padding):
  return _max_pool_dnnl_fwd(x, window, strides, padding)[0]


def _max_pool_dnnl_bwd(window, strides, padding, res, g):
  x, taps = res
  call = jax.ffi.ffi_call("xrayjax_dnnl_max_pool_bwd", jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="sequential")
  return (lax.platform_dependent(
      g, taps, cpu=lambda g, taps: call(g, taps, **_pool_attrs(window, strides, padding)),
      default=lambda g, _: jax.vjp(lambda x: _max_pool_xla(x, window, strides, padding),
                                   x)[1](g)[0]),)


_max_pool_dnnl.defvjp(_max_pool_dnnl_fwd, _max_pool_dnnl_bwd)


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding: Padding):
  """NHWC max pooling (padding: ((top, bottom), (left, right)), never chosen): on the CPU for
  float32, oneDNN's forward pass, which records each window's first maximum (the one XLA's
  gradient picks), and its input gradient, which reads that record; XLA's reduce-window
  elsewhere, and for windows oneDNN does not take (padding as wide as the window, or more
  than 255 taps)."""
  window, strides = tuple(window), tuple(strides)
  padding = tuple(map(tuple, padding))
  fits = window[0] * window[1] < 256 and all(p < k for k, pair in zip(window, padding)
                                             for p in pair)
  if x.dtype == jnp.float32 and fits and native():
    return _jit(_max_pool_dnnl, 1, 2, 3)(x, window, strides, padding)
  return _max_pool_xla(x, window, strides, padding)

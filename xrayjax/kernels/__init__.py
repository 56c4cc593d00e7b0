"""Native CPU kernels for the gradients XLA's CPU backend runs slowly: convolution weight
gradients and max pooling's input gradient.

XLA's CPU backend computes the weight gradient of a dense convolution far below the machine's
matmul peak, and that of a depthwise convolution as slow reductions (docs/performance.md has
the figures). `cpu_kernels.cc` computes both natively: the dense one as one BLAS `sgemm` per
tap over every row at once (OpenBLAS from the `scipy-openblas32` wheel), the depthwise one as a
vectorised loop with private accumulators; both on XLA's intra-op thread pool. The dense kernel
also takes the weight gradient of 1x1 convolutions (one `sgemm` over the rows, no padding),
where XLA first copies both operands into transposed layouts. Max pooling's input gradient is
a loop that sends each window's gradient to its first maximum, where XLA differentiates
reduce-window through four index arrays and a scatter.

The library is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`) into
`$XRAYJAX_CACHE/kernels` (default `~/.cache/xrayjax/kernels`), keyed by the source, the compiler
flags, jax's version and the CPU, and registered through `jax.ffi`. Where it cannot be built (no
compiler, no OpenBLAS wheel) or `XRAYJAX_NATIVE=0` is set, the models use the pure-JAX forms:
`status()` says which ran and why, and runs write it into their log.

`conv`, `pointwise`, `depthwise` and `max_pool` are the ops with these gradients
(`jax.custom_vjp`). The convolutions keep XLA's forward pass and input gradient, and take the
native weight gradient; `max_pool` keeps XLA's forward pass and takes the native input
gradient. The native kernels run on the CPU backend only (`lax.platform_dependent`: a program
lowered for an accelerator keeps XLA's), for float32 operands (other dtypes, and machines
without the kernels, take XLA's gradient). The convolutions cover stride 1 and non-negative
padding (`pointwise`: none; a strided 1x1 conv is the strided input's), and `strided_conv`
strided stems (their weight gradient is that of a stride-1 conv on the input's s x s blocks);
models/common.py sends them only such convs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from importlib import resources

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
_SOURCE = "cpu_kernels.cc"
_TARGETS = ("xrayjax_conv_weight_grad", "xrayjax_depthwise_weight_grad",
            "xrayjax_max_pool_grad")


def _cpu_identity() -> str:
  """What `-march=native` depends on, so a cache shared between machines never mixes CPUs."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
  except OSError:
    return platform.processor() or platform.machine()


def _build() -> pathlib.Path:
  """Compiles cpu_kernels.cc (once per key) and returns the shared library's path."""
  import scipy_openblas32  # pylint: disable=import-outside-toplevel

  cxx = os.environ.get("CXX", "c++")
  source = resources.files(__package__) / _SOURCE
  code = source.read_bytes()
  lib_dir = scipy_openblas32.get_lib_dir()
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
           f"-I{jax.ffi.include_dir()}", f"-I{scipy_openblas32.get_include_dir()}",
           f"-L{lib_dir}", f"-l{scipy_openblas32.get_library()}", f"-Wl,-rpath,{lib_dir}"]
  key = hashlib.sha256(b"\0".join(
      [code, " ".join(flags).encode(), jax.__version__.encode(), _cpu_identity().encode()]
  )).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("XRAYJAX_CACHE", pathlib.Path.home() / ".cache" / "xrayjax"))
  target = cache / "kernels" / f"cpu_kernels-{key}.so"
  if target.exists():
    return target
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set $CXX)")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    src = pathlib.Path(tmp) / _SOURCE
    src.write_bytes(code)
    out = pathlib.Path(tmp) / target.name
    done = subprocess.run([cxx, str(src), "-o", str(out), *flags], capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"{cxx} failed on {_SOURCE}:\n{done.stderr[-2000:]}")
    os.replace(out, target)  # atomic: concurrent first uses (test workers) agree
  return target


@functools.cache
def _load() -> tuple[bool, str]:
  if os.environ.get("XRAYJAX_NATIVE", "1") == "0":
    return False, "pure-JAX convolution gradients (XRAYJAX_NATIVE=0)"
  try:
    path = _build()
    lib = ctypes.cdll.LoadLibrary(str(path))
    for name in _TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  except (ImportError, OSError, RuntimeError) as e:
    logging.warning("xrayjax.kernels: using XLA's convolution gradients on the CPU: %s", e)
    return False, f"pure-JAX convolution gradients (native kernels unavailable: {e})"
  return True, f"native CPU weight-gradient kernels ({path})"


def native() -> bool:
  """Whether the native kernels are built and registered (builds them on first call)."""
  return _load()[0]


def status() -> str:
  """One line saying which convolution gradients the CPU backend runs, and why."""
  return _load()[1]


Padding = tuple[tuple[int, int], tuple[int, int]]


def _conv_lax_strided(stride: int, x, w, padding: Padding):
  return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)


_conv_lax = functools.partial(_conv_lax_strided, 1)


def _depthwise_xla(x, w, padding: Padding):
  """Depthwise conv (w: kh, kw, 1, C) as kh * kw shifted, channel-scaled copies of the input,
  which XLA fuses into one loop (its grouped convolutions run far below peak on the CPU)."""
  kh, kw = w.shape[:2]
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return sum(x[:, i:i + out_h, j:j + out_w] * w[i, j, 0] for i in range(kh) for j in range(kw))


def _require():
  if not native():
    raise RuntimeError(f"xrayjax.kernels: the native kernels are not available: {status()}")


def _rows_per_tile(cin: int, cout: int) -> int:
  """Rows per tile so that a tile of both operands (~384 KiB) stays in a core's L2."""
  return max(256, (96 * 1024) // (cin + cout))


def conv_weight_grad(x, g, kernel_hw: tuple[int, int], padding: Padding,
                     private_bytes: int = 64 << 20):
  """The native weight gradient of a stride-1 NHWC conv: (kh, kw, Ci, Co), float32.

  Workers sum tiles of rows privately (all taps per tile) unless their sums would take more
  than `private_bytes`; then each takes whole taps (see cpu_kernels.cc)."""
  _require()  # registers the FFI targets in this process
  kh, kw = kernel_hw
  (pt, pb), (pl, pr) = padding
  ci, co = x.shape[-1], g.shape[-1]
  if (kh, kw) == (1, 1) and pt == pb == pl == pr == 0:
    xp, gp = x, g  # a 1x1 conv needs no shifted rows (see the kernel)
  else:
    xp = jnp.pad(x, ((0, 0), (pt, pb + 1), (pl, pr), (0, 0)))  # one extra row: see the kernel
    gp = jnp.pad(g, ((0, 0), (0, kh), (0, kw - 1), (0, 0)))
  tile = _rows_per_tile(ci, co)
  call = jax.ffi.ffi_call("xrayjax_conv_weight_grad",
                          jax.ShapeDtypeStruct((kh, kw, ci, co), jnp.float32),
                          vmap_method="sequential")
  return call(xp, gp, kh=kh, kw=kw, tile=tile, private_bytes=private_bytes)


def depthwise_weight_grad(x, g, kernel_hw: tuple[int, int], padding: Padding):
  """The native weight gradient of a stride-1 NHWC depthwise conv: (kh, kw, 1, C), float32."""
  _require()
  kh, kw = kernel_hw
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  call = jax.ffi.ffi_call("xrayjax_depthwise_weight_grad",
                          jax.ShapeDtypeStruct((kh, kw, 1, x.shape[-1]), jnp.float32),
                          vmap_method="sequential")
  return call(xp, g, kh=kh, kw=kw)


def _with_native_weight_grad(forward, native_grad):
  """`forward(x, w, padding)` whose weight gradient is `native_grad` on the CPU backend."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def f(x, w, padding):
    return forward(x, w, padding)

  def fwd(x, w, padding):
    return forward(x, w, padding), (x, w)

  def bwd(padding, res, g):
    x, w = res
    (dx,) = jax.vjp(lambda x: forward(x, w, padding), x)[1](g)
    xla = lambda x, g: jax.vjp(lambda w: forward(x, w, padding), w)[1](g)[0]
    dw = lax.platform_dependent(
        x, g, cpu=lambda x, g: native_grad(x, g, w.shape[:2], padding), default=xla)
    return dx, dw

  f.defvjp(fwd, bwd)
  return f


def pointwise_product(x, w, precision=None):
  """A 1x1 conv (w: 1, 1, Ci, Co) as one matrix product over the channels."""
  return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())), precision=precision)


def _pointwise_xla(x, w, padding: Padding):
  del padding  # none: models/common.py sends only unpadded 1x1 convs
  return pointwise_product(x, w)


_conv_native = _with_native_weight_grad(_conv_lax, conv_weight_grad)
_pointwise_native = _with_native_weight_grad(_pointwise_xla, conv_weight_grad)
_depthwise_native = _with_native_weight_grad(_depthwise_xla, depthwise_weight_grad)


def blocked_weight_grad(stride: int, x, g, kernel_hw: tuple[int, int], padding: Padding):
  """The native weight gradient of a stride-s conv, as that of a stride-1 conv on s x s blocks.

  Output (i, j) sums x[i*s + a, j*s + b] w[a, b] over the taps; with a = a2*s + a1 that is
  block (i + a2, j + b2), channel (a1, b1, c) of the padded input cut into blocks, times tap
  (a2, b2) of the kernel regrouped the same way (taps beyond kh, kw are zero, and dropped)."""
  s, (kh, kw), (ho, wo) = stride, kernel_hw, g.shape[1:3]
  n, h, wd, ci = x.shape
  (pt, _), (pl, _) = padding
  kh2, kw2 = -(-kh // s), -(-kw // s)  # taps per block
  hp, wp = (ho + kh2 - 1) * s, (wo + kw2 - 1) * s  # rows and columns the blocks cover
  x = jnp.pad(x, ((0, 0), (pt, max(hp - h - pt, 0)), (pl, max(wp - wd - pl, 0)), (0, 0)))
  x = x[:, :hp, :wp].reshape(n, hp // s, s, wp // s, s, ci)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, hp // s, wp // s, s * s * ci)
  dw = conv_weight_grad(x, g, (kh2, kw2), ((0, 0), (0, 0)))
  dw = dw.reshape(kh2, kw2, s, s, ci, -1).transpose(0, 2, 1, 3, 4, 5)
  return dw.reshape(kh2 * s, kw2 * s, ci, -1)[:kh, :kw]


@functools.cache
def _strided_native(stride: int):
  return _with_native_weight_grad(functools.partial(_conv_lax_strided, stride),
                                  functools.partial(blocked_weight_grad, stride))


def _use_native(x, w) -> bool:
  return x.dtype == w.dtype == jnp.float32 and native()


# The native dense weight gradient reads (Ho + kh) x (Wo + kw - 1) rows per image for Ho x Wo
# outputs, so small maps waste much of it: below this many output positions XLA's gradient is
# kept (where each was faster: docs/performance.md).
MIN_NATIVE_POSITIONS = 28 * 28


def _positions(x, w, padding: Padding, stride: int = 1) -> int:
  """Output positions (rows x columns) of an NHWC/HWIO conv."""
  (pt, pb), (pl, pr) = padding
  return (((x.shape[1] + pt + pb - w.shape[0]) // stride + 1)
          * ((x.shape[2] + pl + pr - w.shape[1]) // stride + 1))


def conv(x, w, padding: Padding):
  """A stride-1 NHWC/HWIO conv (padding: ((top, bottom), (left, right)), non-negative)."""
  native_grad = _use_native(x, w) and _positions(x, w, padding) >= MIN_NATIVE_POSITIONS
  return (_conv_native if native_grad else _conv_lax)(x, w, padding)


# Strided convs whose input blocks have at most this many channels take the blocked native
# weight gradient: the stems on the image (3 channels at stride 2: 12), where XLA's is slow.
# Wider strided convs (the ResNets' 3x3/2 on 56x56 maps and smaller) keep XLA's: their blocks'
# zero taps would cost more than they save (docs/performance.md).
MAX_BLOCK_CHANNELS = 16


def strided_conv(x, w, stride: int, padding: Padding):
  """A stride-s NHWC/HWIO conv (s > 1, padding as for `conv`): XLA's forward pass and input
  gradient; for stems (see MAX_BLOCK_CHANNELS), the native weight gradient on s x s blocks."""
  if (_use_native(x, w) and _positions(x, w, padding, stride) >= MIN_NATIVE_POSITIONS
      and x.shape[-1] * stride * stride <= MAX_BLOCK_CHANNELS):
    return _strided_native(stride)(x, w, padding)
  return _conv_lax_strided(stride, x, w, padding)


def pointwise(x, w):
  """A 1x1 NHWC/HWIO conv at stride 1 without padding (stride the input first)."""
  return (_pointwise_native if _use_native(x, w) else _pointwise_xla)(x, w, ((0, 0), (0, 0)))


def depthwise(x, w, padding: Padding):
  """A stride-1 NHWC depthwise conv, w: (kh, kw, 1, C) (padding as for `conv`)."""
  return (_depthwise_native if _use_native(x, w) else _depthwise_xla)(x, w, padding)


def _max_pool_xla(x, window: tuple[int, int], strides: tuple[int, int], padding: Padding):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *padding, (0, 0)))


def max_pool_grad(x, g, window: tuple[int, int], strides: tuple[int, int], padding: Padding):
  """The native input gradient of `_max_pool_xla`: float32 (N, H, W, C), ties as XLA's."""
  _require()
  (kh, kw), (sh, sw) = window, strides
  call = jax.ffi.ffi_call("xrayjax_max_pool_grad", jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="sequential")
  return call(x, g, kh=kh, kw=kw, sh=sh, sw=sw, pt=padding[0][0], pl=padding[1][0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_native(x, window, strides, padding):
  return _max_pool_xla(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
  return _max_pool_xla(x, window, strides, padding), x


def _max_pool_bwd(window, strides, padding, x, g):
  xla = lambda x, g: jax.vjp(lambda x: _max_pool_xla(x, window, strides, padding), x)[1](g)[0]
  native = lambda x, g: max_pool_grad(x, g, window, strides, padding)
  return (lax.platform_dependent(x, g, cpu=native, default=xla),)


_max_pool_native.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding: Padding):
  """NHWC max pooling (padding: ((top, bottom), (left, right)), never chosen), whose input
  gradient on the CPU backend is the native kernel for float32: XLA's CPU backend
  differentiates reduce-window through four index arrays and a scatter."""
  padding = tuple(map(tuple, padding))
  if x.dtype == jnp.float32 and native():
    return _max_pool_native(x, tuple(window), tuple(strides), padding)
  return _max_pool_xla(x, tuple(window), tuple(strides), padding)

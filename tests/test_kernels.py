"""The CPU fast paths against the reference ops, values and gradients: the native weight-gradient
kernels (xrayjax/kernels, 3x3, depthwise and 1x1) and max pooling's native input gradient
against lax, max pooling (native or as slices) against nn.max_pool."""

import os

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from xrayjax import kernels
from xrayjax.models import common

NHWC = kernels.NHWC


def test_the_kernels_build_here():
  # Every machine the README's install supports has a compiler; CI must not silently fall back.
  assert kernels.native(), kernels.status()
  assert kernels.status().startswith("native")


def _lax_weight_grad(x, g, w_shape, padding, groups=1):
  f = lambda w: lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC,
                                         feature_group_count=groups)
  return jax.vjp(f, jnp.zeros(w_shape, jnp.float32))[1](g)[0]


def _operands(rng, n, h, w, cin, cout, kernel, padding):
  (pt, pb), (pl, pr) = padding
  out_h, out_w = h + pt + pb - kernel[0] + 1, w + pl + pr - kernel[1] + 1
  x = jnp.asarray(rng.standard_normal((n, h, w, cin), np.float32))
  g = jnp.asarray(rng.standard_normal((n, out_h, out_w, cout), np.float32))
  return x, g


# (batch, height, width, cin, cout, kernel, padding): SAME and VALID 3x3, asymmetric and
# rectangular windows, one input channel (VGG's first layer on grey films), more rows than
# one tile, and output channels in blocks of 128 with a partial last one (tap by tap).
DENSE = [
    (2, 9, 7, 5, 6, (3, 3), ((1, 1), (1, 1))),
    (3, 8, 8, 4, 3, (3, 3), ((0, 0), (0, 0))),
    (1, 6, 11, 3, 8, (2, 4), ((0, 1), (2, 1))),
    (2, 10, 10, 1, 4, (5, 5), ((2, 2), (2, 2))),
    (2, 12, 12, 3, 8, (7, 7), ((3, 3), (3, 3))),
    (2, 16, 16, 96, 160, (3, 3), ((1, 1), (1, 1))),  # 630 rows: two tiles of 384
    (1, 4, 6, 64, 300, (3, 3), ((1, 1), (1, 1))),
    (2, 5, 7, 8, 3, (1, 1), ((0, 0), (0, 0))),  # 1x1: unpadded operands, every row
    (2, 24, 24, 96, 160, (1, 1), ((0, 0), (0, 0))),  # 1x1 over several tiles
    (2, 5, 7, 8, 3, (1, 1), ((1, 0), (0, 1))),  # 1x1 with padding: the shifted layout
]


@pytest.mark.parametrize("private_bytes", [64 << 20, 0], ids=["tiles", "taps"])
@pytest.mark.parametrize("n,h,w,cin,cout,kernel,padding", DENSE)
def test_conv_weight_grad_matches_lax(n, h, w, cin, cout, kernel, padding, private_bytes):
  x, g = _operands(np.random.default_rng(0), n, h, w, cin, cout, kernel, padding)
  got = jax.jit(kernels.conv_weight_grad, static_argnums=(2, 3, 4))(x, g, kernel, padding,
                                                                     private_bytes)
  want = _lax_weight_grad(x, g, (*kernel, cin, cout), padding)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("n,h,w,c,kernel,padding", [
    (2, 7, 9, 5, (3, 3), ((1, 1), (1, 1))),
    (3, 6, 6, 17, (3, 3), ((0, 0), (0, 0))),
    (1, 8, 5, 4, (2, 3), ((1, 0), (0, 2))),
    (70, 3, 3, 2, (3, 3), ((1, 1), (1, 1))),  # more rows than work items: several rows each
])
def test_depthwise_weight_grad_matches_lax(n, h, w, c, kernel, padding):
  x, g = _operands(np.random.default_rng(1), n, h, w, c, c, kernel, padding)
  got = jax.jit(kernels.depthwise_weight_grad, static_argnums=(2, 3))(x, g, kernel, padding)
  want = _lax_weight_grad(x, g, (*kernel, 1, c), padding, groups=c)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("kind,strides", [
    ("dense", (1, 1)), ("depthwise", (1, 1)), ("pointwise", (1, 1)), ("pointwise", (2, 2))])
def test_model_convs_match_lax_in_value_and_both_gradients(kind, strides):
  # Through models/common.py (what the models call), under jit and grad, with a loss that
  # weights every output differently.
  rng = np.random.default_rng(2)
  c = 6
  x = jnp.asarray(rng.standard_normal((2, 32, 28, c), np.float32))  # native from 28x28 maps
  kernel = (1, 1) if kind == "pointwise" else (3, 3)
  w = jnp.asarray(rng.standard_normal((*kernel, 1 if kind == "depthwise" else c, c), np.float32))
  weights = jnp.asarray(rng.standard_normal((2, 32 // strides[0], 28 // strides[1], c),
                                            np.float32))
  groups = c if kind == "depthwise" else 1
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

  def loss(conv, x, w):
    y = conv(x, w, strides, "SAME", dimension_numbers=dn, feature_group_count=groups)
    return jnp.sum(jnp.tanh(y) * weights)

  ours = jax.jit(jax.value_and_grad(lambda x, w: loss(common.conv_general_dilated, x, w), (0, 1)))
  ref = jax.jit(jax.value_and_grad(lambda x, w: loss(lax.conv_general_dilated, x, w), (0, 1)))
  (v, (dx, dw)), (rv, (rdx, rdw)) = ours(x, w), ref(x, w)
  np.testing.assert_allclose(v, rv, rtol=1e-5)
  np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-4)
  # The native kernel is in the CPU program (not XLA's gradient).
  hlo = jax.jit(jax.grad(lambda w: loss(common.conv_general_dilated, x, w))).lower(w).as_text()
  assert "xrayjax_" in hlo


@pytest.mark.parametrize("dtype,size,native", [
    (jnp.float32, 28, True), (jnp.bfloat16, 28, False), (jnp.float32, 27, False)])
def test_other_dtypes_and_small_maps_keep_xlas_gradient(dtype, size, native):
  x = jnp.ones((1, size, size, 3), dtype)
  w = jnp.ones((3, 3, 3, 4), dtype)
  f = lambda w: jnp.sum(kernels.conv(x, w, ((1, 1), (1, 1))).astype(jnp.float32))
  assert ("xrayjax_" in jax.jit(jax.grad(f)).lower(w).as_text()) == native
  # 1x1 convs take the native gradient at every size, in float32 only.
  f = lambda w: jnp.sum(kernels.pointwise(x, w[:1, :1]).astype(jnp.float32))
  assert ("xrayjax_" in jax.jit(jax.grad(f)).lower(w).as_text()) == (dtype == jnp.float32)


def test_without_a_compiler_the_models_fall_back_and_say_so(monkeypatch, tmp_path):
  monkeypatch.setenv("XRAYJAX_CACHE", str(tmp_path))  # nothing built there yet
  monkeypatch.setenv("CXX", "no-such-compiler")
  kernels._load.cache_clear()
  try:
    assert not kernels.native()
    assert "no C++ compiler ('no-such-compiler'" in kernels.status()
    x = jnp.ones((1, 5, 5, 2))
    w = jnp.ones((3, 3, 2, 2))
    g = jax.grad(lambda w: jnp.sum(kernels.conv(x, w, ((1, 1), (1, 1)))))(w)
    np.testing.assert_allclose(g, _lax_weight_grad(x, jnp.ones((1, 5, 5, 2)), w.shape,
                                                   ((1, 1), (1, 1))))
    monkeypatch.setenv("XRAYJAX_NATIVE", "0")
    kernels._load.cache_clear()
    assert kernels.status() == "pure-JAX convolution gradients (XRAYJAX_NATIVE=0)"
  finally:
    kernels._load.cache_clear()
    monkeypatch.undo()
    assert kernels.native()  # registers again from the cache: later tests see the kernels


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
    ((2, 9, 7, 3), (2, 2), (2, 2), "VALID"),  # odd sizes: the last row and column are dropped
    ((2, 11, 11, 4), (3, 3), (2, 2), "VALID"),
    ((2, 9, 9, 3), (2, 2), (2, 2), "SAME"),  # non-overlapping, padded with -inf
    ((2, 10, 9, 4), (3, 3), (2, 2), "SAME"),
    ((1, 7, 7, 2), (3, 3), (1, 1), ((1, 1), (1, 1))),
])
def test_max_pool_matches_flax(shape, window, strides, padding):
  x = jnp.asarray(np.random.default_rng(3).standard_normal(shape, np.float32))
  ours = lambda x: common.max_pool(x, window, strides, padding)
  ref = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  np.testing.assert_array_equal(ours(x), ref(x))
  loss = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) ** 2))(x)
  np.testing.assert_allclose(loss(ours), loss(ref), rtol=1e-6)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 9, 11, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 10, 7, 4), (3, 2), (1, 2), ((2, 0), (0, 1))),  # asymmetric, a window in the padding
    ((2, 8, 8, 3), (2, 2), (2, 2), ((0, 0), (0, 0))),
])
def test_native_max_pool_gradient_picks_the_maxima_xla_picks(shape, window, strides, padding):
  # Integer values, so most windows hold tied maxima: the gradient must go where XLA's
  # select-and-scatter puts it (the first maximum), and integer sums are exact in any order.
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.integers(0, 3, shape).astype(np.float32))
  ref = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                                    ((0, 0), *padding, (0, 0)))
  ours = lambda x: kernels.max_pool(x, window, strides, padding)
  np.testing.assert_array_equal(ours(x), ref(x))
  g = jnp.asarray(rng.integers(-3, 4, ref(x).shape).astype(np.float32))
  grad = lambda pool: jax.vjp(pool, x)[1](g)[0]
  np.testing.assert_array_equal(grad(ours), grad(ref))
  hlo = lambda dtype: jax.jit(jax.grad(lambda x: jnp.sum(ours(x).astype(jnp.float32)))).lower(
      x.astype(dtype)).as_text()
  assert "xrayjax_max_pool_grad" in hlo(jnp.float32)
  assert "xrayjax_" not in hlo(jnp.bfloat16)  # other dtypes keep XLA's gradient


def test_weight_grads_are_bit_reproducible():
  # Training must repeat exactly (a resumed run matches an uninterrupted one): the threads'
  # shares of the sums are fixed, whichever thread runs them. Many tiles, several calls.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((4, 40, 40, 96), np.float32))
  g = jnp.asarray(rng.standard_normal((4, 40, 40, 160), np.float32))
  pad = ((1, 1), (1, 1))
  dense = jax.jit(lambda x, g: kernels.conv_weight_grad(x, g, (3, 3), pad))
  depth = jax.jit(lambda x, g: kernels.depthwise_weight_grad(x, g[..., :96], (3, 3), pad))
  for f in (dense, depth):
    first = np.asarray(f(x, g))
    for _ in range(5):
      np.testing.assert_array_equal(np.asarray(f(x, g)), first)

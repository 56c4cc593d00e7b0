"""The CPU fast paths against the reference ops, values and gradients: oneDNN's convolutions
(every form the models use), the native 1x1 weight gradient and oneDNN's max pooling against
lax, max pooling (oneDNN's or as slices) against nn.max_pool; the native Threefry against
jax.random's known answers and jax's own lowering, bit for bit."""

import os
import re
import subprocess
import sys

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
  # Every machine the README's install supports has a compiler and oneDNN's wheel; CI must not
  # silently fall back.
  assert kernels.native(), kernels.status()
  assert kernels.status().startswith("native CPU kernels: oneDNN")


def _lax_conv(x, w, stride, padding, groups=1):
  return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC,
                                  feature_group_count=groups)


# (input shape, kernel, Ci / groups, Co, stride, padding, groups): every form the models send,
# and a few they might: SAME and VALID, strided with uneven and absent trailing padding, the
# ResNets' 7x7/2 stem and its Keras form (pad 3, then VALID: the last window stops short),
# rectangular kernels with asymmetric padding, one input channel, depthwise, grouped.
CONVS = {
    "3x3": ((2, 9, 7, 5), (3, 3), 5, 6, 1, ((1, 1), (1, 1)), 1),
    "3x3_valid": ((3, 8, 8, 4), (3, 3), 4, 3, 1, ((0, 0), (0, 0)), 1),
    "2x4_asymmetric": ((1, 6, 11, 3), (2, 4), 3, 8, 1, ((0, 1), (2, 1)), 1),
    "5x5_one_channel": ((2, 10, 10, 1), (5, 5), 1, 4, 1, ((2, 2), (2, 2)), 1),
    "3x3_wide": ((2, 16, 16, 96), (3, 3), 96, 160, 1, ((1, 1), (1, 1)), 1),
    "3x3/2_same": ((2, 9, 9, 6), (3, 3), 6, 8, 2, ((1, 1), (1, 1)), 1),
    "3x3/2_valid_odd": ((2, 13, 12, 4), (3, 3), 4, 5, 2, ((0, 0), (0, 0)), 1),
    "3x3/2_resnet": ((2, 10, 10, 4), (3, 3), 4, 4, 2, ((0, 1), (0, 1)), 1),
    "7x7/2_stem": ((2, 23, 23, 3), (7, 7), 3, 8, 2, ((3, 3), (3, 3)), 1),
    "7x7/2_keras_stem": ((2, 22, 22, 3), (7, 7), 3, 8, 2, ((3, 3), (3, 3)), 1),
    "5x5/3_short": ((1, 20, 20, 1), (5, 5), 1, 8, 3, ((1, 0), (0, 2)), 1),
    "depthwise": ((2, 7, 9, 5), (3, 3), 1, 5, 1, ((1, 1), (1, 1)), 5),
    "depthwise_valid": ((3, 6, 6, 17), (3, 3), 1, 17, 1, ((0, 0), (0, 0)), 17),
    "depthwise/2": ((2, 9, 9, 8), (3, 3), 1, 8, 2, ((1, 1), (1, 1)), 8),
    "grouped": ((2, 8, 8, 8), (3, 3), 2, 12, 1, ((1, 1), (1, 1)), 4),
    # Winograd's forward pass and input gradient (stride-1 3x3 SAME, 128 channels or more each
    # way): odd sizes end in half tiles, a batch of 3 splits into slices of 1 and 2 images.
    "3x3_winograd": ((3, 9, 11, 128), (3, 3), 128, 136, 1, ((1, 1), (1, 1)), 1),
    "3x3_winograd_smallest_map": ((2, 4, 5, 144), (3, 3), 144, 128, 1, ((1, 1), (1, 1)), 1),
}


@pytest.mark.parametrize("form", CONVS)
def test_onednn_convs_match_lax_in_value_and_both_gradients(form):
  shape, kernel, cin, cout, stride, padding, groups = CONVS[form]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  w = jnp.asarray(rng.standard_normal((*kernel, cin, cout), np.float32))
  y = _lax_conv(x, w, stride, padding, groups)
  weights = jnp.asarray(rng.standard_normal(y.shape, np.float32))  # every output counts apart

  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) * weights), (0, 1)))

  ours = lambda x, w: kernels.conv(x, w, stride, padding, groups)
  (v, (dx, dw)) = loss(ours)(x, w)
  (rv, (rdx, rdw)) = loss(lambda x, w: _lax_conv(x, w, stride, padding, groups))(x, w)
  np.testing.assert_allclose(ours(x, w), y, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
  # (a sum's round-off scales with its terms' magnitudes, not with the sum)
  np.testing.assert_allclose(v, rv, rtol=1e-5, atol=1e-6 * float(jnp.sum(jnp.abs(y * weights))))
  np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-5 * float(jnp.abs(rdx).max()))
  np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-5 * float(jnp.abs(rdw).max()))
  hlo = loss(ours).lower(x, w).as_text()
  for target in ("fwd", "bwd_data", "bwd_weights"):  # all three passes are oneDNN's
    assert f"xrayjax_dnnl_conv_{target}" in hlo


CHUNKS = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from xrayjax import kernels
rng = np.random.default_rng(5)
x = jnp.asarray(rng.standard_normal((5, 128, 128, 2), np.float32))
w = jnp.asarray(rng.standard_normal((3, 3, 2, 96), np.float32))
g = jnp.asarray(rng.standard_normal((5, 128, 128, 96), np.float32))
pad = ((1, 1), (1, 1))
lax_conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pad,
                                                 dimension_numbers=kernels.NHWC)
dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: kernels.conv(x, w, 1, pad), w)[1](g)[0])
ref = jax.jit(lambda x, w, g: jax.vjp(lambda w: lax_conv(x, w), w)[1](g)[0])
expected = ref(x, w, g)
np.testing.assert_allclose(dw(x, w, g), expected, rtol=1e-4,
                           atol=1e-5 * float(jnp.abs(expected).max()))
print("matched")
"""


def test_a_weight_gradient_in_chunks_matches_lax():
  # The blocked layouts' path runs only under AVX2's direct kernel, so oneDNN is held to AVX2
  # here, in a process of its own. Maps of 6.8 MB an image reordered: a slice of three images
  # runs as chunks of two and one (at most 16 MiB of reordered maps), whose gradients are added.
  env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ONEDNN_VERBOSE="1")
  out = subprocess.run([sys.executable, "-c", CHUNKS], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  chunks = re.findall(r"convolution,jit:avx2,backward_weights,src_f32:\S*:blocked:aBcd8b:.*"
                      r",mb(\d+)_ic2oc96", out.stdout)
  assert set(chunks) == {"1", "2"}, out.stdout[-3000:]
  assert out.stdout.rstrip().endswith("matched")


WINOGRAD = """
import jax, jax.numpy as jnp, numpy as np
from xrayjax import kernels
rng = np.random.default_rng(6)
pad = ((1, 1), (1, 1))
for cin, cout in ((128, 256), (64, 256)):  # Winograd's, then too few input channels
  x = jnp.asarray(rng.standard_normal((2, 8, 8, cin), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32))
  y, vjp = jax.vjp(lambda x: kernels.conv(x, w, 1, pad), x)
  print(cin, cout, np.asarray(vjp(y)[0]).view(np.uint32).sum(dtype=np.uint64))
print(kernels.status())
"""


def test_winograd_runs_where_it_pays_and_can_be_turned_off():
  def run(winograd):
    env = dict(os.environ, ONEDNN_VERBOSE="1", XRAYJAX_WINOGRAD=winograd)
    out = subprocess.run([sys.executable, "-c", WINOGRAD], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
  on, off = run("1"), run("0")
  # 128 -> 256 channels: the forward pass's 16 products over a slice's tiles (16 an image: 4x4
  # blocks of 2x2 outputs), then the input gradient's (256 -> 128); the weight gradient stays
  # oneDNN's convolution.
  assert re.search(r"matmul,.*,16x\d+x128:16x128x256,", on), on[-3000:]
  assert re.search(r"matmul,.*,16x\d+x256:16x256x128,", on), on[-3000:]
  assert not re.search(r"convolution,[^,]*,(forward|backward_data).*ic128oc256_ih8", on)
  assert "ic64oc256" in on and "matmul" not in off
  assert "(Winograd F(2x2, 3x3) for wide 3x3 layers)" in on
  assert "(Winograd F(2x2, 3x3) off: XRAYJAX_WINOGRAD=0)" in off
  # Different sums of the same products: the results differ by round-off.
  sums = [dict(l.split(" ", 2)[::2] for l in o.splitlines() if l[:1].isdigit())
          for o in (on, off)]
  assert sums[0]["64"] == sums[1]["64"] and sums[0]["128"] != sums[1]["128"]


def test_an_empty_batch_gives_empty_maps_and_zero_gradients():
  x = jnp.zeros((0, 8, 8, 4), jnp.float32)
  w = jnp.ones((3, 3, 4, 5), jnp.float32)
  pad = ((1, 1), (1, 1))
  y, vjp = jax.vjp(lambda x, w: kernels.conv(x, w, 1, pad), x, w)
  dx, dw = vjp(jnp.zeros(y.shape, jnp.float32))
  assert y.shape == (0, 8, 8, 5) and dx.shape == x.shape
  np.testing.assert_array_equal(dw, np.zeros(w.shape, np.float32))


@pytest.mark.parametrize("form", CONVS)
def test_fused_bias_and_relu_match_lax_in_value_and_all_three_gradients(form):
  shape, kernel, cin, cout, stride, padding, groups = CONVS[form]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  w = jnp.asarray(rng.standard_normal((*kernel, cin, cout), np.float32))
  b = jnp.asarray(rng.standard_normal((cout,), np.float32))
  ref = lambda x, w, b: jax.nn.relu(_lax_conv(x, w, stride, padding, groups) + b)
  ours = lambda x, w, b: kernels.conv_bias_relu(x, w, b, stride, padding, groups)
  y = ref(x, w, b)
  assert 0.2 < float(jnp.mean(y > 0)) < 0.8  # both sides of the ReLU are exercised
  weights = jnp.asarray(rng.standard_normal(y.shape, np.float32))

  def loss(f):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * weights), (0, 1, 2)))

  (v, grads), (rv, rgrads) = loss(ours)(x, w, b), loss(ref)(x, w, b)
  np.testing.assert_allclose(ours(x, w, b), y, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
  np.testing.assert_allclose(v, rv, rtol=1e-5, atol=1e-6 * float(jnp.sum(jnp.abs(y * weights))))
  for g, rg in zip(grads, rgrads):
    np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-5 * float(jnp.abs(rg).max()))
  hlo = loss(ours).lower(x, w, b).as_text()
  for target in ("conv_bias_relu_fwd", "conv_bwd_data", "conv_bwd_weights"):
    assert f"xrayjax_dnnl_{target}" in hlo


@pytest.mark.parametrize("cin, cout", [(3, 8), (128, 128)])  # direct, Winograd
def test_the_fused_layer_trains_bit_for_bit_as_conv_then_relu(cin, cout):
  """ConvReLU has nn.Conv's parameters and gives the same loss and gradients to the last bit as
  `common.conv` then a ReLU, so fusing VGG16's layers moves no result, not even by round-off."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 12, 12, cin), np.float32))
  fused, unfused = common.ConvReLU(cout, (3, 3)), common.conv(cout, (3, 3), padding="SAME")
  params = unfused.init(jax.random.key(0), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, fused.init(jax.random.key(0), x), params))
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape, np.float32)),
                        params)  # a bias that is not zero
  weights = jnp.asarray(rng.standard_normal((4, 12, 12, cout), np.float32))
  grad = lambda f: jax.jit(jax.value_and_grad(lambda p: jnp.sum(f(p) * weights)))(params)
  (v, g) = grad(lambda p: fused.apply(p, x))
  (rv, rg) = grad(lambda p: jax.nn.relu(unfused.apply(p, x)))
  assert 0.2 < float(jnp.mean(fused.apply(params, x) > 0)) < 0.8
  assert v == rv
  assert jax.tree.all(jax.tree.map(jnp.array_equal, g, rg)), jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), g, rg)


def test_other_dtypes_keep_xlas_convolutions():
  x = jnp.ones((1, 8, 8, 3), jnp.bfloat16)
  w = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
  f = lambda w: jnp.sum(kernels.conv(x, w, 1, ((1, 1), (1, 1))).astype(jnp.float32))
  assert "xrayjax_" not in jax.jit(jax.grad(f)).lower(w).as_text()
  f = lambda w: jnp.sum(kernels.pointwise(x, w[:1, :1]).astype(jnp.float32))
  assert "xrayjax_" not in jax.jit(jax.grad(f)).lower(w).as_text()
  b = jnp.ones((4,), jnp.bfloat16)
  f = lambda w: jnp.sum(kernels.conv_bias_relu(x, w, b, 1, ((1, 1), (1, 1))).astype(jnp.float32))
  assert "xrayjax_" not in jax.jit(jax.grad(f)).lower(w).as_text()


def test_a_program_lowered_for_an_accelerator_keeps_xlas_convolutions_and_pooling():
  x = jnp.ones((1, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  b = jnp.ones((4,))
  pad = ((1, 1), (1, 1))
  for op, name in ((lambda w: kernels.conv(x, w, 2, pad), "xrayjax_dnnl_conv"),
                   (lambda w: kernels.conv_bias_relu(x, w, b, 2, pad), "xrayjax_dnnl_conv"),
                   (lambda w: kernels.max_pool(x * w[0, 0, 0, 0], (3, 3), (2, 2), pad),
                    "xrayjax_dnnl_max_pool")):
    f = jax.jit(jax.grad(lambda w: jnp.sum(op(w))))
    assert name in f.trace(w).lower(lowering_platforms=("cpu",)).as_text()
    assert "xrayjax_" not in f.trace(w).lower(lowering_platforms=("cuda",)).as_text()


# (batch, height, width, cin, cout): rows within one tile, over several tiles, and output
# channels in blocks of 128 with a partial last one (the block schedule).
POINTWISE = [(2, 5, 7, 8, 3), (2, 24, 24, 96, 160), (1, 4, 6, 64, 300)]


@pytest.mark.parametrize("private_bytes", [64 << 20, 0], ids=["tiles", "blocks"])
@pytest.mark.parametrize("n,h,w,cin,cout", POINTWISE)
def test_pointwise_weight_grad_matches_lax(n, h, w, cin, cout, private_bytes):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((n, h, w, cin), np.float32))
  g = jnp.asarray(rng.standard_normal((n, h, w, cout), np.float32))
  got = jax.jit(kernels.pointwise_weight_grad, static_argnums=2)(x, g, private_bytes)
  want = jax.vjp(lambda w: _lax_conv(x, w, 1, ((0, 0), (0, 0))),
                 jnp.zeros((1, 1, cin, cout)))[1](g)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("kind,strides", [
    ("dense", (1, 1)), ("dense", (2, 2)), ("depthwise", (1, 1)), ("pointwise", (1, 1)),
    ("pointwise", (2, 2))])
def test_model_convs_match_lax_in_value_and_both_gradients(kind, strides):
  # Through models/common.py (what the models call), under jit and grad, with a loss that
  # weights every output differently.
  rng = np.random.default_rng(2)
  c = 6
  x = jnp.asarray(rng.standard_normal((2, 32, 28, c), np.float32))
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
  # The native kernels are in the CPU program (not XLA's gradient); a 1x1 conv's forward pass is
  # oneDNN's, its weight gradient ours.
  hlo = jax.jit(jax.grad(lambda w: loss(common.conv_general_dilated, x, w))).lower(w).as_text()
  assert "xrayjax_dnnl_conv_fwd" in hlo
  weight_gradient = "pointwise_weight_grad" if kind == "pointwise" else "dnnl_conv_bwd_weights"
  assert f"xrayjax_{weight_gradient}" in hlo


def test_without_a_compiler_the_models_fall_back_and_say_so(monkeypatch, tmp_path):
  monkeypatch.setenv("XRAYJAX_CACHE", str(tmp_path))  # nothing built there yet
  monkeypatch.setenv("CXX", "no-such-compiler")
  kernels._load.cache_clear()
  try:
    assert not kernels.native()
    assert "no compiler ('no-such-compiler' is not on PATH; set $CXX)" in kernels.status()
    x = jnp.ones((1, 5, 5, 2))
    w = jnp.ones((3, 3, 2, 2))
    pad = ((1, 1), (1, 1))
    f = lambda conv: jax.grad(lambda w: jnp.sum(conv(x, w, 1, pad)))(w)
    np.testing.assert_allclose(f(kernels.conv), f(_lax_conv))
    assert "xrayjax_" not in jax.jit(lambda w: kernels.conv(x, w, 1, pad)).lower(w).as_text()
    monkeypatch.setenv("XRAYJAX_NATIVE", "0")
    kernels._load.cache_clear()
    assert kernels.status() == "XLA's convolutions (XRAYJAX_NATIVE=0)"
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
    ((1, 10, 7, 4), (3, 2), (1, 2), ((2, 0), (0, 1))),  # asymmetric, a window mostly padding
    ((2, 8, 8, 3), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((3, 10, 10, 6), (3, 3), (2, 2), ((0, 0), (0, 0))),  # ResNets' stem: the last row unread
    ((5, 9, 9, 7), (3, 3), (2, 2), ((0, 1), (0, 1))),  # Xception's SAME; slices of 2 and 3
])
def test_onednn_max_pool_picks_the_maxima_xla_picks(shape, window, strides, padding):
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
  assert {"xrayjax_dnnl_max_pool_fwd", "xrayjax_dnnl_max_pool_bwd"} <= set(
      re.findall(r"xrayjax_\w+", hlo(jnp.float32)))
  assert "xrayjax_" not in hlo(jnp.bfloat16)  # other dtypes keep XLA's


def test_onednn_max_pool_refuses_operands_that_do_not_agree():
  assert kernels.native()
  g, taps = jnp.ones((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 2), jnp.uint8)
  backward = jax.ffi.ffi_call("xrayjax_dnnl_max_pool_bwd",
                              jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32))
  attrs = dict(kh=3, kw=3, sh=2, sw=2, pt=0, pl=0)
  with pytest.raises(jax.errors.JaxRuntimeError, match="one workspace byte per output"):
    backward(g, taps[..., :1], **attrs)
  with pytest.raises(jax.errors.JaxRuntimeError, match="do not agree"):
    backward(g, taps, **dict(attrs, sh=1, sw=1))  # 5x5 pooled 3x3/1 is 3x3, not 2x2


def test_max_pools_onednn_does_not_take_are_xlas():
  # A window wholly in the padding (oneDNN wants padding narrower than the window): XLA's.
  x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 4, 4, 2), np.float32))
  pool = lambda x: kernels.max_pool(x, (2, 2), (1, 1), ((2, 0), (0, 0)))
  ref = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1),
                                    ((0, 0), (2, 0), (0, 0), (0, 0)))
  np.testing.assert_array_equal(pool(x), ref(x))
  assert "xrayjax_" not in jax.jit(pool).lower(x).as_text()


def test_convolutions_are_bit_reproducible():
  # Training must repeat exactly (a resumed run matches an uninterrupted one): each slice of the
  # batch runs a single-threaded oneDNN primitive and the weight gradient's slices are added in
  # order, and the 1x1 kernel's threads' shares are fixed, whichever thread runs them. Several
  # calls, every pass.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((4, 40, 40, 96), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 96, 160), np.float32))
  g = jnp.asarray(rng.standard_normal((4, 40, 40, 160), np.float32))
  pad = ((1, 1), (1, 1))
  dense = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: kernels.conv(x, w, 1, pad), x, w)[1](g))
  depth = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: kernels.conv(x, w, 1, pad, 96), x,
                                          w[:, :, :1, :96])[1](g[..., :96]))
  point = jax.jit(lambda x, w, g: kernels.pointwise_weight_grad(x, g))
  fused = jax.jit(lambda x, w, g: jax.vjp(
      lambda x, w, b: kernels.conv_bias_relu(x, w, b, 1, pad), x, w, g[0, 0, 0])[1](g))
  pool = jax.jit(lambda x, w, g: jax.vjp(lambda x: kernels.max_pool(x, (3, 3), (2, 2), pad),
                                         x)[1](g[:, :20, :20, :96]))
  w128 = jnp.asarray(rng.standard_normal((3, 3, 128, 128), np.float32))
  winograd = jax.jit(lambda x, w, g: jax.vjp(lambda x: kernels.conv(x, w128, 1, pad),
                                             g[:, :9, :11, :128])[1](g[:, 9:18, :11, 32:]))
  for f in (dense, depth, point, fused, pool, winograd):
    first = jax.tree.map(np.asarray, f(x, w, g))
    for _ in range(3):
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, f(x, w, g)), first)


@pytest.mark.parametrize("cin, cout", [(48, 64), (128, 128)])  # direct, Winograd
def test_convolutions_in_branches_side_by_side_match_lax(cin, cout):
  # XLA runs independent branches at once on its thread pool (concat's two backbones): calls of
  # one primitive then run concurrently, and so do their slices (a batch of 5: two sizes).
  rng = np.random.default_rng(5)
  xs = [jnp.asarray(rng.standard_normal((5, 20, 20, cin), np.float32)) for _ in range(4)]
  # (scaled so that tanh does not saturate: its gradient stays well conditioned)
  w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) / np.sqrt(9 * cin))
  pad = ((1, 1), (1, 1))

  def branches(conv):
    def loss(xs, w):
      return sum(jnp.sum(jnp.tanh(conv(x, w)) * (i + 1)) for i, x in enumerate(xs))
    return jax.jit(jax.grad(loss, (0, 1)))

  (dxs, dw) = branches(lambda x, w: kernels.conv(x, w, 1, pad))(xs, w)
  (rdxs, rdw) = branches(lambda x, w: _lax_conv(x, w, 1, pad, 1))(xs, w)
  for dx, rdx in zip(dxs, rdxs):
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-5 * float(jnp.abs(rdx).max()))
  np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-5 * float(jnp.abs(rdw).max()))


# jax.random's draws, as they reach a model's initialisation: shapes odd and empty, one key
# for a whole draw or (vmapped over keys) one per element, split and fold_in, in one program.
DRAWS = """
import jax, numpy as np
from xrayjax import kernels, models, train
kernels.native()
key = jax.random.PRNGKey(42)
draws = jax.jit(lambda k: (jax.random.normal(k, (3, 1001)), jax.random.uniform(k, (7,)),
                           jax.random.split(k, 5), jax.random.bits(jax.random.fold_in(k, 7), (0,)),
                           jax.random.truncated_normal(k, -2.0, 2.0, (2, 3, 5)),
                           jax.vmap(lambda k: jax.random.normal(k, (3,)))(jax.random.split(k, 4))))
variables = train.init_variables(models.build("alexnet", 4, {"width": 1 / 16}), 32, 0)
leaves = jax.tree.leaves((draws(key), variables))
print(",".join(str(np.asarray(x).view(np.uint32).sum(dtype=np.uint64)) for x in leaves))
"""


def test_threefry_gives_jax_random_the_same_bits_from_one_native_call():
  from jax.extend.random import threefry_2x32
  hashed = jax.jit(threefry_2x32)
  # Salmon et al. 2011's known answers (Random123's kat_vectors, threefry2x32_20).
  for key, count, expected in (([0, 0], [0, 0], [0x6b200159, 0x99ba4efe]),
                               ([2**32 - 1] * 2, [2**32 - 1] * 2, [0x1cb996fc, 0xbb002be7]),
                               ([0x13198a2e, 0x03707344], [0x243f6a88, 0x85a308d3],
                                [0xc4923a9c, 0x483df7a0])):
    np.testing.assert_array_equal(hashed(np.uint32(key), np.uint32(count)), expected)
  assert "xrayjax_threefry2x32" in hashed.lower(np.uint32([0, 0]), np.uint32([0, 0])).as_text()
  # The same bits as jax's own lowering (a process without the kernels), draws and a model's
  # initial weights alike.
  sums = [subprocess.run([sys.executable, "-c", DRAWS], env=dict(os.environ, XRAYJAX_NATIVE=n),
                         capture_output=True, text=True, check=True).stdout.split()[-1]
          for n in ("1", "0")]
  assert sums[0] == sums[1] and sums[0].count(",") > 10

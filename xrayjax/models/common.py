"""Pieces the architectures share."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from xrayjax import kernels

# He (fan-in, normal) initialisation. With Keras's Glorot default a plain ReLU stack such as
# VGG16 trained from scratch stalled at chance (loss 0.693 for 5 epochs on the demo), and
# the DETL paper does not name its initialisation.
HE_INIT = nn.initializers.he_normal()


def scaled(channels: int, width: float) -> int:
  """A layer's channel count at a width multiplier (at least 1)."""
  return max(1, int(round(channels * width)))


BN_MOMENTUM = 0.99  # Keras's BatchNormalization default


def batch_norm(train: bool, epsilon: float, name: str, momentum: float = BN_MOMENTUM,
               dtype: Any = None) -> nn.BatchNorm:
  """Keras's BatchNormalization (momentum 0.99 unless given) with the model's epsilon.

  `dtype` is the output's (None: the input's); Flax computes the batch statistics and keeps
  the running ones in float32 whatever it is, and the scale and bias are float32 parameters.

  The running statistics keep `momentum` of their value per step, so after n steps
  momentum^n of the initial (0, 1) remains: 28% after 128 steps at 0.99. Short runs (the
  demos) lower it, or evaluation normalises with statistics the network never had.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=dtype, name=name)


def zero_pad(x, pad: int):
  """Keras's ZeroPadding2D on NHWC."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """lax.conv_general_dilated, with the convs the models use computed another way (same
  result), since XLA's CPU backend is slow at them (xrayjax.bench, docs/performance.md):
    - a plain 1x1 conv is one matrix product, on the CPU with oneDNN's forward pass and a
      native weight gradient (`kernels.pointwise`);
    - any other plain conv with equal strides (dense, strided, grouped, depthwise) runs its
      three passes through oneDNN on the CPU (`kernels.conv`; a depthwise conv at stride 1 is
      a fused sum of shifted copies of the input where oneDNN is missing).
  """
  nhwc = dimension_numbers is not None and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
  plain = nhwc and not kwargs and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
  kh, kw = rhs.shape[:2]
  if plain and (kh, kw) == (1, 1) and feature_group_count == 1 and _no_padding(padding):
    x = lhs[:, ::window_strides[0], ::window_strides[1]]
    if precision is None:
      return kernels.pointwise(x, rhs)
    return kernels.pointwise_product(x, rhs, precision)
  stride = tuple(window_strides)
  if plain and stride[0] == stride[1] and precision is None:
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), stride, padding)
    pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    if min(min(pair) for pair in pads) >= 0:
      return kernels.conv(lhs, rhs, stride[0], pads, feature_group_count)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision,
                                  **kwargs)


def _no_padding(padding) -> bool:
  return isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding)


conv = functools.partial(nn.Conv, kernel_init=HE_INIT, conv_general_dilated=conv_general_dilated)


class ConvReLU(nn.Module):
  """`conv` (the same parameters: a He-initialised kernel and a zero bias) then a ReLU, as one
  op, `kernels.conv_bias_relu`: on the CPU oneDNN adds the bias and applies the ReLU as it
  writes the convolution's output, as TensorFlow's fused convolutions do for Keras."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: str = "SAME"
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", HE_INIT, (*self.kernel_size, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = lax.padtype_to_pads(x.shape[1:3], self.kernel_size, (self.strides,) * 2,
                               self.padding)
    return kernels.conv_bias_relu(x, kernel, bias, self.strides, pads)


class SeparableConv(nn.Module):
  """Keras's SeparableConv2D: a depthwise conv then a 1x1 pointwise conv (no bias)."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, x):
    x = conv(x.shape[-1], self.kernel_size, padding="SAME", feature_group_count=x.shape[-1],
             use_bias=False, dtype=self.dtype, name="depthwise")(x)
    return conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="pointwise")(x)


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding="VALID"):
  """Max pooling (NHWC, padding a string or pairs); padded positions are never chosen.

  XLA's CPU backend differentiates reduce-window through four index arrays and a scatter
  (a reduce-window with five outputs). Overlapping windows (ResNets' stem, Xception) take
  `kernels.max_pool`, oneDNN's on the CPU. Non-overlapping ones (VGG16) are the maximum of
  strided slices, which XLA fuses with their neighbours (docs/performance.md). Same values
  and, but for ties between slices, gradients.
  """
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  if tuple(window) != tuple(strides):
    return kernels.max_pool(x, window, strides, padding)
  (kh, kw), (sh, sw) = window, strides
  if any(p for pair in padding for p in pair):
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return functools.reduce(jnp.maximum, (
      x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
      for i in range(kh) for j in range(kw)))


def global_avg_pool(x):
  return jnp.mean(x, axis=(1, 2))


TAP = "tap_"  # prefix of the perturbation that makes an `out` map reachable by jax.grad


def record(module: nn.Module, out: dict, name: str, x):
  """Stores the map `x` as `out[name]` and returns it, tapped for gradients.

  The tap is Flax's `perturb` (`perturbations/tap_<name>`): a no-op unless the caller passes
  a `perturbations` collection, in which case the gradient with respect to it is the
  gradient with respect to this map. Grad-CAM (evaluate/gradcam.py) uses it on any entry.
  """
  x = module.perturb(TAP + name, x)
  out[name] = x
  return x


def pooled_top(x, num_classes: int | None, out: dict, name: str = "predictions",
               dtype: Any = None):
  """Keras's `include_top`: global average pooling and the dense classifier `name`
  (computing in `dtype`).

  Call from a compact `__call__` (the Dense layer belongs to the caller). With
  `num_classes=None` (no top) it returns `(None, out)`.
  """
  if num_classes is None:
    return None, out
  x = out["pre_logits"] = global_avg_pool(x)
  logits = out["logits"] = nn.Dense(num_classes, dtype=dtype, name=name)(x)
  return logits, out

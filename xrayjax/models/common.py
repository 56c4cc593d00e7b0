"""Pieces the architectures share."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

# He (fan-in, normal) initialisation. With Keras's Glorot default a plain ReLU stack such as
# VGG16 trained from scratch stalled at chance (loss 0.693 for 5 epochs on the demo), and
# the DETL paper does not name its initialisation.
HE_INIT = nn.initializers.he_normal()


def scaled(channels: int, width: float) -> int:
  """A layer's channel count at a width multiplier (at least 1)."""
  return max(1, int(round(channels * width)))


def batch_norm(train: bool, epsilon: float, name: str) -> nn.BatchNorm:
  """Keras's BatchNormalization (momentum 0.99) with the model's epsilon."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=epsilon, name=name)


def zero_pad(x, pad: int):
  """Keras's ZeroPadding2D on NHWC."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


class SeparableConv(nn.Module):
  """Keras's SeparableConv2D: a depthwise conv then a 1x1 pointwise conv (no bias)."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(x.shape[-1], self.kernel_size, padding="SAME", feature_group_count=x.shape[-1],
                use_bias=False, kernel_init=HE_INIT, name="depthwise")(x)
    return nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=HE_INIT,
                   name="pointwise")(x)


conv = functools.partial(nn.Conv, kernel_init=HE_INIT)


def global_avg_pool(x):
  return jnp.mean(x, axis=(1, 2))

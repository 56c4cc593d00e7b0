"""Pieces the architectures share."""

from __future__ import annotations

import flax.linen as nn

# He (fan-in, normal) initialisation. With Keras's Glorot default a plain ReLU stack such as
# VGG16 trained from scratch stalled at chance (loss 0.693 for 5 epochs on the demo), and
# the DETL paper does not name its initialisation.
HE_INIT = nn.initializers.he_normal()


def scaled(channels: int, width: float) -> int:
  """A layer's channel count at a width multiplier (at least 1)."""
  return max(1, int(round(channels * width)))

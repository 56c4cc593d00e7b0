"""Xception, layer for layer as `keras.applications.Xception`.

Module names are Keras's layer names (Keras weight files load by name). Keras
leaves the four residual 1x1 convs and their BatchNorms unnamed (`conv2d`,
`conv2d_1`, ... in creation order); here they are `block{2,3,4,13}_residual_*`
and KERAS_UNNAMED lists them in Keras's creation order so the importer can match
them. `width` scales every channel count. Conv weights use He initialisation
(see models/common.py); BatchNorm follows Keras (momentum 0.99, epsilon 1e-3).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from xrayjax.models.common import (BN_MOMENTUM, SeparableConv, batch_norm, conv, max_pool,
                                   pooled_top, record, scaled)

EPSILON = 1e-3
RESIDUAL_BLOCKS = (2, 3, 4, 13)

PARAM_GROUPS = {
    "before_last_conv_block": r"^block([1-9]|1[0-3])_",
    "last_conv_block": r"^block14_",
    "head": r"^predictions/",
}
HEAD_LAYER = "predictions"
KERAS_UNNAMED = {
    "conv2d": tuple(f"block{b}_residual_conv" for b in RESIDUAL_BLOCKS),
    "batch_normalization": tuple(f"block{b}_residual_bn" for b in RESIDUAL_BLOCKS),
}


class Xception(nn.Module):
  num_classes: int | None  # None: no top (the final conv map only)
  width: float = 1.0
  bn_momentum: float = BN_MOMENTUM  # Keras's; see common.batch_norm
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    c = lambda n: scaled(n, self.width)
    bn = lambda name: batch_norm(train, EPSILON, name, self.bn_momentum, self.dtype)
    cv = functools.partial(conv, dtype=self.dtype)
    sep = functools.partial(SeparableConv, dtype=self.dtype)
    out = {}
    x = cv(c(32), (3, 3), strides=2, padding="VALID", use_bias=False, name="block1_conv1")(images)
    x = nn.relu(bn("block1_conv1_bn")(x))
    x = cv(c(64), (3, 3), padding="VALID", use_bias=False, name="block1_conv2")(x)
    x = nn.relu(bn("block1_conv2_bn")(x))
    x = record(self, out, "block1", x)

    def entry(x, block, filters, first_relu=True, filters2=None):
      """A strided block with a 1x1 conv shortcut (entry flow, and block 13)."""
      residual = bn(f"block{block}_residual_bn")(
          cv(c(filters2 or filters), (1, 1), strides=2, padding="SAME", use_bias=False,
             name=f"block{block}_residual_conv")(x))
      if first_relu:
        x = nn.relu(x)
      x = bn(f"block{block}_sepconv1_bn")(
          sep(c(filters), name=f"block{block}_sepconv1")(x))
      x = nn.relu(x)
      x = bn(f"block{block}_sepconv2_bn")(
          sep(c(filters2 or filters), name=f"block{block}_sepconv2")(x))
      x = max_pool(x, (3, 3), (2, 2), "SAME")
      return x + residual

    x = entry(x, 2, 128, first_relu=False)
    for block, filters in ((3, 256), (4, 728)):
      x = entry(x, block, filters)
      x = record(self, out, f"block{block}", x)
    for block in range(5, 13):  # middle flow
      residual = x
      for i in (1, 2, 3):
        x = nn.relu(x)
        x = bn(f"block{block}_sepconv{i}_bn")(
            sep(c(728), name=f"block{block}_sepconv{i}")(x))
      x = x + residual
    x = record(self, out, "block12", x)
    x = entry(x, 13, 728, filters2=1024)
    x = record(self, out, "block13", x)
    x = nn.relu(bn("block14_sepconv1_bn")(sep(c(1536), name="block14_sepconv1")(x)))
    x = nn.relu(bn("block14_sepconv2_bn")(sep(c(2048), name="block14_sepconv2")(x)))
    x = record(self, out, "features", x)
    return pooled_top(x, self.num_classes, out, HEAD_LAYER, self.dtype)

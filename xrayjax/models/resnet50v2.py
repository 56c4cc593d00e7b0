"""ResNet50V2 (pre-activation), layer for layer as `keras.applications.ResNet50V2`.

Module names are Keras's layer names (Keras weight files load by name). As in
Keras, each stage's stride sits in its last block, and the identity shortcut of
a strided block is a 1x1 max-pool (a subsample). `width` scales every channel
count. Conv weights use He initialisation (see models/common.py); BatchNorm
follows Keras (momentum 0.99, epsilon 1.001e-5).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from xrayjax.models.common import (BN_MOMENTUM, batch_norm, conv, max_pool, pooled_top, record,
                                   scaled, zero_pad)

STAGES = (("conv2", 64, 3, 2), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 1))
EPSILON = 1.001e-5

PARAM_GROUPS = {
    "before_last_conv_block": r"^(conv1_|conv[234]_|conv5_block[12]_)",
    "last_conv_block": r"^(conv5_block3_|post_bn/)",
    "head": r"^predictions/",
}
HEAD_LAYER = "predictions"


class ResNet50V2(nn.Module):
  num_classes: int | None  # None: no top (the final conv map only)
  width: float = 1.0
  bn_momentum: float = BN_MOMENTUM  # Keras's; see common.batch_norm
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    c = lambda n: scaled(n, self.width)
    bn = lambda name: batch_norm(train, EPSILON, name, self.bn_momentum, self.dtype)
    cv = functools.partial(conv, dtype=self.dtype)
    out = {}
    x = cv(c(64), (7, 7), strides=2, padding=3, name="conv1_conv")(images)
    x = max_pool(zero_pad(x, 1), (3, 3), (2, 2))
    for stage, filters, blocks, stride in STAGES:
      for b in range(1, blocks + 1):
        name = f"{stage}_block{b}"
        s = stride if b == blocks else 1
        preact = nn.relu(bn(f"{name}_preact_bn")(x))
        if b == 1:
          shortcut = cv(c(4 * filters), (1, 1), strides=s, name=f"{name}_0_conv")(preact)
        else:
          shortcut = x[:, ::s, ::s] if s > 1 else x
        y = nn.relu(bn(f"{name}_1_bn")(cv(c(filters), (1, 1), use_bias=False,
                                          name=f"{name}_1_conv")(preact)))
        y = cv(c(filters), (3, 3), strides=s, padding=1, use_bias=False,
               name=f"{name}_2_conv")(y)
        y = nn.relu(bn(f"{name}_2_bn")(y))
        x = shortcut + cv(c(4 * filters), (1, 1), name=f"{name}_3_conv")(y)
      x = record(self, out, stage, x)
    x = nn.relu(bn("post_bn")(x))
    x = record(self, out, "features", x)
    return pooled_top(x, self.num_classes, out, HEAD_LAYER, self.dtype)

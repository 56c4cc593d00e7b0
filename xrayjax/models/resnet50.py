"""ResNet50 (v1), layer for layer as Keras's `keras.applications.ResNet50`.

Module names are Keras's layer names, so Keras weight files (ImageNet included)
load by name (models/keras_weights.py). `stem_kernel=3` gives the DETL paper's
variant: its 7x7 stem conv replaced by a 3x3 one ("3x3 kernels instead of large
ones"); everything else in ResNet50 is already 1x1 or 3x3. `width` scales every
channel count (1.0 = the published network). Conv weights use He initialisation
(see models/common.py); BatchNorm follows Keras (momentum 0.99, epsilon 1.001e-5).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from xrayjax.models.common import (BN_MOMENTUM, batch_norm, conv, max_pool, pooled_top, record,
                                   scaled, zero_pad)

STAGES = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
EPSILON = 1.001e-5

PARAM_GROUPS = {
    "before_last_conv_block": r"^(conv1_|conv[234]_|conv5_block[12]_)",
    "last_conv_block": r"^conv5_block3_",
    "head": r"^predictions/",
}
HEAD_LAYER = "predictions"


class ResNet50(nn.Module):
  num_classes: int | None  # None: no top (the final conv map only)
  width: float = 1.0
  bn_momentum: float = BN_MOMENTUM  # Keras's; see common.batch_norm
  stem_kernel: int = 7
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    c = lambda n: scaled(n, self.width)
    bn = lambda name: batch_norm(train, EPSILON, name, self.bn_momentum, self.dtype)
    cv = functools.partial(conv, dtype=self.dtype)
    out = {}
    k = self.stem_kernel
    x = cv(c(64), (k, k), strides=2, padding=k // 2, name="conv1_conv")(images)
    x = nn.relu(bn("conv1_bn")(x))
    x = max_pool(zero_pad(x, 1), (3, 3), (2, 2))
    for stage, filters, blocks, stride in STAGES:
      for b in range(1, blocks + 1):
        name = f"{stage}_block{b}"
        s = stride if b == 1 else 1
        if b == 1:
          shortcut = bn(f"{name}_0_bn")(cv(c(4 * filters), (1, 1), strides=s,
                                           name=f"{name}_0_conv")(x))
        else:
          shortcut = x
        y = nn.relu(bn(f"{name}_1_bn")(cv(c(filters), (1, 1), strides=s,
                                          name=f"{name}_1_conv")(x)))
        y = nn.relu(bn(f"{name}_2_bn")(cv(c(filters), (3, 3), padding="SAME",
                                          name=f"{name}_2_conv")(y)))
        y = bn(f"{name}_3_bn")(cv(c(4 * filters), (1, 1), name=f"{name}_3_conv")(y))
        x = nn.relu(shortcut + y)
      x = record(self, out, stage, x)
    x = record(self, out, "features", x)
    return pooled_top(x, self.num_classes, out, HEAD_LAYER, self.dtype)

"""VGG16 as in the DETL paper (Keras layout: 13 3x3 convs in 5 blocks, 3 FC layers).

`width` scales every channel count (1.0 = the published 64..512 convs and 4096
FC units); small widths give CPU demo and test variants of the same topology.
Keras's VGG16 top has no dropout; `dropout` defaults to 0 to match it.
Weights use He initialisation (see models/common.py for why).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from xrayjax.models.common import HE_INIT, ConvReLU, max_pool, record, scaled

BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))

# Regexes over '/'-joined parameter paths; configs refer to them by name.
PARAM_GROUPS = {
    "before_last_conv_block": r"^block[1-4]_conv\d/",
    "last_conv_block": r"^block5_conv\d/",
    "head": r"^(fc1|fc2|predictions)/",
}
HEAD_LAYER = "predictions"


class VGG16(nn.Module):
  num_classes: int
  width: float = 1.0
  dropout: float = 0.0
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    out = {}
    x = images
    for b, (convs, channels) in enumerate(BLOCKS, start=1):
      for c in range(1, convs + 1):
        x = ConvReLU(scaled(channels, self.width), (3, 3), dtype=self.dtype,
                     name=f"block{b}_conv{c}")(x)
      x = record(self, out, f"block{b}", x)
      if b == len(BLOCKS):  # last conv block output, before its pooling (Grad-CAM target)
        x = record(self, out, "features", x)
      x = max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    for name in ("fc1", "fc2"):
      x = nn.relu(nn.Dense(scaled(4096, self.width), kernel_init=HE_INIT, dtype=self.dtype,
                           name=name)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    out["pre_logits"] = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD_LAYER)(x)
    out["logits"] = logits
    return logits, out

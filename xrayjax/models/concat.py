"""Xception + ResNet50V2 concatenated (Rahimzadeh & Attar 2020), as the authors built it.

One input feeds both backbones (no tops); their final 2048-channel maps
(10x10 at the authors' 300 px) are concatenated to 4096 channels, then a 1x1
conv with 1024 filters and no activation, flatten, dropout 0.5 and the dense
classifier (`head="flatten"`, the authors' network). `head="gap"` replaces the
flatten by global average pooling, which makes the head independent of the
input size and 100x smaller.

`out` holds each branch's final map ("xception", "resnet50v2"), their
concatenation ("concat"), the 1x1 conv's map ("features", the joint map
and Grad-CAM's default target) and every map a branch records, by path
("xception/block3", "resnet50v2/conv2", ...: finer maps of each branch).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from xrayjax.models import resnet50v2, xception
from xrayjax.models.common import BN_MOMENTUM, conv, global_avg_pool, record, scaled

HEADS = ("flatten", "gap")


def _branches(group: str) -> str:
  """A group of both backbones, as paths under the branch modules."""
  return "|".join(rf"^{name}/(?:{spec.PARAM_GROUPS[group].lstrip('^')})"
                  for name, spec in (("xception", xception), ("resnet50v2", resnet50v2)))


PARAM_GROUPS = {
    "before_last_conv_block": _branches("before_last_conv_block"),
    "last_conv_block": _branches("last_conv_block"),
    "head": r"^(concat_conv|predictions)/",
}
HEAD_LAYER = "predictions"
# In the authors' Keras code the 1x1 conv (created after Xception's four) and the classifier
# are unnamed.
KERAS_UNNAMED = {
    "dense": (HEAD_LAYER,),
    "conv2d": tuple(f"xception/{n}" for n in xception.KERAS_UNNAMED["conv2d"]) + ("concat_conv",),
    "batch_normalization": tuple(f"xception/{n}"
                                 for n in xception.KERAS_UNNAMED["batch_normalization"]),
}


class Concat(nn.Module):
  num_classes: int
  width: float = 1.0
  bn_momentum: float = BN_MOMENTUM  # Keras's; see common.batch_norm
  dropout: float = 0.5
  head: str = "flatten"
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    if self.head not in HEADS:
      raise ValueError(f"unknown concat head {self.head!r}; valid heads: {HEADS}")
    _, out_x = xception.Xception(None, self.width, self.bn_momentum, self.dtype,
                                 name="xception")(images, train=train)
    _, out_r = resnet50v2.ResNet50V2(None, self.width, self.bn_momentum, self.dtype,
                                      name="resnet50v2")(images, train=train)
    out = {f"{name}/{k}": v for name, branch in (("xception", out_x), ("resnet50v2", out_r))
           for k, v in branch.items()}
    branch_x = record(self, out, "xception", out_x["features"])
    branch_r = record(self, out, "resnet50v2", out_r["features"])
    x = record(self, out, "concat", jnp.concatenate([branch_x, branch_r], axis=-1))
    x = record(self, out, "features", conv(scaled(1024, self.width), (1, 1), dtype=self.dtype,
                                           name="concat_conv")(x))
    x = x.reshape((x.shape[0], -1)) if self.head == "flatten" else global_avg_pool(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    out["pre_logits"] = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD_LAYER)(x)
    out["logits"] = logits
    return logits, out

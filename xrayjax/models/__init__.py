"""Model registry: `get(name)(num_classes=..., **config.model)`.

Every model is a Flax Linen module whose `__call__(images, *, train)` returns
`(logits, out)`, with `out["features"]` the last conv block's output. Each model
module declares `PARAM_GROUPS` (named regexes over parameter paths, e.g.
"last_conv_block") and `HEAD_LAYER` (the classifier replaced between stages).
"""

from __future__ import annotations

import types

from xrayjax.models import alexnet, vgg

_MODELS = {
    "alexnet": (alexnet.AlexNet, alexnet),
    "vgg16": (vgg.VGG16, vgg),
}


def _entry(name: str):
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; valid models: {sorted(_MODELS)}")
  return _MODELS[name]


def get(name: str):
  """The model class registered as `name`."""
  return _entry(name)[0]


def spec(name: str) -> types.ModuleType:
  """The model's module: PARAM_GROUPS and HEAD_LAYER."""
  return _entry(name)[1]


def names() -> list[str]:
  return sorted(_MODELS)

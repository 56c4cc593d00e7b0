"""Model registry: `build(name, num_classes, config.model)`.

Every model is a Flax Linen module whose `__call__(images, *, train)` returns
`(logits, out)`, with `out["features"]` the last conv block's output. Each model
module declares `PARAM_GROUPS` (named regexes over parameter paths, e.g.
"last_conv_block"), `HEAD_LAYER` (the classifier replaced between stages) and,
where Keras leaves layers unnamed, `KERAS_UNNAMED` (see keras_weights.py).

`config.model.compute_dtype` ("float32" or "bfloat16") is the dtype convolutions, dense
layers and BatchNorm compute in (the module's `dtype`); parameters and BatchNorm statistics
are float32 either way, and callers take the logits to float32 before the loss or softmax.
"""

from __future__ import annotations

import types

import jax.numpy as jnp

from xrayjax.models import alexnet, concat, resnet50, resnet50v2, vgg, xception

_MODELS = {
    "alexnet": (alexnet.AlexNet, alexnet),
    "vgg16": (vgg.VGG16, vgg),
    "resnet50": (resnet50.ResNet50, resnet50),
    "resnet50v2": (resnet50v2.ResNet50V2, resnet50v2),
    "xception": (xception.Xception, xception),
    "concat": (concat.Concat, concat),
}
# config.model keys that are not module attributes.
INIT_FROM = "init_from"
COMPUTE_DTYPE = "compute_dtype"  # -> the module's `dtype`
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _entry(name: str):
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; valid models: {sorted(_MODELS)}")
  return _MODELS[name]


def get(name: str):
  """The model class registered as `name`."""
  return _entry(name)[0]


def build(name: str, num_classes: int, model_config):
  """The model `name` with the attributes in `model_config` (config.model)."""
  kwargs = {k: v for k, v in dict(model_config).items() if k not in (INIT_FROM, COMPUTE_DTYPE)}
  dtype = dict(model_config).get(COMPUTE_DTYPE)
  if dtype is not None:
    if dtype not in COMPUTE_DTYPES:
      raise ValueError(f"config.model.compute_dtype={dtype!r}; valid values: "
                       f"{sorted(COMPUTE_DTYPES)}")
    kwargs["dtype"] = COMPUTE_DTYPES[dtype]
  try:
    return get(name)(num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise ValueError(f"config.model for {name!r} has an unknown field: {e}") from None


def spec(name: str) -> types.ModuleType:
  """The model's module: PARAM_GROUPS, HEAD_LAYER, KERAS_UNNAMED."""
  return _entry(name)[1]


def names() -> list[str]:
  return sorted(_MODELS)

"""Keras weight files -> Flax variables, read with h5py (Keras itself is not needed).

Reads the three formats Keras writes:
  - `.keras` (Keras 3 archive: a zip holding `model.weights.h5`),
  - `.weights.h5` (Keras 3 `save_weights`: `layers/<key>/vars/<i>`, the layer's name in the
    `vars` group's `name` attribute),
  - legacy `.h5` (Keras 2 `save_weights` or `model.save`, as the keras.applications ImageNet
    files are: `layer_names` and per-layer `weight_names` attributes).
Nested models (a Keras model used as a layer) are searched too.

Matching is by layer name: xrayjax modules carry Keras's layer names. Layers Keras
leaves unnamed (`conv2d`, `conv2d_1`, ...) are matched in creation order through
the model module's KERAS_UNNAMED. Conv, Dense, SeparableConv2D (`depthwise`,
`pointwise` children here) and BatchNormalization (with its moving statistics)
are converted. A 3-channel first conv loaded into a 1-channel (grey) model is
summed over its input channels, which is exact for a grey image replicated to
RGB. Layers in the model's `head` group may be missing from the files or have
another shape (a new class count): they keep their initialisation and the log
says so. Any other missing layer or shape mismatch is an error naming the layer.
"""

from __future__ import annotations

import io
import os
import re
import zipfile

import flax
import h5py
import numpy as np
from absl import logging

# Keras 3 .weights.h5 stores a layer's variables by position; their roles by layer class.
_ROLES = {
    "conv2d": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
    "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}
_UNNAMED = re.compile(r"^(conv2d|batch_normalization|dense)(?:_(\d+))?$")


def read(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{layer name: {role: array}} of every layer with weights in a Keras weight file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Keras weight file {path} does not exist")
  if path.endswith(".keras"):
    with zipfile.ZipFile(path) as z:
      if "model.weights.h5" not in z.namelist():
        raise ValueError(f"{path} is not a Keras 3 archive: it has no model.weights.h5 "
                         f"(found {z.namelist()})")
      data = io.BytesIO(z.read("model.weights.h5"))
    with h5py.File(data, "r") as f:
      return _read_keras3(f, path)
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"{path} is not an HDF5 Keras weight file ({e})") from None
  with f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" in root.attrs:
      return _read_legacy(root)
    if "layers" in f:
      return _read_keras3(f, path)
  raise ValueError(f"{path} has neither Keras 2 `layer_names` nor Keras 3 `layers/` weights; "
                   "expected a file written by Keras `save_weights` or `save`")


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _read_legacy(root) -> dict:
  """Weight names are '<layer>/<role>:0' ('<model>/<layer>/<role>:0' inside nested models)."""
  out = {}
  for layer in root.attrs["layer_names"]:
    group = root[_text(layer)]
    for name in group.attrs.get("weight_names", []):
      parts = _text(name).split("/")
      inner = parts[-2] if len(parts) >= 2 else _text(layer)
      out.setdefault(inner, {})[parts[-1].split(":")[0]] = np.asarray(group[_text(name)])
  return out


def _read_keras3(f, path: str) -> dict:
  out = {}

  def visit(group):
    for key in group:
      layer = group[key]
      if "vars" in layer and len(layer["vars"]):
        name = _text(layer["vars"].attrs.get("name", key))
        cls = re.sub(r"_\d+$", "", key)
        if cls not in _ROLES:
          raise ValueError(f"{path}: layer {name!r} ({key}) has weights of a kind the importer "
                           f"does not know; known kinds: {sorted(_ROLES)}")
        values = [np.asarray(layer["vars"][str(i)]) for i in range(len(layer["vars"]))]
        roles = _ROLES[cls]
        if cls == "batch_normalization" and len(values) != 4:
          raise ValueError(f"{path}: BatchNormalization {name!r} has {len(values)} variables; "
                           "only center=True, scale=True (4 variables) is supported")
        out[name] = dict(zip(roles if len(values) == len(roles) else roles[:-1], values))
      if "layers" in layer:
        visit(layer["layers"])

  visit(f["layers"])
  return out


def _flax_layers(variables: dict) -> dict[str, str]:
  """{module path: kind} of every Flax module that corresponds to one Keras layer."""
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  layers = {}
  for path in params:
    module, leaf = path.rsplit("/", 1)
    if module.endswith(("/depthwise", "/pointwise")):
      layers[module.rsplit("/", 1)[0]] = "separable"
    elif leaf == "scale":
      layers[module] = "batch_norm"
    else:
      layers.setdefault(module, "dense_or_conv")
  return layers


def load(paths: str, variables: dict, spec) -> dict:
  """`variables` ({"params", "batch_stats"}) with the layers found in Keras weight files.

  Args:
    paths: one file, or several separated by commas (e.g. the two ImageNet files of the
      concat network's branches); a layer name may appear in only one of them.
    variables: the model's initialised variables (host arrays).
    spec: the model's module (PARAM_GROUPS["head"], optional KERAS_UNNAMED).
  """
  keras, origin = {}, {}
  for path in [p.strip() for p in paths.split(",") if p.strip()]:
    for name, weights in read(path).items():
      if name in keras:
        raise ValueError(f"layer {name!r} is in both {origin[name]} and {path}; pass files whose "
                         "layers do not overlap")
      keras[name], origin[name] = weights, path
  keras_name = _keras_names(keras, getattr(spec, "KERAS_UNNAMED", {}))
  head = re.compile(spec.PARAM_GROUPS["head"])
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(variables, sep="/").items()}
  loaded, kept, missing = [], [], []
  for module, kind in _flax_layers(variables).items():
    name = keras_name.get(module, module.rsplit("/", 1)[-1])
    is_head = bool(head.search(module + "/"))
    if name not in keras:
      (kept if is_head else missing).append(module if is_head else name)
      continue
    try:
      flat.update(_convert(kind, module, keras[name], flat))
    except ValueError as e:
      if not is_head:
        raise
      kept.append(f"{module} ({e})")
      continue
    loaded.append(module)
  if missing:
    raise ValueError(
        f"{len(missing)} of the model's {len(loaded) + len(missing) + len(kept)} layers are not in "
        f"{paths}: {', '.join(sorted(missing)[:6])}{' and more' if len(missing) > 6 else ''}. The "
        f"file(s) hold {len(keras)} layers, e.g. {', '.join(sorted(keras)[:6])}: are they Keras "
        f"weights of this model ({spec.__name__.rsplit('.', 1)[-1]})?")
  logging.info("loaded %d layers from %s; kept initialised: %s", len(loaded), paths,
               "; ".join(kept) or "none")
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _keras_names(keras: dict, unnamed: dict[str, tuple[str, ...]]) -> dict[str, str]:
  """{xrayjax module path: Keras name} for layers Keras leaves unnamed, in creation order."""
  out = {}
  for cls, modules in unnamed.items():
    found = sorted((int(m.group(2) or 0), name) for name in keras
                   if (m := _UNNAMED.match(name)) and m.group(1) == cls)
    for module, (_, name) in zip(modules, found):
      out[module] = name
  return out


def _convert(kind: str, module: str, weights: dict, flat: dict) -> dict:
  """{flat variable path: array} for one layer, shape-checked against `flat`."""
  if kind == "batch_norm":
    pairs = {f"params/{module}/scale": "gamma", f"params/{module}/bias": "beta",
             f"batch_stats/{module}/mean": "moving_mean",
             f"batch_stats/{module}/var": "moving_variance"}
    return {p: _checked(module, p, weights, role, flat) for p, role in pairs.items()}
  if kind == "separable":
    out = {f"params/{module}/pointwise/kernel":
           _checked(module, f"params/{module}/pointwise/kernel", weights, "pointwise_kernel", flat)}
    # Keras (h, w, channels, 1) -> Flax grouped conv (h, w, 1, channels)
    depthwise = np.swapaxes(_require(module, weights, "depthwise_kernel"), 2, 3)
    out[f"params/{module}/depthwise/kernel"] = _shape_ok(
        module, f"params/{module}/depthwise/kernel", depthwise, flat)
    if f"params/{module}/pointwise/bias" in flat:
      out[f"params/{module}/pointwise/bias"] = _checked(
          module, f"params/{module}/pointwise/bias", weights, "bias", flat)
    return out
  out = {}
  kernel = _require(module, weights, "kernel")
  target = flat[f"params/{module}/kernel"]
  if kernel.ndim == 4 and target.shape[2] == 1 and kernel.shape[2] == 3:
    kernel = kernel.sum(axis=2, keepdims=True)  # RGB filters applied to grey replicated to RGB
  out[f"params/{module}/kernel"] = _shape_ok(module, f"params/{module}/kernel", kernel, flat)
  if f"params/{module}/bias" in flat:
    out[f"params/{module}/bias"] = _checked(module, f"params/{module}/bias", weights, "bias", flat)
  elif "bias" in weights:
    raise ValueError(f"layer {module}: the Keras layer has a bias, the xrayjax layer has none")
  return out


def _require(module: str, weights: dict, role: str) -> np.ndarray:
  if role not in weights:
    raise ValueError(f"layer {module}: the Keras layer has no {role!r} (it has {sorted(weights)})")
  return weights[role]


def _checked(module, path, weights, role, flat):
  return _shape_ok(module, path, _require(module, weights, role), flat)


def _shape_ok(module: str, path: str, value: np.ndarray, flat: dict) -> np.ndarray:
  expected = flat[path].shape
  if value.shape != expected:
    raise ValueError(f"layer {module}: {path.rsplit('/', 1)[-1]} expects shape {expected}, "
                     f"the Keras file has {value.shape}")
  return value.astype(flat[path].dtype)

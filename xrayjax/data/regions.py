"""Image regions kept or erased: the shortcut audit's perturbations and masked inputs.

One implementation serves both uses (evaluate/shortcuts.py): a trained model scored on
perturbed test images, and a model trained and tested on masked images
(`config.audit.input`, Maguolo & Nanni 2021). Every op acts on the uint8 images of a
dataset (pipeline.select), before normalisation, so erased pixels are black (0), as in a
film's unexposed border.

Ops (`geometry` is config.audit: its fractions of the image side):
  top_crop      the top `top_crop` of the rows cut off and the rest resized back to the
                full size (COVID-Net's check for text markers at the top of a film).
  centre_only   the border erased: only the central box (`centre` of each side) kept.
  border_only   the central box erased: only the border kept.
  no_corners    four corner squares (`corner` of each side) erased: where site markers sit.
  lungs_only    everything but the lungs erased.
  no_lungs      the lungs erased.
  mirror        left-right mirrored.
The lung ops use the image's lung mask where it has one; elsewhere a fixed box stands in
(`lung_box`: top, bottom, left, right as fractions of the side; about where the lungs lie
on a centred frontal film), and reports say for how many images it did.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from xrayjax.data import pipeline

OPS = ("top_crop", "centre_only", "border_only", "no_corners", "lungs_only", "no_lungs",
       "mirror")
LUNG_OPS = ("lungs_only", "no_lungs")
# config.audit.input -> the op applied to every image the model trains and is tested on.
INPUTS = {"full": None, "border": "border_only", "centre": "centre_only", "lungs": "lungs_only",
          "no_lungs": "no_lungs"}


def box(size: int, top: float, bottom: float, left: float, right: float) -> np.ndarray:
  """A [size, size] bool mask, True inside the box (edges as fractions of the side)."""
  out = np.zeros((size, size), bool)
  out[int(round(top * size)):int(round(bottom * size)),
      int(round(left * size)):int(round(right * size))] = True
  return out


def keep_mask(op: str, size: int, geometry, lung: np.ndarray | None = None,
              has_lung: np.ndarray | None = None) -> np.ndarray:
  """The pixels `op` keeps: [size, size] for the fixed ops, [n, size, size] for the lung ops
  (`lung` [n, size, size] and `has_lung` [n]: the images' lung masks and whether they have
  one; without a mask, geometry.lung_box stands in)."""
  margin = (1 - geometry.centre) / 2
  centre = box(size, margin, 1 - margin, margin, 1 - margin)
  if op == "centre_only":
    return centre
  if op == "border_only":
    return ~centre
  if op == "no_corners":
    c = geometry.corner
    corners = (box(size, 0, c, 0, c) | box(size, 0, c, 1 - c, 1) | box(size, 1 - c, 1, 0, c)
               | box(size, 1 - c, 1, 1 - c, 1))
    return ~corners
  if op in LUNG_OPS:
    if lung is None:
      raise ValueError(f"region op {op} needs the images' lung masks")
    stand_in = box(size, *geometry.lung_box)
    lungs = np.where(np.asarray(has_lung)[:, None, None], lung, stand_in[None])
    return lungs if op == "lungs_only" else ~lungs
  raise ValueError(f"{op!r} is not a mask op; mask ops: {OPS[1:6]}")


def apply(ds: tf.data.Dataset, op: str, geometry, masks: dict | None = None
          ) -> tf.data.Dataset:
  """`ds` (uint8 images [s, s, 1], `index` = position in `masks`) with `op` applied to every
  image. `masks` (Cohort.masks of the same rows) is needed for the lung ops."""
  if op not in OPS:
    raise ValueError(f"unknown region op {op!r}; valid: {OPS}")
  size = int(ds.element_spec["image"].shape[0])
  if op == "mirror":
    return ds.map(pipeline.graph_fn(lambda ex: {**ex, "image": tf.reverse(ex["image"], [1])}))
  if op == "top_crop":
    cut = int(round(geometry.top_crop * size))

    def crop(ex):
      image = tf.image.resize(tf.cast(ex["image"][cut:], tf.float32), (size, size),
                              antialias=True)
      return {**ex, "image": tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)}
    return ds.map(pipeline.graph_fn(crop))
  if op in LUNG_OPS:
    if masks is None:
      raise ValueError(f"region op {op} needs the images' lung masks")
    keep = keep_mask(op, size, geometry, masks["lung"], masks["has_lung"])
    ds = pipeline.with_field(ds, "_keep", keep.astype(np.uint8)[..., None])
    return ds.map(pipeline.graph_fn(lambda ex: {**{k: v for k, v in ex.items() if k != "_keep"},
                                               "image": ex["image"] * ex["_keep"]}))
  keep = tf.constant(keep_mask(op, size, geometry).astype(np.uint8)[..., None])
  return ds.map(pipeline.graph_fn(lambda ex: {**ex, "image": ex["image"] * keep}))

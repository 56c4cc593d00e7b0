"""tf.data input pipeline: select, decode, resize, normalise, augment, batch.

Randomness is stateless and keyed by (seed, epoch, example index), so an epoch's
batches are a pure function of those: a resumed run sees exactly the batches the
uninterrupted run would have seen. Evaluation batches are padded to a fixed size
with `mask` = 0 on the padding, so every example counts exactly once.

Batches come out as numpy dicts holding this process's share of the global
batch; `sharding.to_global` turns them into global jax.Arrays.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

METADATA_KEYS = ("image_id", "patient_id", "label", "source", "site", "view", "file_sha1",
                 "phash")


def _skip_images(builder) -> dict:
  return {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
          if isinstance(f, tfds.features.Image)}


def read_metadata(builder: tfds.core.DatasetBuilder, split: str = "train") -> dict[str, np.ndarray]:
  """Per-image metadata and `findings` (no image is decoded), sorted by image_id."""
  ds = builder.as_dataset(split=split, decoders=_skip_images(builder), shuffle_files=False)
  keys = [k for k in METADATA_KEYS if k in builder.info.features]
  ds = ds.map(lambda ex: {k: ex[k] for k in keys + ["findings"]}).batch(4096)
  cols: dict[str, list] = {k: [] for k in keys}
  findings = []
  for batch in ds.as_numpy_iterator():
    for k in keys:
      cols[k].extend(v.decode() for v in batch[k])
    findings.append(batch["findings"])
  meta = {k: np.array(v, dtype=object) for k, v in cols.items()}
  meta["findings"] = np.concatenate(findings) if findings else np.zeros((0, 0), bool)
  order = np.argsort(meta["image_id"].astype(str), kind="stable")
  return {k: v[order] for k, v in meta.items()}


def select(builders: list[tfds.core.DatasetBuilder], builder_index: np.ndarray,
           image_ids: np.ndarray, labels: np.ndarray, image_size: int,
           split: str = "train") -> tf.data.Dataset:
  """The chosen images as {image uint8 [s, s, 1], label, index}, cached in memory.

  Image k is `image_ids[k]` of `builders[builder_index[k]]`. `index` is k: it keys the
  augmentation randomness and lets evaluation outputs be matched back to the metadata.
  """
  if len(image_ids) == 0:
    raise ValueError("empty selection: the split has no images; check the data sizes in config")
  label_of = tf.constant(np.asarray(labels, np.int32))
  parts = []
  for b, builder in enumerate(builders):
    mine = np.flatnonzero(np.asarray(builder_index) == b)
    if len(mine):
      parts.append(_select_one(builder, image_ids[mine], mine, label_of, image_size, split))
  ds = parts[0]
  for part in parts[1:]:
    ds = ds.concatenate(part)
  return ds.cache()


def _select_one(builder, image_ids, positions, label_of, image_size, split):
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant([str(i) for i in image_ids]),
                                          tf.constant(positions, tf.int64)), -1)

  def keep(ex):
    return table.lookup(ex["image_id"]) >= 0

  image_feature = builder.info.features["image"]

  def prepare(ex):
    index = table.lookup(ex["image_id"])
    image = image_feature.decode_example(ex["image"])  # only the selected images are decoded
    if image.shape[0] != image_size or image.shape[1] != image_size:
      image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size),
                              antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return {"image": image, "label": tf.gather(label_of, index), "index": tf.cast(index, tf.int32)}

  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=_skip_images(builder))
  return ds.filter(keep).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


def normalise(image: tf.Tensor) -> tf.Tensor:
  """uint8 grey -> float32 in [-1, 1]."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def augment(image: tf.Tensor, seed: tf.Tensor, rotation_deg: float, scale: float,
            mirror: bool) -> tf.Tensor:
  """The DETL paper's augmentation: random rotation, scaling and mirroring.

  Args:
    image: float32 [h, w, c] in [-1, 1].
    seed: int64 [2] stateless seed.
    rotation_deg: maximum absolute rotation in degrees.
    scale: maximum relative zoom (0.1 -> 0.9..1.1).
    mirror: flip left-right with probability 1/2.
  """
  s_rot, s_zoom, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  angle = tf.random.stateless_uniform([], s_rot, -rotation_deg, rotation_deg) * math.pi / 180
  zoom = tf.random.stateless_uniform([], s_zoom, 1 - scale, 1 + scale)
  flip = tf.logical_and(tf.constant(mirror), tf.random.stateless_uniform([], s_flip) < 0.5)
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
  sx = tf.where(flip, -1.0, 1.0)  # mirror: x_out -> w - 1 - x_out before rotating
  # Output pixel (x, y) samples input at R/zoom @ (mirror(x) - c) + c.
  a0, a1 = cos * sx, -sin
  b0, b1 = sin * sx, cos
  a2 = cx - a0 * cx - a1 * cy
  b2 = cy - b0 * cx - b1 * cy
  transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=-1.0, interpolation="BILINEAR", fill_mode="CONSTANT")
  return out[0]


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_batches(ds: tf.data.Dataset, num_examples: int, global_batch: int, seed: int,
                  epoch: int, augment_config, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of shuffled, augmented, full batches (the remainder is dropped)."""
  steps = steps_per_epoch(num_examples, global_batch)
  local_batch = global_batch // process_count
  epoch_seed = _epoch_seed(seed, epoch)
  aug = augment_config

  def prepare(ex):
    image = normalise(ex["image"])
    if aug.enabled:
      key = tf.stack([tf.constant(epoch_seed % (2**62), tf.int64), tf.cast(ex["index"], tf.int64)])
      image = augment(image, key, aug.rotation_deg, aug.scale, aug.mirror)
    return {"image": image, "label": ex["label"]}

  out = (ds.shuffle(num_examples, seed=epoch_seed, reshuffle_each_iteration=False)
         .shard(process_count, process_index)
         .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
         .batch(local_batch, drop_remainder=True)
         .take(steps)
         .prefetch(2))
  return out.as_numpy_iterator()


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  steps = num_examples // global_batch
  if steps == 0:
    raise ValueError(f"the training split has {num_examples} images, fewer than one batch of "
                     f"{global_batch}; lower batch_size or add data")
  return steps


def eval_batches(ds: tf.data.Dataset, num_examples: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, padded to full batches with mask = 0.

  Every process yields the same number of batches (some may be all padding).
  """
  local_batch = global_batch // process_count
  num_batches = math.ceil(num_examples / global_batch)
  ds = ds.shard(process_count, process_index).map(
      lambda ex: {"image": normalise(ex["image"]), "label": ex["label"], "index": ex["index"]},
      num_parallel_calls=tf.data.AUTOTUNE).batch(local_batch).prefetch(2)
  it = ds.as_numpy_iterator()
  template = None
  for _ in range(num_batches):
    batch = next(it, None)
    if batch is None:  # this process ran out: an all-padding batch
      batch = {k: v[:0] for k, v in template.items()}
    template = template or batch
    n = len(batch["label"])
    pad = local_batch - n
    batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in
             batch.items()}
    batch["mask"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    yield batch


def masks(builders: list[tfds.core.DatasetBuilder], builder_index: np.ndarray,
          image_ids: np.ndarray, image_size: int, split: str = "train") -> dict[str, np.ndarray]:
  """Lesion and lung masks of the chosen images at `image_size`, for Grad-CAM audits.

  `lesion` comes from a source's lesion_mask (synthetic) or boxes (NIH, RSNA), `lung` from
  its lung_mask; `has_lesion` / `has_lung` say where one exists (an empty mask counts as
  none). Image k is `image_ids[k]` of `builders[builder_index[k]]`, as in `select`.
  """
  n = len(image_ids)
  out = {"lesion": np.zeros((n, image_size, image_size), bool),
         "lung": np.zeros((n, image_size, image_size), bool),
         "has_lesion": np.zeros(n, bool), "has_lung": np.zeros(n, bool)}
  for b, builder in enumerate(builders):
    feats = builder.info.features
    wanted = [k for k in ("lesion_mask", "lung_mask", "boxes") if k in feats]
    mine = np.flatnonzero(np.asarray(builder_index) == b)
    if not wanted or not len(mine):
      continue
    position = {str(image_ids[k]): k for k in mine}
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(list(position)), tf.ones(len(position), tf.int64)), 0)
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=_skip_images(builder))
    ds = ds.filter(lambda ex: table.lookup(ex["image_id"]) > 0)
    for ex in ds.as_numpy_iterator():
      k = position[ex["image_id"].decode()]
      for name, key in (("lesion", "lesion_mask"), ("lung", "lung_mask")):
        if key in ex:
          m = np.asarray(feats[key].decode_example(ex[key]))[..., 0]
          m = np.asarray(tf.image.resize(m[..., None].astype(np.float32),
                                         (image_size, image_size)))[..., 0] > 0.5
          out[name][k], out[f"has_{name}"][k] = m, bool(m.any())
      if "boxes" in ex and len(ex["boxes"]["bbox"]):
        out["lesion"][k] = boxes_to_masks([ex["boxes"]["bbox"]], image_size)[0]
        out["has_lesion"][k] = True
  return out


def boxes_to_masks(boxes: list[np.ndarray], size: int) -> np.ndarray:
  """Per image, [n, 4] normalised (ymin, xmin, ymax, xmax) boxes -> a [size, size] mask."""
  out = np.zeros((len(boxes), size, size), bool)
  for i, bs in enumerate(boxes):
    for y0, x0, y1, x1 in np.asarray(bs).reshape(-1, 4):
      out[i, int(np.floor(y0 * size)):int(np.ceil(y1 * size)),
          int(np.floor(x0 * size)):int(np.ceil(x1 * size))] = True
  return out

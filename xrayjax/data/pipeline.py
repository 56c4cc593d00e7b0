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
import weakref
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from xrayjax.data import records

# tf.data's map and filter functions, traced as written: AutoGraph would rewrite each one (a
# tenth of a tiny run's time) to turn Python branches on tensors into graph ops, and none of ours
# branches on a tensor.
graph_fn = tf.autograph.experimental.do_not_convert

METADATA_KEYS = ("image_id", "patient_id", "label", "source", "site", "view", "file_sha1",
                 "phash")


def _skip_images(builder) -> dict:
  return {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
          if isinstance(f, tfds.features.Image)}


# Each builder's splits, opened once: TFDS builds its reading pipeline anew on every `as_dataset`,
# and a run's selections and masks all filter the same files.
_OPENED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _examples(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """The split's examples in the files' order, their images left encoded."""
  opened = _OPENED.setdefault(builder, {})
  if split not in opened:
    opened[split] = builder.as_dataset(split=split, shuffle_files=False,
                                       decoders=_skip_images(builder))
  return opened[split]


def read_metadata(builder: tfds.core.DatasetBuilder, split: str = "train") -> dict[str, np.ndarray]:
  """Per-image metadata, `findings`, `position` (the image's place in the split's files as
  `select` reads them) and `record` (its index in the split's records, as records.reader
  reads them), sorted by image_id; no image is decoded."""
  ds = builder.as_dataset(split=split, decoders=_skip_images(builder), shuffle_files=False,
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  keys = [k for k in METADATA_KEYS if k in builder.info.features]
  ds = ds.map(graph_fn(lambda ex: {k: ex[k] for k in keys + ["findings", "tfds_id"]})).batch(4096)
  cols: dict[str, list] = {k: [] for k in keys + ["tfds_id"]}
  findings = []
  for batch in ds.as_numpy_iterator():
    for k in keys + ["tfds_id"]:
      cols[k].extend(v.decode() for v in batch[k])
    findings.append(batch["findings"])
  tfds_ids = cols.pop("tfds_id")
  meta = {k: np.array(v, dtype=object) for k, v in cols.items()}
  meta["findings"] = np.concatenate(findings) if findings else np.zeros((0, 0), bool)
  meta["position"] = np.arange(len(meta["image_id"]))  # the image's place in the split's files
  meta["record"] = records.record_of(builder, tfds_ids, split)
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
  return _decoded(builders, builder_index, image_ids, labels, image_size, split).cache()


def _decoded(builders, builder_index, image_ids, labels, image_size, split="train"):
  """`select`'s dataset before its cache: one pass over the files, decoding only the chosen
  images; the order is the files' (builder by builder), not the selection's."""
  label_of = tf.constant(np.asarray(labels, np.int32))
  parts = []
  for b, builder in enumerate(builders):
    mine = np.flatnonzero(np.asarray(builder_index) == b)
    if len(mine):
      parts.append(_select_one(builder, image_ids[mine], mine, label_of, image_size, split))
  ds = parts[0]
  for part in parts[1:]:
    ds = ds.concatenate(part)
  return ds


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
    return {"image": to_model_size(image, image_size), "label": tf.gather(label_of, index),
            "index": tf.cast(index, tf.int32)}

  return _examples(builder, split).filter(graph_fn(keep)).map(
      graph_fn(prepare), num_parallel_calls=tf.data.AUTOTUNE)


def to_model_size(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """A stored uint8 image [h, w, 1] -> the model's input size (antialiased, rounded to uint8).

  The one resize between a built image and the model: training, evaluation and `predict`
  all go through it.
  """
  if image.shape[0] == image_size and image.shape[1] == image_size:
    return image
  image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def from_arrays(images: np.ndarray, **fields: np.ndarray) -> tf.data.Dataset:
  """In-memory uint8 images [n, s, s, 1] (and per-image `fields`) as a dataset like `select`'s:
  {image, label (0 unless given), index, **fields}."""
  n = len(images)
  data = {"image": np.asarray(images, np.uint8),
          "label": np.asarray(fields.pop("label", np.zeros(n)), np.int32),
          "index": np.arange(n, dtype=np.int32), **fields}
  return tf.data.Dataset.from_tensor_slices(data)


def with_field(ds: tf.data.Dataset, name: str, values: np.ndarray) -> tf.data.Dataset:
  """`ds` with `name` = values[index] added to every example."""
  table = tf.constant(values)
  return ds.map(graph_fn(lambda ex: {**ex, name: tf.gather(table, ex["index"])}))


def images(ds: tf.data.Dataset, indices) -> dict[int, np.ndarray]:
  """{index: uint8 image [s, s]} of the chosen examples of `ds` (e.g. for a gallery)."""
  wanted = set(int(i) for i in indices)
  return {int(ex["index"]): ex["image"][..., 0] for ex in ds.as_numpy_iterator()
          if int(ex["index"]) in wanted}


def normalise(image: tf.Tensor) -> tf.Tensor:
  """uint8 grey -> float32 in [-1, 1]."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


AUGMENT_OPS = ("rotate", "zoom", "zoom_xy", "shift", "shear", "flip_lr", "flip_ud")


def parse_ops(ops) -> list[tuple[str, float]]:
  """("rotate(10)", "flip_lr", ...) -> [("rotate", 10.0), ("flip_lr", 0.0), ...].

  Ops (each draws its own random value per image and epoch; all compose into one affine
  resampling, so the order only decides which random key each op gets):
    rotate(d): rotation by uniform(-d, d) degrees (rotate(360): any angle).
    zoom(r): isotropic scaling by uniform(1 - r, 1 + r) (DETL's "scaling").
    zoom_xy(r): width and height scaled independently by uniform(1 - r, 1 + r) (Keras
      ImageDataGenerator's zoom_range).
    shift(r): translation by uniform(-r, r) of the width and, independently, the height.
    shear(d): shear by uniform(-d, d) degrees (Keras's shear_range, which is in degrees).
    flip_lr, flip_ud: mirror left-right / top-bottom with probability 1/2.
  """
  out = []
  for op in ops:
    name, _, arg = str(op).strip().partition("(")
    if name not in AUGMENT_OPS or (arg and not arg.endswith(")")):
      raise ValueError(f"unknown augmentation op {op!r}; valid ops: {AUGMENT_OPS}, e.g. "
                       "('rotate(10)', 'zoom(0.1)', 'flip_lr')")
    needs_arg = not name.startswith("flip")
    if needs_arg != bool(arg):
      raise ValueError(f"augmentation op {op!r}: {name} " +
                       ("takes a number, e.g. rotate(10)" if needs_arg else "takes no number"))
    try:
      out.append((name, float(arg[:-1]) if arg else 0.0))
    except ValueError:
      raise ValueError(f"augmentation op {op!r}: {arg[:-1]!r} is not a number") from None
  return out


def augment(image: tf.Tensor, seed: tf.Tensor, ops: list[tuple[str, float]]) -> tf.Tensor:
  """Random affine augmentation of one image by `ops` (parse_ops), stateless.

  Args:
    image: float32 [h, w, c] in [-1, 1].
    seed: int64 [2] stateless seed; op k draws from the k-th of its splits.
    ops: parsed ops. Pixels from outside the image are black (-1).
  """
  if not ops:
    return image
  keys = tf.unstack(tf.random.experimental.stateless_split(seed, len(ops)))
  zero, one = tf.constant(0.0), tf.constant(1.0)
  angle = shear = tx = ty = zero
  zx = zy = sx = sy = one
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  for (name, v), key in zip(ops, keys):
    if name == "rotate":
      angle = tf.random.stateless_uniform([], key, -v, v) * math.pi / 180
    elif name == "zoom":
      zx = zy = tf.random.stateless_uniform([], key, 1 - v, 1 + v)
    elif name == "zoom_xy":
      zx, zy = tf.unstack(tf.random.stateless_uniform([2], key, 1 - v, 1 + v))
    elif name == "shift":
      fx, fy = tf.unstack(tf.random.stateless_uniform([2], key, -v, v))
      tx, ty = fx * w, fy * h
    elif name == "shear":
      shear = tf.random.stateless_uniform([], key, -v, v) * math.pi / 180
    elif name == "flip_lr":
      sx = tf.where(tf.random.stateless_uniform([], key) < 0.5, -1.0, 1.0)
    elif name == "flip_ud":
      sy = tf.where(tf.random.stateless_uniform([], key) < 0.5, -1.0, 1.0)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  # Output pixel p samples the input at R(angle) Shear(shear) diag(1/zx, 1/zy) diag(sx, sy)
  # (p - c) + c + t. (With shear 0, t 0 and zx = zy the terms below reduce exactly, bit for
  # bit, to the rotation-zoom-mirror form DETL's runs were made with.)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cos_s, sin_s = tf.cos(shear), tf.sin(shear)
  a0 = cos / zx * sx
  a1 = -(sin * cos_s + cos * sin_s) / zy * sy
  b0 = sin / zx * sx
  b1 = (cos * cos_s - sin * sin_s) / zy * sy
  a2 = cx - a0 * cx - a1 * cy + tx
  b2 = cy - b0 * cx - b1 * cy + ty
  transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=-1.0, interpolation="BILINEAR", fill_mode="CONSTANT")
  return out[0]


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# TF's seed pair for an op given `seed` when no global seed is set
# (tensorflow/python/framework/random_seed.py, DEFAULT_GRAPH_SEED).
_TF_DEFAULT_GLOBAL_SEED = 87654321


def _shuffle(ds: tf.data.Dataset, buffer_size: int, seed: int) -> tf.data.Dataset:
  """`ds.shuffle(buffer_size, seed, reshuffle_each_iteration=False)` as it runs in a process
  that never set TensorFlow's global seed, whoever set it since: Dataset.shuffle takes its
  seed pair from tf.random.set_seed as well as from `seed`, so a caller in the same process
  (a notebook, Keras's set_random_seed) reordered every epoch of a run (a retrained stage then
  differed from the first training). The same op with the pair spelled out."""
  flat = tf.nest.flatten(ds.element_spec)
  variant = tf.raw_ops.ShuffleDatasetV3(
      input_dataset=tf.data.experimental.to_variant(ds), buffer_size=buffer_size,
      seed=_TF_DEFAULT_GLOBAL_SEED, seed2=seed % (2**31 - 1),
      seed_generator=tf.raw_ops.DummySeedGenerator(), reshuffle_each_iteration=False,
      output_types=[s.dtype for s in flat], output_shapes=[s.shape for s in flat])
  return tf.data.experimental.from_variant(variant, ds.element_spec)


def train_batches(ds: tf.data.Dataset, num_examples: int, global_batch: int, seed: int,
                  epoch: int, augment_ops=(), process_index: int = 0,
                  process_count: int = 1, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of shuffled, augmented (`augment_ops`, see parse_ops) full batches (the
  remainder is dropped), from its batch `start` on (a run resumed inside an epoch gets the
  batches it had not trained on; augmentation is keyed by the image, not its position)."""
  steps = num_examples // global_batch  # (train.steps_per_epoch refuses 0 before this runs)
  local_batch = global_batch // process_count
  epoch_seed = _epoch_seed(seed, epoch)
  ds = (_shuffle(ds, num_examples, epoch_seed)
        .shard(process_count, process_index)
        .skip(start * local_batch))
  return _augmented_batches(ds, local_batch, steps - start, epoch_seed, augment_ops)


def _augmented_batches(ds, local_batch: int, steps: int, epoch_seed: int, augment_ops):
  """This process's examples of an epoch, in order -> `steps` augmented local batches."""
  ops = parse_ops(augment_ops)

  def prepare(ex):
    image = normalise(ex["image"])
    if ops:
      key = tf.stack([tf.constant(epoch_seed % (2**62), tf.int64), tf.cast(ex["index"], tf.int64)])
      image = augment(image, key, ops)
    return {"image": image, "label": ex["label"]}

  out = (ds.map(graph_fn(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
         .batch(local_batch, drop_remainder=True)
         .take(steps)
         .prefetch(2))
  return out.as_numpy_iterator()


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The epoch's order of a selection's `num_examples` dataset positions: the permutation
  `train_batches` shuffles a cached selection by (it does not depend on the images), computed
  on the positions alone."""
  order = _shuffle(tf.data.Dataset.range(num_examples), num_examples, _epoch_seed(seed, epoch))
  # In batches: one position at a time took 5 s for stage A's 88,188 at paper size.
  return np.concatenate(list(order.batch(65536).as_numpy_iterator()))


def decode_pngs(ds: tf.data.Dataset, image_size: int) -> tf.data.Dataset:
  """{png, ...} -> {image, ...}: each stored PNG decoded and resized to the model's size as
  `select` does, in parallel, in order."""
  def decode(ex):
    out = {k: v for k, v in ex.items() if k != "png"}
    out["image"] = to_model_size(tf.io.decode_png(ex["png"], 1), image_size)
    return out
  return ds.map(graph_fn(decode), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class Stream:
  """A selection too large for every process to cache (above the memory budget,
  `config.cache_budget_mb`). Each process reads only the records of its share, by index
  (records.reader), and decodes them as its batches need them. Training: every epoch, its
  share of that epoch's batches, in order, as tf.data asks for them. Evaluation (a
  validation set): its share, once, kept. Batches are exactly `train_batches`' and
  `eval_batches`' on the cached selection with the same seed, epoch and process: the same
  dataset positions in the same order. Every record read is checked to hold the image the
  metadata names. `transform` (ds -> ds, keyed by `index`) is applied to the decoded images,
  as `Cohort.dataset` applies the audit's input op."""

  def __init__(self, builders, builder_index, image_ids, labels, positions, records,
               image_size: int, transform=None, split: str = "train"):
    builder_index = np.asarray(builder_index)
    self.builders, self.image_size, self.transform, self.split = (builders, image_size,
                                                                  transform, split)
    self.builder_index, self.image_ids = builder_index, np.asarray(image_ids)
    self.labels = np.asarray(labels, np.int32)
    self.records = np.asarray(records, np.int64)  # each image's index in its builder's records
    # Selection index at each dataset position, in `select`'s order (builder, then file).
    self.at_position = np.lexsort((np.asarray(positions), builder_index))
    self.decoded = 0  # images decoded by the last epoch or evaluation share (this process's)
    self._eval_share = None  # ((process, count), the decoded share)
    self._readers = {}  # builder index -> its records.reader, opened at the first read

  def __len__(self) -> int:
    return len(self.image_ids)

  def train_batches(self, num_examples: int, global_batch: int, seed: int, epoch: int,
                    augment_ops=(), process_index: int = 0, process_count: int = 1,
                    start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    steps = num_examples // global_batch
    local_batch = global_batch // process_count
    order = epoch_order(num_examples, seed, epoch)
    mine = self.at_position[order[process_index::process_count]]
    mine = mine[start * local_batch:steps * local_batch]  # this process's examples, in order
    return _augmented_batches(self._images(mine), local_batch, steps - start,
                              _epoch_seed(seed, epoch), augment_ops)

  def eval_batches(self, num_examples: int, global_batch: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, as `eval_batches` yields it from the cached selection: this
    process's positions (`shard`'s), decoded on the first call and kept."""
    if self._eval_share is None or self._eval_share[0] != (process_index, process_count):
      self._eval_share = None  # (the old share's memory goes before the new one is read)
      self._eval_share = ((process_index, process_count),
                          self._share(self.at_position[process_index::process_count]))
    return _padded_batches(self._eval_share[1], global_batch // process_count,
                           math.ceil(num_examples / global_batch))

  def _share(self, rows: np.ndarray) -> tf.data.Dataset:
    """Images `rows` (selection indices) decoded into memory, as {image, label, index} in
    that order."""
    images = np.zeros((len(rows), self.image_size, self.image_size, 1), np.uint8)
    done = 0
    for batch in self._images(rows).batch(256).as_numpy_iterator():
      images[done:done + len(batch["image"])] = batch["image"]
      done += len(batch["image"])
    labels, index = self.labels[rows], rows.astype(np.int32)
    # A generator over the arrays: from_tensor_slices would hold a second copy of the share.
    return tf.data.Dataset.from_generator(
        lambda: ({"image": images[k], "label": labels[k], "index": index[k]}
                 for k in range(len(rows))),
        output_signature={"image": tf.TensorSpec(images.shape[1:], tf.uint8),
                          "label": tf.TensorSpec((), tf.int32),
                          "index": tf.TensorSpec((), tf.int32)})

  def _images(self, rows: np.ndarray) -> tf.data.Dataset:
    """Images `rows` (selection indices) as {image, label, index} in that order (`transform`
    applied): each record read by index as tf.data asks for it, then decoded and resized as
    `select` does, in parallel (so tf.data's buffers bound what is read ahead)."""
    labels, index = self.labels[rows], rows.astype(np.int32)

    def generate():
      self.decoded = 0
      for k, row in enumerate(rows):
        png = self._png(row)
        self.decoded += 1
        yield {"png": png, "label": labels[k], "index": index[k]}

    ds = tf.data.Dataset.from_generator(
        generate, output_signature={"png": tf.TensorSpec((), tf.string),
                                    "label": tf.TensorSpec((), tf.int32),
                                    "index": tf.TensorSpec((), tf.int32)})
    ds = decode_pngs(ds, self.image_size)
    return self.transform(ds) if self.transform else ds

  def _png(self, row: int) -> bytes:
    """The stored PNG of selection index `row`, read by record index and checked to be the
    image the metadata names."""
    b, record = int(self.builder_index[row]), int(self.records[row])
    if b not in self._readers:
      self._readers[b] = records.reader(self.builders[b], self.split)
    feature = tf.train.Example.FromString(self._readers[b][record]).features.feature
    found = feature["image_id"].bytes_list.value[0].decode()
    if found != str(self.image_ids[row]):
      raise ValueError(
          f"{self.builders[b].data_dir}: record {record} holds image {found!r} where the "
          f"metadata puts {self.image_ids[row]!r}: its array_record copy ({records.SUFFIX}* "
          "files) does not match its tfrecord build; delete those files and load the data "
          "again (any run) to write them again")
    return feature["image"].bytes_list.value[0]


def configure_tensorflow(jax_backend: str) -> None:
  """Keeps TensorFlow (tf.data, image decoding) out of JAX's way; call before any TF op.

  TF never takes a GPU. When JAX computes on the CPU, TF's intra- and inter-op thread pools
  (tf.data's parallel map runs on them) get one thread each, so the input pipeline does not
  take cores from XLA's step (with TF's default pools the demo trained at half the speed on a
  2-core CPU; docs/performance.md).
  """
  tf.config.set_visible_devices([], "GPU")
  if jax_backend == "cpu":
    try:
      tf.config.threading.set_intra_op_parallelism_threads(1)
      tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already ran (an in-process caller, e.g. tests): keep its pools
      pass


def eval_batches(ds: tf.data.Dataset, num_examples: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, padded to full batches with mask = 0.

  Every process yields the same number of batches (some may be all padding).
  """
  return _padded_batches(ds.shard(process_count, process_index), global_batch // process_count,
                         math.ceil(num_examples / global_batch))


def _padded_batches(ds: tf.data.Dataset, local_batch: int, num_batches: int
                    ) -> Iterator[dict[str, np.ndarray]]:
  """This process's examples `ds` -> `num_batches` normalised batches of `local_batch`,
  padded with mask = 0."""
  ds = ds.map(graph_fn(lambda ex: {**ex, "image": normalise(ex["image"])}),
              num_parallel_calls=tf.data.AUTOTUNE).batch(local_batch).prefetch(2)
  it = ds.as_numpy_iterator()
  for _ in range(num_batches):
    batch = next(it, None)
    if batch is None:  # this process ran out (or had nothing): an all-padding batch
      batch = {k: np.zeros((0,) + tuple(s.shape[1:]), s.dtype.as_numpy_dtype)
               for k, s in ds.element_spec.items()}
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
    ds = _examples(builder, split).filter(graph_fn(lambda ex: table.lookup(ex["image_id"]) > 0))
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

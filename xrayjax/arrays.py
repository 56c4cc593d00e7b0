"""Batches from in-memory arrays, without TensorFlow: what `train.train_stage` and
`infer.predict` take in place of a tf.data dataset where TensorFlow is not installed
(accelerator images ship jax, flax, optax and orbax, not TensorFlow) or where images come from
another loader (grain, your own).

Anything with the two methods below feeds the JAX core: `train_batches` (one epoch of full,
shuffled global batches, this process's share of each) and `eval_batches` (every example once,
padded to full batches with `mask` = 0). `Cohort.dataset`'s tf.data datasets go through
`data/pipeline.py` instead, which also augments.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class ArrayData:
  """uint8 grey images [n, s, s, 1] and integer labels [n], in memory.

  Epoch order is a permutation keyed by (seed, epoch), the same in every process; each
  process takes its slice of every global batch (their union is the batch). No
  augmentation: a stage with augmentation ops is refused (augment in your loader, or use
  tf.data through `Cohort.dataset`).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1:
      raise ValueError(f"ArrayData needs uint8 images [n, s, s, 1]; got {images.dtype} "
                       f"{images.shape}")
    if len(labels) != len(images):
      raise ValueError(f"ArrayData: {len(images)} images but {len(labels)} labels")
    self.images, self.labels = images, labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.images)

  def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": self.images[rows].astype(np.float32) / 127.5 - 1.0,
            "label": self.labels[rows], "index": rows.astype(np.int32)}

  def train_batches(self, num_examples: int, global_batch: int, seed: int, epoch: int,
                    augment_ops=(), process_index: int = 0, process_count: int = 1,
                    start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Full global batches of epoch `epoch` from batch `start` on; this process's rows."""
    if augment_ops:
      raise ValueError(f"ArrayData does not augment (the stage asks for {tuple(augment_ops)}):"
                       " augment in your loader, or feed tf.data through Cohort.dataset")
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    local = global_batch // process_count
    for b in range(start, num_examples // global_batch):
      rows = order[b * global_batch:(b + 1) * global_batch]
      batch = self._batch(rows[process_index * local:(process_index + 1) * local])
      yield {"image": batch["image"], "label": batch["label"]}

  def eval_batches(self, num_examples: int, global_batch: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in padded batches (`mask` 0 on padding); every process
    yields the same number of batches."""
    local = global_batch // process_count
    for start in range(0, num_examples, global_batch):
      rows = np.arange(start, min(start + global_batch, num_examples))
      mine = rows[process_index * local:(process_index + 1) * local]
      batch, pad = self._batch(mine), local - len(mine)
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
      batch["mask"] = np.concatenate([np.ones(len(mine), np.float32),
                                      np.zeros(pad, np.float32)])
      yield batch

import ml_collections
import numpy as np
import tensorflow as tf

from xrayjax.data import pipeline


def _ds(n, size=16):
  images = (np.arange(n)[:, None, None, None] * np.ones((1, size, size, 1))).astype(np.uint8)
  return tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": np.arange(n, dtype=np.int32) % 3,
       "index": np.arange(n, dtype=np.int32)})


AUG = ml_collections.ConfigDict(dict(enabled=True, rotation_deg=10.0, scale=0.1, mirror=True))


def test_eval_batches_pad_and_mask_every_example_once():
  n, batch = 23, 8
  seen = []
  batches = list(pipeline.eval_batches(_ds(n), n, batch))
  assert len(batches) == 3 and all(len(b["label"]) == batch for b in batches)
  for b in batches:
    seen.extend(b["index"][b["mask"] > 0].tolist())
  assert sorted(seen) == list(range(n))
  assert batches[-1]["mask"].sum() == n - 2 * batch


def test_eval_batches_split_over_processes():
  n, batch = 21, 8
  seen = []
  for p in range(2):
    batches = list(pipeline.eval_batches(_ds(n), n, batch, process_index=p, process_count=2))
    assert len(batches) == 3 and all(len(b["label"]) == batch // 2 for b in batches)
    for b in batches:
      seen.extend(b["index"][b["mask"] > 0].tolist())
  assert sorted(seen) == list(range(n))


def test_train_epochs_are_deterministic_and_differ_between_epochs():
  ds = _ds(40, 24)
  e0 = list(pipeline.train_batches(ds, 40, 8, seed=3, epoch=0, augment_config=AUG))
  again = list(pipeline.train_batches(ds, 40, 8, seed=3, epoch=0, augment_config=AUG))
  e1 = list(pipeline.train_batches(ds, 40, 8, seed=3, epoch=1, augment_config=AUG))
  assert len(e0) == 5
  for a, b in zip(e0, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  order0 = np.concatenate([b["label"] for b in e0])
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(e0, e1))
  assert sorted(order0.tolist()) == sorted((np.arange(40) % 3).tolist())


def test_augment_rotates_scales_and_mirrors():
  image = np.full((32, 32, 1), -1.0, np.float32)
  image[:, :8] = 1.0  # a bright band on the left
  image = tf.constant(image)
  flipped = pipeline.augment(image, tf.constant([0, 0], tf.int64), 0.0, 0.0, True)
  outs = [pipeline.augment(image, tf.constant([s, 1], tf.int64), 0.0, 0.0, True).numpy()
          for s in range(8)]
  lefts = {bool(o[:, :8].mean() > 0) for o in outs}
  assert lefts == {True, False}  # some mirrored, some not
  identity = pipeline.augment(image, tf.constant([5, 5], tf.int64), 0.0, 0.0, False).numpy()
  np.testing.assert_allclose(identity, image.numpy(), atol=1e-5)
  rotated = pipeline.augment(image, tf.constant([1, 2], tf.int64), 20.0, 0.0, False).numpy()
  assert np.abs(rotated - image.numpy()).max() > 0.5
  assert flipped.shape == image.shape


def test_batch_larger_than_split_is_a_clear_error():
  import pytest
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.steps_per_epoch(5, 8)

import math

import pytest
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context

from xrayjax import train
from xrayjax.data import pipeline


def _ds(n, size=16):
  images = (np.arange(n)[:, None, None, None] * np.ones((1, size, size, 1))).astype(np.uint8)
  return tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": np.arange(n, dtype=np.int32) % 3,
       "index": np.arange(n, dtype=np.int32)})


AUG = ("rotate(10)", "zoom(0.1)", "flip_lr")


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
  e0 = list(pipeline.train_batches(ds, 40, 8, seed=3, epoch=0, augment_ops=AUG))
  again = list(pipeline.train_batches(ds, 40, 8, seed=3, epoch=0, augment_ops=AUG))
  e1 = list(pipeline.train_batches(ds, 40, 8, seed=3, epoch=1, augment_ops=AUG))
  assert len(e0) == 5
  for a, b in zip(e0, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  order0 = np.concatenate([b["label"] for b in e0])
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(e0, e1))
  assert sorted(order0.tolist()) == sorted((np.arange(40) % 3).tolist())


def test_the_epoch_order_ignores_tensorflows_global_seed():
  # A caller's tf.random.set_seed (a notebook; Keras's set_random_seed in another test of this
  # process) must not reorder a run's epochs: the order is Dataset.shuffle's without one.
  ds = _ds(40)
  first_pixels = lambda batches: np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  ours = lambda: first_pixels(pipeline.train_batches(ds, 40, 8, seed=3, epoch=0))
  tfs = lambda: first_pixels(
      ds.shuffle(40, seed=pipeline._epoch_seed(3, 0), reshuffle_each_iteration=False)
      .map(lambda ex: {"image": pipeline.normalise(ex["image"])}).batch(8).as_numpy_iterator())
  previous = context.global_seed()
  try:
    tf.random.set_seed(None)
    expected = tfs()
    np.testing.assert_array_equal(ours(), expected)
    tf.random.set_seed(7)
    assert not np.array_equal(tfs(), expected)  # what Dataset.shuffle alone would do
    np.testing.assert_array_equal(ours(), expected)
  finally:
    tf.random.set_seed(previous)


def _aug(image, seed, *ops):
  return pipeline.augment(image, tf.constant(seed, tf.int64), pipeline.parse_ops(ops)).numpy()


def test_augment_rotates_scales_and_mirrors():
  image = np.full((32, 32, 1), -1.0, np.float32)
  image[:, :8] = 1.0  # a bright band on the left
  image = tf.constant(image)
  outs = [_aug(image, [s, 1], "flip_lr") for s in range(8)]
  lefts = {bool(o[:, :8].mean() > 0) for o in outs}
  assert lefts == {True, False}  # some mirrored, some not
  ups = [_aug(tf.transpose(image, (1, 0, 2)), [s, 1], "flip_ud") for s in range(8)]
  assert {bool(o[:8].mean() > 0) for o in ups} == {True, False}
  np.testing.assert_allclose(_aug(image, [5, 5]), image.numpy(), atol=1e-5)  # no ops
  np.testing.assert_allclose(_aug(image, [5, 5], "rotate(0)", "shift(0)", "shear(0)",
                                  "zoom_xy(0)"), image.numpy(), atol=1e-5)
  for op in ("rotate(20)", "zoom(0.3)", "zoom_xy(0.3)", "shift(0.2)", "shear(20)"):
    assert np.abs(_aug(image, [1, 2], op) - image.numpy()).max() > 0.5, op


def test_detl_augmentation_is_the_rotation_zoom_mirror_it_always_was():
  """The op list ("rotate(10)", "zoom(0.1)", "flip_lr") reproduces, bit for bit, the closed
  form DETL's published demo figures were made with."""
  rng = np.random.default_rng(0)
  image = tf.constant(rng.uniform(-1, 1, (24, 24, 1)).astype(np.float32))
  for s in range(6):
    seed = tf.constant([s, 7], tf.int64)
    s_rot, s_zoom, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    angle = tf.random.stateless_uniform([], s_rot, -10.0, 10.0) * math.pi / 180
    zoom = tf.random.stateless_uniform([], s_zoom, 1 - 0.1, 1 + 0.1)
    flip = tf.random.stateless_uniform([], s_flip) < 0.5
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    sx = tf.where(flip, -1.0, 1.0)
    a0, a1, b0, b1 = cos * sx, -sin, sin * sx, cos
    c = (24 - 1) / 2
    t = tf.stack([a0, a1, c - a0 * c - a1 * c, b0, b1, c - b0 * c - b1 * c, 0.0, 0.0])[None]
    old = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=t, output_shape=[24, 24], fill_value=-1.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0].numpy()
    np.testing.assert_array_equal(_aug(image, [s, 7], *AUG), old)


@pytest.mark.parametrize("ops,message", [
    (("spin(3)",), "unknown augmentation op"), (("rotate",), "takes a number"),
    (("flip_lr(1)",), "takes no number"), (("zoom(x)",), "is not a number")])
def test_bad_augmentation_ops_say_what_is_valid(ops, message):
  with pytest.raises(ValueError, match=message):
    pipeline.parse_ops(ops)


def test_batch_larger_than_split_is_a_clear_error():
  import pytest
  with pytest.raises(ValueError, match="fewer than one batch"):
    train.steps_per_epoch(5, 8)


def test_a_process_without_examples_still_yields_padding_batches():
  seen = []
  for p in range(4):  # 3 examples over 4 processes: process 3 has none
    batches = list(pipeline.eval_batches(_ds(3), 3, 8, process_index=p, process_count=4))
    assert len(batches) == 1 and batches[0]["image"].shape == (2, 16, 16, 1)
    seen.extend(batches[0]["index"][batches[0]["mask"] > 0].tolist())
  assert sorted(seen) == [0, 1, 2]


def test_train_batches_split_an_epoch_over_processes():
  """Each of 2 processes yields half of every global batch; together they hold exactly the
  single-process epoch's images, batch by batch, with the same augmentation."""
  n, batch = 40, 8
  ds = _ds(n)
  whole = list(pipeline.train_batches(ds, n, batch, seed=3, epoch=1, augment_ops=AUG))
  parts = [list(pipeline.train_batches(ds, n, batch, seed=3, epoch=1, augment_ops=AUG,
                                       process_index=p, process_count=2)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole) == n // batch
  for step, full in enumerate(whole):
    halves = [parts[p][step] for p in range(2)]
    assert all(len(h["label"]) == batch // 2 for h in halves)
    # An image's index is its pixel value (_ds); augmentation is keyed by the index.
    mine = sorted(v for h in halves for v in h["image"][:, 8, 8, 0].round(3))
    assert mine == sorted(full["image"][:, 8, 8, 0].round(3))
  seen = [int(i) for h in parts for b in h for i in b["label"]]
  assert len(seen) == n


def test_per_process_stream_evaluates_every_image_once_from_its_own_share(tiny_config):
  """A validation partition above the memory budget: each process decodes only its share of
  the positions, once, and yields exactly the padded batches eval_batches gives it from the
  cached selection; together the processes score every image once."""
  from xrayjax import experiment
  cohort, plan = experiment.prepare(tiny_config)
  stage = plan.stages[0]
  rows = stage.val
  n, batch = len(rows), 6
  cached, _ = cohort.partition_data(rows, stage.labels, 32, budget_mb=1)
  stream, _ = cohort.partition_data(rows, stage.labels, 32, budget_mb=0)
  assert isinstance(stream, pipeline.Stream) and n > 2 * batch
  seen = []
  for count in (1, 2, 3):
    for p in range(count):
      want = list(pipeline.eval_batches(cached, n, batch, p, count))
      got = list(stream.eval_batches(n, batch, p, count))
      assert stream.decoded == len(range(p, n, count))  # its share, nothing more
      assert len(got) == len(want) == -(-n // batch)
      for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
          np.testing.assert_array_equal(a[k], b[k])
      if count == 3:
        seen += [int(i) for b in got for i in b["index"][b["mask"] > 0]]
  assert sorted(seen) == list(range(n))
  shares = []
  stream._share = lambda rows, share=stream._share: shares.append(rows) or share(rows)
  list(stream.eval_batches(n, batch, 2, 3))  # the same share again: kept, not decoded again
  assert shares == []


@pytest.mark.parametrize("audit_input", ["full", "lungs"])
def test_per_process_stream_decodes_only_its_share_and_yields_the_cached_batches(
    tiny_config, audit_input):
  """A training partition above the memory budget is streamed (pipeline.Stream): each process
  decodes only the images of its share of the epoch, and its batches are exactly those of the
  cached selection (same seed, epoch, process, resume point), with the audit's input op too;
  the processes' batches together are the one-process batch."""
  from xrayjax import experiment
  tiny_config.audit.input = audit_input
  cohort, plan = experiment.prepare(tiny_config)
  stage = plan.stages[0]
  rows = stage.phases[0].train
  n, batch, ops = len(rows), 8, ("rotate(10)", "flip_lr")
  cached, how = cohort.partition_data(rows, stage.labels, 32, budget_mb=1)
  assert not isinstance(cached, pipeline.Stream) and "cached in memory" in how
  stream, how = cohort.partition_data(rows, stage.labels, 32, budget_mb=0)
  assert isinstance(stream, pipeline.Stream) and "each process decodes only its share" in how
  steps = n // batch

  def epoch(ds, p, count, start=0):
    kw = dict(augment_ops=ops, process_index=p, process_count=count, start=start)
    if isinstance(ds, pipeline.Stream):
      return list(ds.train_batches(n, batch, 5, 2, **kw))
    return list(pipeline.train_batches(ds, n, batch, 5, 2, **kw))

  one = epoch(cached, 0, 1)
  assert len(one) == steps
  for count, start in ((1, 0), (2, 0), (2, 1)):
    for p in range(count):
      want, got = epoch(cached, p, count, start), epoch(stream, p, count, start)
      assert stream.decoded == (steps - start) * batch // count  # its share, nothing more
      assert len(got) == len(want) == steps - start
      for a, b in zip(want, got):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
  halves = [epoch(stream, p, 2) for p in range(2)]
  for s in range(steps):  # together, the one-process batch (as a set of images)
    both = np.concatenate([halves[0][s]["image"], halves[1][s]["image"]])
    assert sorted(map(bytes, both)) == sorted(map(bytes, one[s]["image"]))


def test_a_builders_split_is_opened_once_for_every_selection_and_its_masks(tiny_config,
                                                                            monkeypatch):
  """TFDS builds a reading pipeline on every `as_dataset`: a cohort's selections and masks of
  one builder's split filter one (pipeline._examples), and each still yields just its images."""
  from xrayjax import experiment
  cohort, plan = experiment.prepare(tiny_config)
  builder, stage = cohort.builders[0], plan.stages[0]
  opened = []
  as_dataset = type(builder).as_dataset
  monkeypatch.setattr(type(builder), "as_dataset",
                      lambda self, **kw: opened.append(kw["split"]) or as_dataset(self, **kw))
  for rows in (stage.phases[0].train, stage.val):
    ds = cohort.dataset(rows, stage.labels, 32)
    assert sorted(int(ex["index"]) for ex in ds.as_numpy_iterator()) == list(range(len(rows)))
    assert len(cohort.masks(rows, 32)["lesion"]) == len(rows)
  assert opened == ["train"]

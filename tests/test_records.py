"""Reads by record index (data/records.py, pipeline.Stream) on a build in several shards."""

import os
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from array_record.python import array_record_module

from xrayjax.data import pipeline, records
from xrayjax.data.sources import synthetic_cxr


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
  """A tiny synthetic build forced into 4 shards (TFDS's reader interleaves them), with its
  array_record copy, and its metadata."""
  cfg = synthetic_cxr.make_config(32, (14, 7, 14, 7), seed=4)
  b = synthetic_cxr.SyntheticCxr(config=cfg, data_dir=str(tmp_path_factory.mktemp("tfds4")))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
  records.convert(b)
  return b, pipeline.read_metadata(b)


def _stream(b, meta, size=24, **kw):
  n = len(meta["image_id"])
  return pipeline.Stream([b], np.zeros(n, int), meta["image_id"], np.arange(n) % 3,
                         meta["position"], meta["record"], size, **kw)


def _ids(b, rows_records):
  reader, skip = records.reader(b), pipeline._skip_images(b)
  return [b.info.features.deserialize_example_np(reader[int(r)], decoders=skip)["image_id"]
          .decode() for r in rows_records]


def test_per_process_stream_record_index_is_not_the_position_in_a_build_of_four_shards(
    four_shards):
  """`record` (the index Stream reads by) holds each image in a build of 4 shards, where the
  dataset position (as_dataset's interleaved order) does not."""
  b, meta = four_shards
  assert len(b.info.splits["train"].shard_lengths) == 4
  assert sorted(meta["record"]) == list(range(len(meta["image_id"])))
  assert not np.array_equal(meta["record"], meta["position"])
  assert _ids(b, meta["record"]) == list(meta["image_id"])
  assert _ids(b, meta["position"]) != list(meta["image_id"])


def test_per_process_stream_of_four_shards_yields_the_cached_batches(four_shards):
  """Training and evaluation batches read by record index equal the cached selection's
  (`select` reads the interleaved files) for each of 2 processes."""
  b, meta = four_shards
  n, batch, ops = len(meta["image_id"]), 6, ("rotate(10)", "flip_lr")
  labels = np.arange(n) % 3
  cached = pipeline.select([b], np.zeros(n, int), meta["image_id"], labels, 24)
  stream = _stream(b, meta)
  for p in range(2):
    want = pipeline.train_batches(cached, n, batch, 1, 3, ops, p, 2, start=1)
    got = list(stream.train_batches(n, batch, 1, 3, ops, p, 2, start=1))
    assert len(got) == n // batch - 1 and stream.decoded == len(got) * batch // 2
    for a, g in zip(want, got):
      np.testing.assert_array_equal(a["image"], g["image"])
      np.testing.assert_array_equal(a["label"], g["label"])
    for a, g in zip(pipeline.eval_batches(cached, n, batch, p, 2),
                    stream.eval_batches(n, batch, p, 2)):
      assert a.keys() == g.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], g[k])


def test_per_process_stream_first_batch_decodes_only_its_images_and_a_bounded_read_ahead(
    four_shards):
  """The first batch of an epoch needs its own images and a bounded read-ahead, not the
  process's share: records read are counted, at the first batch and at the end."""
  b, meta = four_shards
  n, batch = len(meta["image_id"]), 2
  stream = _stream(b, meta)
  batches = stream.train_batches(n, batch, 0, 0)
  next(batches)
  time.sleep(0.5)  # tf.data's prefetch fills meanwhile: the read-ahead at rest
  # The batch, tf.data's prefetch of 2 more and its parallel maps' buffers, whose sizes
  # tf.data's autotuner sets (14 images past the batch in one run on 2 cores): well short of
  # the 42-image share, which a stream decoding its share up front would have read.
  first = stream.decoded
  assert batch <= first < n // 2
  assert 1 + sum(1 for _ in batches) == n // batch and stream.decoded == n // batch * batch


def test_a_copy_that_does_not_match_the_build_is_refused_then_written_again(four_shards,
                                                                            tmp_path):
  """An array_record copy with the wrong record count is refused and written again at the
  next conversion (also over a killed conversion's leftover); one with the right count but
  other images (two shards swapped) stops the stream, naming the files to delete."""
  b0, meta = four_shards
  data_dir = str(tmp_path / "copy")
  shutil.copytree(os.path.dirname(os.path.dirname(os.path.dirname(b0.data_dir))), data_dir)
  b = synthetic_cxr.SyntheticCxr(config=b0.builder_config, data_dir=data_dir)
  parts = records.shards(b)
  assert [n for _, _, n in parts][:2] == [parts[0][2]] * 2  # shards 0 and 1: equal lengths
  writer = array_record_module.ArrayRecordWriter(parts[3][1], "group_size:1")
  writer.write(b"one record")  # shard 3's copy: a count off
  writer.close()
  with open(parts[2][1] + ".incomplete", "wb") as f:  # a killed conversion's leftover
    f.write(b"partial")
  os.remove(parts[2][1])
  with pytest.raises(ValueError, match=r"incomplete or out of date.*\n.*array_record-00002-"
                     r"of-00004: missing, \d+ in .*tfrecord-00002-of-00004\n.*array_record-"
                     r"00003-of-00004: 1 records, \d+ in .*tfrecord-00003-of-00004$"):
    records.reader(b)
  records.convert(b)
  assert not os.path.exists(parts[2][1] + ".incomplete")
  assert _ids(b, meta["record"]) == list(meta["image_id"])

  tmp = parts[0][1] + ".swap"
  os.replace(parts[0][1], tmp)
  os.replace(parts[1][1], parts[0][1])
  os.replace(tmp, parts[1][1])
  records.convert(b)  # the counts match: it cannot tell
  n = len(meta["image_id"])
  with pytest.raises(tf.errors.OpError, match=r"record \d+ holds image .* where the metadata "
                     r"puts .*array_record-\* files\) does not match"):
    list(_stream(b, meta).train_batches(n, 4, 0, 0))

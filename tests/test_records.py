"""Reads by record index (data/records.py) on a build in several shards."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

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

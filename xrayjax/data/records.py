"""A build's records by index: array_record shards beside its tfrecord shards.

tf.data reads a TFDS build's tfrecord shards (TFDS 4.9.10's `as_dataset` cannot read
array_record), and `pipeline.Stream` reads single records by index from array_record copies
of the same shards: record k is the k-th record of the shards taken in order. The copies
double the build's disk use (docs/scaling-out.md).

`convert` writes them (TFDS's own converter needs apache_beam); `sources.builder` calls it
after every build and at the first load of a build made before them. `read_metadata`'s
`record` column (`record_of`) says where each image is.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
from absl import logging
from array_record.python import array_record_data_source, array_record_module

SUFFIX = ".array_record-"  # in place of the tfrecord shard's ".tfrecord-"


def shards(builder, split: str = "train") -> list[tuple[str, str, int]]:
  """(tfrecord path, array_record path, records) of each of the split's shards, in order."""
  out = []
  for fi in builder.info.splits[split].file_instructions:
    path = fi.filename if os.path.isabs(fi.filename) else os.path.join(builder.data_dir,
                                                                       fi.filename)
    if ".tfrecord-" not in path:
      raise ValueError(f"{path}: not a tfrecord shard; xrayjax builds tfrecord files")
    out.append((path, path.replace(".tfrecord-", SUFFIX), fi.examples_in_shard))
  return out


def _count(path: str) -> int:
  """Records in the array_record file at `path` (-1: none there, or unreadable)."""
  if not os.path.exists(path):
    return -1
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      return reader.num_records()
    finally:
      reader.close()
  except Exception as e:  # pylint: disable=broad-except  (a damaged copy: written again)
    logging.warning("%s is unreadable (%s): writing it again", path, e)
    return -1


def convert(builder) -> None:
  """Writes the array_record copy of every shard of `builder` that lacks a complete one.

  A shard is complete when its copy holds as many records as the tfrecord shard; an
  incomplete or missing copy is written again, to a temporary name renamed into place when
  done (a killed conversion leaves no file that looks complete). Call it where the build
  itself runs (one process per file system, inside the build barrier): two processes
  writing one copy would collide.
  """
  start, written = time.time(), 0
  for split in builder.info.splits:
    for source, target, records in shards(builder, split):
      if _count(target) == records:
        continue
      tmp = target + ".incomplete"
      writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
      for record in tf.data.TFRecordDataset(source).as_numpy_iterator():
        writer.write(record)
        written += 1
      writer.close()
      if _count(tmp) != records:
        raise ValueError(f"{source}: read {_count(tmp)} records, its build lists {records}; "
                         "the build is damaged: delete its directory to build it again")
      os.replace(tmp, target)
  if written:
    logging.info("Wrote array_record copies of %d records of %s in %.1f s", written,
                 builder.data_dir, time.time() - start)


def reader(builder, split: str = "train") -> array_record_data_source.ArrayRecordDataSource:
  """The split's records by index (raw serialized examples), after checking every shard's
  copy is complete."""
  parts = shards(builder, split)
  bad = [f"{target}: {'missing' if found < 0 else f'{found} records'}, {records} in "
         f"{os.path.basename(source)}" for source, target, records in parts
         if (found := _count(target)) != records]
  if bad:
    raise ValueError("the array_record copy of the build is incomplete or out of date (loading "
                     "the data, sources.builder, e.g. any run, writes it again):\n  " +
                     "\n  ".join(bad))
  return array_record_data_source.ArrayRecordDataSource([target for _, target, _ in parts])


def record_of(builder, tfds_ids: np.ndarray, split: str = "train") -> np.ndarray:
  """Each example's record index from its `tfds_id` ("<shard file>__<index in shard>",
  `tfds.ReadConfig(add_tfds_id=True)`): not its place in `as_dataset`'s order, which
  interleaves the shards."""
  parts = shards(builder, split)
  offset = dict(zip((os.path.basename(s) for s, _, _ in parts),
                    np.cumsum([0] + [n for _, _, n in parts[:-1]])))
  out = np.empty(len(tfds_ids), np.int64)
  for k, tfds_id in enumerate(tfds_ids):
    shard, _, index = tfds_id.rpartition("__")
    out[k] = offset[os.path.basename(shard)] + int(index)
  return out

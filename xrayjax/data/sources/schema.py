"""The example schema every source shares (DESIGN.md's data contract)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from xrayjax.data import tasks


def features(image_size: int, **extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """image, label fields, ids, source, view, duplicate-detection hashes, plus a source's extras.

  `label` is the source's own label (e.g. NIH's "Atelectasis|Effusion", ieee8023's
  "Pneumonia/Viral/COVID-19"); `findings` the same in the common vocabulary
  (tasks.FINDINGS); data/tasks.py maps both to a task's classes. `file_sha1` is the SHA-1 of
  the image file's bytes and `phash` a 256-bit perceptual hash of the decoded image (hex).
  """
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(image_size, image_size, 1)),
      "label": tfds.features.Text(),
      "findings": tfds.features.Tensor(shape=(len(tasks.FINDINGS),), dtype=np.bool_),
      "patient_id": tfds.features.Text(),
      "image_id": tfds.features.Text(),
      "source": tfds.features.Text(),
      "site": tfds.features.Text(),
      "view": tfds.features.Text(),
      "file_sha1": tfds.features.Text(),
      "phash": tfds.features.Text(),
      **extra,
  })


def dataset_info(builder: tfds.core.DatasetBuilder, image_size: int, description: str,
                 **extra: tfds.features.FeatureConnector) -> tfds.core.DatasetInfo:
  """A builder's DatasetInfo: `features(image_size, **extra)`, and no lookup on TFDS's bucket.
  Ours are never there, and TFDS's lookup (`DatasetInfo.initialize_from_bucket`, run for every
  builder of data not yet built) leaves an empty temporary directory behind each time."""
  info = builder.dataset_info_from_configs(features=features(image_size, **extra),
                                           description=description)
  info.initialize_from_bucket = lambda: None
  return info

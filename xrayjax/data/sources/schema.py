"""The example schema every source shares (DESIGN.md's data contract)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from xrayjax.data import tasks


def features(image_size: int, **extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """image, label, findings, patient_id, image_id, source, site, view, plus what a source adds."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(image_size, image_size, 1)),
      "label": tfds.features.Text(),
      "findings": tfds.features.Tensor(shape=(len(tasks.FINDINGS),), dtype=np.bool_),
      "patient_id": tfds.features.Text(),
      "image_id": tfds.features.Text(),
      "source": tfds.features.Text(),
      "site": tfds.features.Text(),
      "view": tfds.features.Text(),
      **extra,
  })

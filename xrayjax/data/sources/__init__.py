"""Data sources: one TFDS builder per source, looked up by the config's `data.source`."""

from __future__ import annotations

import time

import tensorflow_datasets as tfds
from absl import logging

from xrayjax.data.sources import synthetic_cxr

SOURCES = ("synthetic",)


def builder(data_config) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder for `data_config` (building it on first use)."""
  if data_config.source != "synthetic":
    raise ValueError(f"unknown data source {data_config.source!r}; valid sources: {SOURCES}")
  syn = data_config.synthetic
  cfg = synthetic_cxr.make_config(syn.image_size, tuple(syn.patients), syn.site_confounding,
                                  syn.seed)
  if cfg.name in synthetic_cxr.SyntheticCxr.builder_configs:  # TFDS wants the name here
    cfg = cfg.name
  b = synthetic_cxr.SyntheticCxr(config=cfg, data_dir=data_config.tfds_dir)
  if not b.is_prepared():
    start = time.time()
    logging.info("Generating %s into %s", b.info.full_name, b.data_dir)
    b.download_and_prepare()
    logging.info("Generated %s in %.1f s", b.info.full_name, time.time() - start)
  return b

"""Data sources: one TFDS builder per source, looked up by the config's `data.source`."""

from __future__ import annotations

import os
import time

import tensorflow_datasets as tfds
from absl import logging

from xrayjax import files
from xrayjax.data.sources import manifest, synthetic_cxr

SOURCES = ("synthetic", "manifest")
MANIFEST_ENV = "XRAYJAX_MANIFEST"
BUILD_REPORT = "build_report.json"


def _config(data_config):
  if data_config.source == "synthetic":
    syn = data_config.synthetic
    cfg = synthetic_cxr.make_config(syn.image_size, tuple(syn.patients), syn.site_confounding,
                                    syn.seed)
    return synthetic_cxr.SyntheticCxr, cfg
  if data_config.source == "manifest":
    m = data_config.manifest
    path = m.path or os.environ.get(MANIFEST_ENV)
    if not path:
      raise ValueError(f"data=manifest needs a CSV: pass --config.data.manifest.path=... or set "
                       f"${MANIFEST_ENV}")
    return manifest.Manifest, manifest.make_config(path, m.label_column, m.image_size)
  raise ValueError(f"unknown data source {data_config.source!r}; valid sources: {SOURCES}")


def builder(data_config) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder for `data_config` (building it on first use).

  A build that skipped inputs writes their reasons to `build_report.json` in its data dir.
  """
  cls, cfg = _config(data_config)
  if cfg.name in cls.builder_configs:  # TFDS wants a predefined config by name
    cfg = cfg.name
  b = cls(config=cfg, data_dir=data_config.tfds_dir)
  if not b.is_prepared():
    start = time.time()
    logging.info("Building %s into %s", b.info.full_name, b.data_dir)
    b.download_and_prepare()
    skipped = getattr(b, "skipped", [])
    report = {"built": b.info.splits["train"].num_examples, "skipped": len(skipped),
              "skipped_by_reason": _count_reasons(skipped), "skipped_rows": skipped}
    files.write_json(os.path.join(b.data_dir, BUILD_REPORT), report)
    logging.info("Built %s in %.1f s: %d examples, %d skipped %s", b.info.full_name,
                 time.time() - start, report["built"], report["skipped"],
                 report["skipped_by_reason"])
  return b


def build_report(b: tfds.core.DatasetBuilder) -> dict | None:
  path = os.path.join(b.data_dir, BUILD_REPORT)
  return files.read_json(path) if os.path.exists(path) else None


def _count_reasons(skipped: list[dict]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for row in skipped:
    kind = row["reason"].split(":")[0]
    counts[kind] = counts.get(kind, 0) + 1
  return counts

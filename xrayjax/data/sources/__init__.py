"""Data sources: one TFDS builder per source, looked up by the config's `data.source`.

`data.source` names one source or several, comma separated (a task can mix them, e.g.
`nih_cxr14,ieee8023_covid` for DETL's Data-B); each has its options in `data.<name>`.
Directories come from the config or from an environment variable ($XRAYJAX_MANIFEST for
the manifest CSV, $XRAYJAX_NIH_CXR14, $XRAYJAX_RSNA_PNEUMONIA, $XRAYJAX_IEEE8023_COVID,
$XRAYJAX_COVIDX for the directories). Nothing is downloaded.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from xrayjax import files, sharding
from xrayjax.data import records, tasks
from xrayjax.data.sources import (covidx, ieee8023_covid, manifest, native, nih_cxr14,
                                  rsna_pneumonia, synthetic_cxr)

SOURCES = ("synthetic", "manifest", "nih_cxr14", "rsna_pneumonia", "ieee8023_covid", "covidx")
MANIFEST_ENV = "XRAYJAX_MANIFEST"
BUILD_REPORT = "build_report.json"


def names(data_config) -> list[str]:
  out = [s.strip() for s in str(data_config.source).split(",") if s.strip()]
  unknown = [s for s in out if s not in SOURCES]
  if unknown or not out:
    raise ValueError(f"unknown data source(s) {unknown or data_config.source!r}; valid sources: "
                     f"{SOURCES} (several may be given, comma separated)")
  return out


def _config(name: str, data_config):
  if name == "synthetic":
    syn = data_config.synthetic
    cfg = synthetic_cxr.make_config(syn.image_size, tuple(syn.patients), syn.site_confounding,
                                    syn.seed)
    return synthetic_cxr.SyntheticCxr, cfg
  if name == "manifest":
    m = data_config.manifest
    env = m.get("path_env", MANIFEST_ENV)
    path = m.path or os.environ.get(env)
    if not path:
      raise ValueError(f"data=manifest needs a CSV: pass --config.<data>.manifest.path=... or "
                       f"set ${env}")
    return manifest.Manifest, manifest.make_config(path, m.label_column, m.image_size)
  opts = data_config[name]
  root = opts.root or os.environ.get(native.env_var(name), "")
  if name == "nih_cxr14":
    return nih_cxr14.NihCxr14, nih_cxr14.make_config(root, opts.image_size)
  if name == "rsna_pneumonia":
    return rsna_pneumonia.RsnaPneumonia, rsna_pneumonia.make_config(root, opts.image_size)
  if name == "ieee8023_covid":
    return ieee8023_covid.Ieee8023Covid, ieee8023_covid.make_config(root, opts.image_size,
                                                                    opts.frontal_only)
  return covidx.Covidx, covidx.make_config(root, opts.image_size, opts.label_files)


def builder(data_config, name: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder of source `name` (default: the only one), building it first.

  A build writes what it built, every skipped input with its metadata line and reason, how
  many images of each odd mode (16-bit, RGBA, palette, CMYK, 1-bit, DICOM) were converted to
  8-bit grey, and per task the rows whose label it leaves out and the skipped rows of each
  class (native.NativeBuilder, tasks.where_rows_went) to `build_report.json` in its data
  dir, and logs a summary (the first skipped rows; per task the labels left out). Beside the
  build's tfrecord files it writes their array_record copy (records.convert), which
  pipeline.Stream reads by index.
  """
  name = name or _only(data_config)
  cls, cfg = _config(name, data_config)
  if cfg.name in cls.builder_configs:  # TFDS wants a predefined config by name
    cfg = cfg.name
  # Multi-process jobs: a native source's images are decoded by every process at once (each
  # its share of the chunks, into the resume cache), then process 0 builds from the cache
  # while the others wait (concurrent builds into one tfds_dir collide when they rename their
  # output into place). On a shared file system they find it built; on host-local disks (one
  # process per host) each decodes and builds its own copy.
  first = jax.process_index() == 0
  if jax.process_count() > 1:
    b = cls(config=cfg, data_dir=data_config.tfds_dir)
    if isinstance(b, native.NativeBuilder) and not b.is_prepared():
      b.decode_share(jax.process_index(), jax.process_count())
    sharding.barrier(f"decode {name}")
  if not first:
    sharding.barrier(f"build {name}")
  b = cls(config=cfg, data_dir=data_config.tfds_dir)
  if not b.is_prepared():
    start = time.time()
    logging.info("Building %s into %s", b.info.full_name, b.data_dir)
    b.download_and_prepare()
    skipped = getattr(b, "skipped", [])
    report = {"source": name, "built": b.info.splits["train"].num_examples,
              "skipped": len(skipped), "skipped_by_reason": count_reasons(skipped),
              "converted_by_mode": getattr(b, "converted", {}), "skipped_rows": skipped,
              "listed_in": b.metadata_file() if isinstance(b, native.NativeBuilder) else "",
              "tasks": getattr(b, "tasks", {})}
    files.write_json(os.path.join(b.data_dir, BUILD_REPORT), report)
    native.remove_cache(b)
    logging.info("Built %s in %.1f s: %d examples, %d skipped %s", b.info.full_name,
                 time.time() - start, report["built"], report["skipped"],
                 report["skipped_by_reason"])
    for line in summary_lines(report):
      logging.info("%s: %s", name, line)
  # Every build gets its array_record copy (records.convert; builds made before it get theirs
  # at their first load), whether or not a partition will stream: that is decided later, per
  # partition (config.cache_budget_mb), and here is where the processes wait for one writer.
  records.convert(b)
  if first:
    sharding.barrier(f"build {name}")
  return b


def summary_lines(report: dict, limit: int = 5) -> list[str]:
  """Log lines of a build report: the first skipped rows with their lines and reasons, and
  per task the rows whose label it leaves out (per label, with their first lines)."""
  out = []
  rows = report.get("skipped_rows", [])
  listed = os.path.basename(report.get("listed_in", "")) or "metadata"
  for r in rows[:limit]:
    place = f"{listed} line {r['line']}" if isinstance(r.get("line"), int) else r.get("line")
    out.append(f"skipped {place or r.get('path')} ({r.get('path')}): {r['reason']}")
  if len(rows) > limit:
    out.append(f"... {len(rows) - limit} more skipped rows in {BUILD_REPORT}")
  for task in sorted(report.get("tasks", {})):
    text = tasks.not_in_task_text(report, task)
    if text:
      out.append(f"not in task {task}: {text}")
  return out


def stored_size(data_config) -> int:
  """The size images of `data_config`'s first source are built (stored) at."""
  name = names(data_config)[0]
  return int(data_config[name].image_size)


def _only(data_config) -> str:
  found = names(data_config)
  if len(found) != 1:
    raise ValueError(f"data.source names {len(found)} sources; name the one you want")
  return found[0]


def load(data_config) -> tuple[list[tfds.core.DatasetBuilder], dict[str, np.ndarray]]:
  """Every source's builder and their metadata, concatenated; `builder` indexes the list."""
  from xrayjax.data import pipeline
  builders, parts = [], []
  for k, name in enumerate(names(data_config)):
    b = builder(data_config, name)
    m = pipeline.read_metadata(b)
    m["builder"] = np.full(len(m["image_id"]), k, np.int32)
    builders.append(b)
    parts.append(m)
  meta = {k: np.concatenate([m[k] for m in parts]) for k in parts[0]}
  return builders, meta


def build_report(b: tfds.core.DatasetBuilder) -> dict | None:
  path = os.path.join(b.data_dir, BUILD_REPORT)
  return files.read_json(path) if os.path.exists(path) else None


def count_reasons(skipped: list[dict]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for row in skipped:
    kind = tasks.reason_kind(row["reason"])
    counts[kind] = counts.get(kind, 0) + 1
  return counts

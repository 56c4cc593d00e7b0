"""The cohort: a run's builders and its deduplicated metadata table, one row per image.

Everything downstream names images by cohort row: methods plan with row indices, the
runner asks the cohort for datasets and masks of rows. Nothing else pairs builder indices
with image ids.
"""

from __future__ import annotations

import os

import numpy as np

from xrayjax.data import pipeline, regions, sources, splits


class Metadata(dict):
  """The per-row metadata table (a dict of arrays, one entry per row), plus what a method
  needs to say where rows went when a class ends up empty (tasks.check_classes):

  - `builds`: per builder index, {"name", "report" (its build_report.json, or None),
    "file" (that report's path)};
  - `dropped`: the metadata of the rows duplicate detection dropped (same keys).
  """

  builds: list
  dropped: dict


class Cohort:
  """Builders + metadata (`meta[key][row]`: image_id, label, findings, patient_id, source,
  site, view, file_sha1, phash, builder, role, group).

  `input_op` (a data/regions.py op, from config.audit.input) is applied to every image the
  cohort hands out, with `geometry` (config.audit): the shortcut audit's masked inputs.
  """

  def __init__(self, builders: list, meta: dict[str, np.ndarray], names: list[str],
               duplicates: dict, audit=None):
    self.builders, self.meta, self.names, self.duplicates = builders, meta, names, duplicates
    self.input_op = regions.INPUTS[audit.input] if audit else None
    self.geometry = audit

  @classmethod
  def load(cls, data_config, extra: dict | None = None, max_distance: int = 0,
           drop_duplicates: bool = True, audit=None) -> Cohort:
    """Loads `data_config`'s sources and, tagged with their role, each of `extra`'s.

    `meta["role"]` is "" for rows of `data_config` and the role's name for the others.
    Duplicates are searched across all of them (splits.deduplicate); `meta["group"]` is
    the split group (patients joined by a duplicate) when `drop_duplicates` (the corrected
    protocol, which also drops the copies), else the patient id (the paper protocol only
    reports duplicates). `audit` (config.audit) says what part of every image to hand out.
    """
    builders, meta = sources.load(data_config)
    names = list(sources.names(data_config))
    meta["role"] = np.full(len(meta["image_id"]), "", dtype=object)
    for role, cfg in (extra or {}).items():
      more_builders, more = sources.load(cfg)
      more["builder"] = more["builder"] + len(builders)
      more["role"] = np.full(len(more["image_id"]), role, dtype=object)
      meta = {k: np.concatenate([meta[k], more[k]]) for k in meta}
      builders += more_builders
      names += [f"{role}:{n}" for n in sources.names(cfg)]
    dup = splits.deduplicate(meta, max_distance)
    dup["report"]["applied"] = drop_duplicates
    meta["group"] = dup["group"] if drop_duplicates else meta["patient_id"]
    dropped = {k: v[~dup["keep"]] for k, v in meta.items()} if drop_duplicates else {}
    if drop_duplicates:
      meta = {k: v[dup["keep"]] for k, v in meta.items()}
    meta = Metadata(meta)
    meta.builds = [{"name": n, "report": sources.build_report(b),
                    "file": os.path.join(b.data_dir, sources.BUILD_REPORT)}
                   for n, b in zip(names, builders)]
    meta.dropped = dropped
    return cls(builders, meta, names, dup["report"], audit)

  def keys(self, rows: np.ndarray) -> list[str]:
    """Stable names of rows: the image id, prefixed by the builder when there are several."""
    ids = self.meta["image_id"][rows]
    if len(self.builders) == 1:
      return [str(i) for i in ids]
    return [f"{b}/{i}" for b, i in zip(self.meta["builder"][rows], ids)]

  def dataset(self, rows: np.ndarray, labels: np.ndarray, image_size: int):
    """The rows' images as a cached tf.data.Dataset (pipeline.select; with `input_op`
    applied); `labels` is per cohort row, `index` in the dataset is the position in `rows`."""
    ds = pipeline.select(self.builders, self.meta["builder"][rows],
                         self.meta["image_id"][rows], labels[rows], image_size)
    transform = self._transform(rows, image_size)
    return transform(ds).cache() if transform else ds

  def partition_data(self, rows: np.ndarray, labels: np.ndarray, image_size: int,
                     budget_mb: float):
    """(data, how) for training or validating on the rows: their cached dataset (`dataset`)
    when their images fit in `budget_mb` (every process holds them all), else a
    pipeline.Stream (each process decodes only its share: of every epoch's batches in
    training, once for evaluation; the same batches); `how` says which and why, for the
    log."""
    mb = len(rows) * image_size ** 2 / 2 ** 20
    if mb <= budget_mb:
      return (self.dataset(rows, labels, image_size),
              f"{len(rows)} images, {mb:.0f} MB at {image_size} px: cached in memory "
              f"(cache_budget_mb {budget_mb:g})")
    stream = pipeline.Stream(self.builders, self.meta["builder"][rows],
                             self.meta["image_id"][rows], labels[rows],
                             self.meta["position"][rows], self.meta["record"][rows], image_size,
                             self._transform(rows, image_size))
    return stream, (f"{len(rows)} images, {mb:.0f} MB at {image_size} px, above "
                    f"cache_budget_mb {budget_mb:g}: each process decodes only its share")

  def _transform(self, rows: np.ndarray, image_size: int):
    """ds -> ds applying the audit's input op to the rows' images (None: no op)."""
    if not self.input_op:
      return None
    masks = self.masks(rows, image_size) if self.input_op in regions.LUNG_OPS else None
    return lambda ds: regions.apply(ds, self.input_op, self.geometry, masks)

  def masks(self, rows: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    """Lesion and lung masks of the rows (pipeline.masks)."""
    return pipeline.masks(self.builders, self.meta["builder"][rows], self.meta["image_id"][rows],
                          image_size)

  def build_reports(self) -> dict:
    """Per source: built and skipped counts, reasons, rows per task whose label the task
    leaves out (per label), and where the full report is."""
    out = {}
    for name, b in zip(self.names, self.builders):
      r = sources.build_report(b) or {}
      out[name] = {"built": r.get("built"), "skipped": r.get("skipped", 0),
                   "skipped_by_reason": r.get("skipped_by_reason", {}),
                   "not_in_task": {t: _left_out(v["not_in_task"])
                                   for t, v in r.get("tasks", {}).items() if v["not_in_task"]},
                   "report": os.path.join(b.data_dir, sources.BUILD_REPORT)}
    return out


def _left_out(not_in_task: dict, labels: int = 10) -> dict:
  """A task's left-out rows of a build report: their count and the most frequent labels."""
  order = sorted(not_in_task, key=lambda l: -not_in_task[l]["rows"])
  return {"rows": sum(e["rows"] for e in not_in_task.values()),
          "by_label": {l: not_in_task[l]["rows"] for l in order[:labels]}}

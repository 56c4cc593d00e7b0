"""`manifest`: any image collection listed in a CSV (path, label, patient_id, source).

This is the format of ../shared/data/cxr_bench_* (label columns `label4` and `label3`).
Paths are relative to the CSV's directory; images are PNG, JPEG, DICOM or anything Pillow
opens (decoding and skipping as in native.py). Each example keeps its source, which also
serves as the acquisition `site`. A row with an empty label is skipped with its reason.
An optional `lung_mask` column names a binary PNG of the lungs aligned with the image (the
shared benchmark has them for its ieee8023 images); it is stored as `lung_mask` (empty where
a row has none, or the file cannot be read) and scores how much of a Grad-CAM map falls
inside the lungs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os

import numpy as np

from xrayjax.data.sources import decode, native

REQUIRED = ("path", "patient_id", "source")


@dataclasses.dataclass(eq=False)
class ManifestConfig(native.NativeConfig):
  manifest: str = ""
  label_column: str = "label"
  lung_masks: bool = False  # the CSV has a lung_mask column


def listed_paths(manifest: str) -> list[str]:
  """Every file the manifest CSV names (images and lung masks), relative to its directory."""
  with open(manifest, newline="", errors="replace") as f:
    return sorted({p for r in csv.DictReader(f) for p in (r.get("path"), r.get("lung_mask"))
                   if p})


def make_config(manifest: str, label_column: str = "label", image_size: int = 256
                ) -> ManifestConfig:
  """Checks the CSV's header; the config's name encodes the CSV's content, the listing of
  the files it names (native.listing_digest) and the options."""
  path = os.path.abspath(os.path.expanduser(manifest))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"manifest CSV {path} does not exist; set --config.data.manifest.path "
                            "or $XRAYJAX_MANIFEST to a CSV with columns "
                            f"{list(REQUIRED) + [label_column]}")
  with native.open_text(path) as f:
    header = next(csv.reader(f), [])
  missing = [c for c in REQUIRED + (label_column,) if c not in header]
  if missing:
    raise ValueError(f"{path} does not look like a manifest: columns {missing} are missing; "
                     f"found {header}. Expected {list(REQUIRED)} and the label column "
                     f"{label_column!r} (--config.data.manifest.label_column)")
  with open(path, "rb") as f:  # the CSV's content and the listing of the files it names
    digest = hashlib.sha1(f.read() + native.listing_digest(
        os.path.dirname(path), listed_paths(path)).encode()).hexdigest()[:10]
  stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
  return ManifestConfig(name=f"{stem}_{label_column}_s{image_size}_{digest}", manifest=path,
                        root=os.path.dirname(path), label_column=label_column,
                        image_size=image_size, lung_masks="lung_mask" in header,
                        description=f"{path}, labels from {label_column!r}, {image_size}px")


class Manifest(native.NativeBuilder):
  """Images listed in a manifest CSV."""

  VERSION = native.tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.1.0": "file_sha1 and phash; shared native decoding (DICOM too).",
                   "1.2.0": "lung_mask from an optional column."}
  SOURCE = "manifest"

  def _info(self):
    info = super()._info()
    if not self.builder_config.lung_masks:
      return info
    s = self.builder_config.image_size
    from xrayjax.data.sources import schema
    return schema.dataset_info(self, s, self.__doc__,
                               lung_mask=native.tfds.features.Image(shape=(s, s, 1)))

  def _decode(self, row):
    item = super()._decode(row)
    if isinstance(item, str) or not self.builder_config.lung_masks:
      return item
    size = self.builder_config.image_size
    mask = np.zeros((size, size), np.uint8)
    if self._masks.get(row.key):
      try:
        m, _, _ = decode.read_image(os.path.join(self.builder_config.root, self._masks[row.key]))
        mask = (decode.resize(m, size) > 127).astype(np.uint8) * 255
      except decode.SkippedImage:
        pass  # an unreadable mask leaves the image without one
    item["lung_mask"] = mask
    return item

  def _example(self, row, item):
    ex = super()._example(row, item)
    if self.builder_config.lung_masks:
      ex["lung_mask"] = item["lung_mask"][..., None]
    return ex

  def metadata_file(self) -> str:
    return self.builder_config.manifest

  def rows(self):
    cfg = self.builder_config
    with native.open_text(cfg.manifest) as f:
      reader = csv.DictReader(f)
      table = [(reader.line_num, r) for r in reader]  # line_num: blank lines counted too
    rows, rejected = [], []
    self._masks = {}
    for line, r in table:
      short = [c for c in REQUIRED + (cfg.label_column,) if r.get(c) is None]
      row = native.Row(key=r["path"] or "", path=os.path.join(cfg.root, r["path"] or ""),
                       label=(r.get(cfg.label_column) or "").strip(),
                       patient_id=r.get("patient_id") or "", source=r.get("source") or "",
                       view=r.get("view", "") or "", line=line)
      if short:
        given = sum(v is not None for k, v in r.items() if k is not None)
        rejected.append((row, f"short row: no value for columns {short} ({given} of the "
                              f"header's {len(reader.fieldnames)} fields)"))
      elif not row.key.strip():
        rejected.append((row, "empty path"))
      elif not row.label:
        rejected.append((row, f"empty label in column {cfg.label_column!r}"))
      else:
        self._masks.setdefault(row.key, (r.get("lung_mask") or "").strip())
        rows.append(row)
    return rows, rejected

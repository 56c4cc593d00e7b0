"""`manifest`: any image collection listed in a CSV (path, label, patient_id, source).

This is the format of ../shared/data/cxr_bench_* (label columns `label4` and `label3`).
Paths are relative to the CSV's directory; images are PNG, JPEG, DICOM or anything Pillow
opens (decoding and skipping as in native.py). Each example keeps its source, which also
serves as the acquisition `site`. A row with an empty label is skipped with its reason.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os

from xrayjax.data.sources import native

REQUIRED = ("path", "patient_id", "source")


@dataclasses.dataclass(eq=False)
class ManifestConfig(native.NativeConfig):
  manifest: str = ""
  label_column: str = "label"


def make_config(manifest: str, label_column: str = "label", image_size: int = 256
                ) -> ManifestConfig:
  """Checks the CSV's header; the config's name encodes the CSV's content and the options."""
  path = os.path.abspath(os.path.expanduser(manifest))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"manifest CSV {path} does not exist; set --config.data.manifest.path "
                            "or $XRAYJAX_MANIFEST to a CSV with columns "
                            f"{list(REQUIRED) + [label_column]}")
  with open(path, newline="") as f:
    header = next(csv.reader(f), [])
  missing = [c for c in REQUIRED + (label_column,) if c not in header]
  if missing:
    raise ValueError(f"{path} does not look like a manifest: columns {missing} are missing; "
                     f"found {header}. Expected {list(REQUIRED)} and the label column "
                     f"{label_column!r} (--config.data.manifest.label_column)")
  with open(path, "rb") as f:
    digest = hashlib.sha1(f.read()).hexdigest()[:10]
  stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
  return ManifestConfig(name=f"{stem}_{label_column}_s{image_size}_{digest}", manifest=path,
                        root=os.path.dirname(path), label_column=label_column,
                        image_size=image_size,
                        description=f"{path}, labels from {label_column!r}, {image_size}px")


class Manifest(native.NativeBuilder):
  """Images listed in a manifest CSV."""

  VERSION = native.tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "file_sha1 and phash; shared native decoding (DICOM too)."}
  SOURCE = "manifest"

  def rows(self):
    cfg = self.builder_config
    with open(cfg.manifest, newline="") as f:
      table = list(csv.DictReader(f))
    rows, rejected = [], []
    for line, r in enumerate(table, start=2):
      row = native.Row(key=r["path"], path=os.path.join(cfg.root, r["path"]),
                       label=r[cfg.label_column].strip(), patient_id=r["patient_id"],
                       source=r["source"], view=r.get("view", "") or "", line=line)
      if not row.label:
        rejected.append((row, f"empty label in column {cfg.label_column!r}"))
      else:
        rows.append(row)
    return rows, rejected

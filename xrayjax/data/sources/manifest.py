"""`manifest`: any image collection listed in a CSV (path, label, patient_id, source).

This is the format of ../shared/data/cxr_bench_* (label columns `label4` and `label3`). The
images are read from the user's disk (PNG, JPEG, or anything Pillow opens), turned into 8-bit
grey and squashed to a square of the builder config's size. Each example keeps its source; the
source also serves as the acquisition `site`.

Rows that cannot be used are skipped, each with its reason, and the build still completes:
a missing file, an unreadable or truncated image, a blank (constant) image, or an empty
label. `skipped` lists them after a build, and `sources.builder` writes them to
`build_report.json` beside the built data. Odd image modes are converted, not skipped:
16-bit and float images are windowed to their own min..max, and RGB, RGBA, palette, CMYK
and 1-bit images become grey.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from xrayjax.data import tasks
from xrayjax.data.sources import schema

REQUIRED = ("path", "patient_id", "source")


@dataclasses.dataclass(eq=False)
class ManifestConfig(tfds.core.BuilderConfig):
  manifest: str = ""
  label_column: str = "label"
  image_size: int = 256


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
                        label_column=label_column, image_size=image_size,
                        description=f"{path}, labels from {label_column!r}, {image_size}px")


class SkippedImage(Exception):
  """An image that cannot be used; the message is the reason."""


def load_grey(path: str) -> np.ndarray:
  """Any image Pillow reads -> 2-D uint8 grey; raises SkippedImage with the reason."""
  if not os.path.isfile(path):
    raise SkippedImage("missing file")
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        arr = np.round(arr).astype(np.uint8)
      else:
        arr = np.asarray(im.convert("L"))
  except (OSError, SyntaxError, ValueError) as e:  # truncated, corrupt, unidentified
    raise SkippedImage(f"unreadable image: {e}") from None
  if arr.max() == arr.min():
    raise SkippedImage("blank image (every pixel is the same)")
  return arr


class Manifest(tfds.core.GeneratorBasedBuilder):
  """Images listed in a manifest CSV."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.skipped: list[dict] = []

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=schema.features(self.builder_config.image_size),
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    root = os.path.dirname(cfg.manifest)
    self.skipped = []
    with open(cfg.manifest, newline="") as f:
      rows = list(csv.DictReader(f))
    for line, row in enumerate(rows, start=2):
      path = os.path.join(root, row["path"])
      try:
        if not row[cfg.label_column].strip():
          raise SkippedImage(f"empty label in column {cfg.label_column!r}")
        image = load_grey(path)
      except SkippedImage as e:
        self.skipped.append({"line": line, "path": row["path"], "reason": str(e)})
        continue
      if image.shape != (cfg.image_size, cfg.image_size):
        image = np.asarray(Image.fromarray(image).resize((cfg.image_size, cfg.image_size),
                                                         Image.BILINEAR))
      yield row["path"], {
          "image": image[..., None],
          "label": row[cfg.label_column].strip(),
          "findings": np.zeros(len(tasks.FINDINGS), np.bool_),  # the manifest names none
          "patient_id": row["patient_id"],
          "image_id": row["path"],
          "source": row["source"],
          "site": row["source"],
          "view": row.get("view", "") or "",
      }

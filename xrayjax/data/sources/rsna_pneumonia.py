"""`rsna_pneumonia`: the RSNA Pneumonia Detection Challenge (2018) as distributed.

Layout (nothing is downloaded):

  ROOT/stage_2_train_labels.csv            patientId, x, y, width, height, Target (one row per
                                           box; one row with empty box for Target 0)
  ROOT/stage_2_detailed_class_info.csv     optional: patientId, class ("Normal", "Lung
                                           Opacity", "No Lung Opacity / Not Normal")
  ROOT/stage_2_train_images/<patientId>.dcm  (any depth below ROOT)

`label` is the detailed class when that file is present, else "Target 1" / "Target 0"
(paper 2's three-class task needs the detailed class for its normal class; see data/tasks.py).
Target 1 images get the Pneumonia finding and keep their boxes. One image per patient:
patient_id is `rsna-<patientId>`. DICOMs are decoded by decode.read_image (modality and VOI
LUT, MONOCHROME1, any bit depth, JPEG and JPEG 2000); `view` comes from the DICOM header.
"""

from __future__ import annotations

import csv
import os

from xrayjax.data.sources import decode, native

LABELS = "stage_2_train_labels.csv"
CLASSES = "stage_2_detailed_class_info.csv"
SOURCE = "rsna_pneumonia"
LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")


def metadata_path(root: str) -> str:
  path = os.path.join(root, LABELS)
  if not os.path.isfile(path):
    raise native.LayoutError(
        f"{root} does not look like the RSNA Pneumonia Detection Challenge data: expected "
        f"{LABELS} (and stage_2_train_images/*.dcm) there; found {native.listing(root)}")
  return path


def read_rows(root: str, images: dict[str, str] | None = None):
  """One Row per patientId; rows whose DICOM is not in `images` are rejected."""
  path = metadata_path(root)
  with native.open_text(path) as f:
    table = list(csv.DictReader(f))
  if table and set(LABEL_COLUMNS) - set(table[0]):
    raise native.LayoutError(f"{path}: expected columns {list(LABEL_COLUMNS)}, found "
                             f"{list(table[0])}")
  detailed = {}
  if os.path.isfile(os.path.join(root, CLASSES)):
    with native.open_text(os.path.join(root, CLASSES)) as f:
      detailed = {r["patientId"]: r["class"] for r in csv.DictReader(f)}
  by_patient: dict[str, dict] = {}
  for line, r in enumerate(table, start=2):
    p = by_patient.setdefault(r["patientId"], {"line": line, "target": r["Target"], "boxes": []})
    if r["Target"] == "1" and r["x"]:
      p["boxes"].append((float(r["x"]), float(r["y"]), float(r["width"]), float(r["height"]),
                         "Pneumonia"))
  rows, rejected = [], []
  for pid, p in by_patient.items():
    label = detailed.get(pid, f"Target {p['target']}")
    row = native.Row(key=pid, path=(images or {}).get(pid, os.path.join(
        root, "stage_2_train_images", pid + ".dcm")), label=label, patient_id=f"rsna-{pid}",
                     source=SOURCE, line=p["line"], boxes=tuple(p["boxes"]),
                     findings=("Pneumonia",) if p["target"] == "1" else ())
    native.keep_if_present(row, images, pid, rows, rejected)
  return rows, rejected


class RsnaPneumonia(native.NativeBuilder):
  """RSNA Pneumonia Detection Challenge DICOMs + labels from a local directory."""

  VERSION = native.tfds.core.Version("1.0.0")
  SOURCE = SOURCE
  HAS_BOXES = True

  def metadata_file(self) -> str:
    return metadata_path(self.builder_config.root)

  def rows(self):
    root = self.builder_config.root
    images = {os.path.splitext(n)[0]: p for n, p in
              native.index_files(root, decode.DICOM_SUFFIXES).items()}
    return read_rows(root, images)


def make_config(root: str, image_size: int = 256) -> native.NativeConfig:
  return native.make_config(native.NativeConfig, SOURCE, root, image_size, metadata_path)

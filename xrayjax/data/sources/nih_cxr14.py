"""`nih_cxr14`: NIH ChestX-ray14 as distributed (Wang et al. 2017), read from the user's disk.

Layout (the NIH Box folder or the Kaggle copy; nothing is downloaded):

  ROOT/Data_Entry_2017_v2020.csv[.gz] or ROOT/Data_Entry_2017.csv   (metadata; the 2020
      revision is preferred when both are present)
  ROOT/BBox_List_2017.csv[.gz]                                       (optional; 984 boxes)
  ROOT/images/*.png, or ROOT/images_001/images/*.png ...             (any depth below ROOT)

`label` is NIH's "Finding Labels" string ("No Finding" or findings joined by "|"),
`findings` the same as a multi-hot vector. patient_id is `nih-` + the 8-digit patient number
(the shared benchmark's form, so the same patient is recognised across collections). Boxes
keep their finding. Rows whose image is not on disk are skipped and listed.
"""

from __future__ import annotations

import csv
import gzip
import os

from xrayjax.data.sources import native

METADATA = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv",
            "Data_Entry_2017.csv.gz")
BOXES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")
SOURCE = "nih_cxr14"


def _open(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", newline="", encoding="utf-8", errors="surrogateescape")
  return native.open_text(path)


def _first(root: str, names) -> str | None:
  return next((os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))),
              None)


def patient_id(number: str | int) -> str:
  return f"nih-{int(number):08d}"


def read_boxes(root: str) -> dict[str, list]:
  path = _first(root, BOXES)
  boxes: dict[str, list] = {}
  if path is None:
    return boxes
  with _open(path) as f:
    reader = csv.reader(f)
    next(reader)  # "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    for r in reader:
      if len(r) >= 6 and r[0]:
        boxes.setdefault(r[0], []).append((float(r[2]), float(r[3]), float(r[4]), float(r[5]),
                                           r[1]))
  return boxes


def metadata_path(root: str) -> str:
  path = _first(root, METADATA)
  if path is None:
    raise native.LayoutError(
        f"{root} does not look like NIH ChestX-ray14: expected one of {list(METADATA)} (and "
        f"images/*.png) there; found {native.listing(root)}")
  return path


def read_rows(root: str, images: dict[str, str] | None = None
              ) -> tuple[list[native.Row], list[tuple[native.Row, str]]]:
  """Every metadata row as a Row; rows whose image is not in `images` are rejected.

  `images=None` lists every row (metadata-only use, e.g. counting a task's classes).
  """
  meta_path = metadata_path(root)
  boxes = read_boxes(root)
  rows, rejected = [], []
  with _open(meta_path) as f:
    reader = csv.DictReader(f)
    for r in reader:
      line = reader.line_num
      name = r["Image Index"]
      labels = r["Finding Labels"].strip()
      row = native.Row(key=name, path=(images or {}).get(name, os.path.join(root, "images", name)),
                       label=labels, patient_id=patient_id(r["Patient ID"]), source=SOURCE,
                       view=r.get("View Position", ""), line=line,
                       findings=tuple(x for x in labels.split("|") if x != "No Finding"),
                       boxes=tuple(boxes.get(name, ())))
      native.keep_if_present(row, images, name, rows, rejected)
  return rows, rejected


class NihCxr14(native.NativeBuilder):
  """NIH ChestX-ray14 (PNG + Data_Entry_2017 + BBox_List_2017) from a local directory."""

  VERSION = native.tfds.core.Version("1.0.0")
  SOURCE = SOURCE
  HAS_BOXES = True

  def metadata_file(self) -> str:
    return metadata_path(self.builder_config.root)

  def rows(self):
    root = self.builder_config.root
    images = native.index_files(root, (".png",))
    return read_rows(root, images)


def make_config(root: str, image_size: int = 256) -> native.NativeConfig:
  return native.make_config(native.NativeConfig, SOURCE, root, image_size, metadata_path)

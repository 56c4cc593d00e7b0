"""`covidx`: COVIDx (Wang, Lin & Wong, COVID-Net) label files and image folders.

Layout (as the COVID-Net scripts or the Kaggle copy leave it; nothing is downloaded):

  ROOT/train_COVIDx9A.txt, ROOT/test_COVIDx9A.txt, ...   lines `patientid filename label
                                                         source` (older releases: 3 columns)
  ROOT/train/, ROOT/test/                                the images each file lists (a file
                                                         named train*.txt reads train/, test*
                                                         reads test/, any other ROOT)

`label` is COVIDx's ("COVID-19", "normal", "pneumonia"; CXR-3's "positive", "negative").
COVIDx pools other collections; `source` is `covidx/<its source>` and patients of the
collections xrayjax also reads keep those collections' ids (`cohen` -> `ieee-<id>`,
`rsna` -> `rsna-<id>`), so duplicate detection and patient grouping work across them.
"""

from __future__ import annotations

import dataclasses
import glob
import os

from xrayjax.data.sources import native

SOURCE = "covidx"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
PATIENT_PREFIX = {"cohen": "ieee", "rsna": "rsna"}
FINDINGS = {"covid-19": ("COVID-19", "Pneumonia"), "positive": ("COVID-19", "Pneumonia"),
            "pneumonia": ("Pneumonia",)}


def label_files(root: str, names: str = "") -> list[str]:
  if names:
    paths = [os.path.join(root, n.strip()) for n in names.split(",") if n.strip()]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise native.LayoutError(f"covidx: label files {missing} do not exist")
    return paths
  paths = sorted(glob.glob(os.path.join(root, "*.txt")))
  if not paths:
    raise native.LayoutError(
        f"{root} does not look like COVIDx: expected label files (*.txt with lines `patientid "
        f"filename label source`) and train/ or test/ image folders; found "
        f"{native.listing(root)}")
  return paths


def read_rows(root: str, files: list[str], index: bool = True):
  rows, rejected = [], []
  for path in files:
    stem = os.path.basename(path).lower()
    folder = next((d for d in ("train", "test") if stem.startswith(d) and
                   os.path.isdir(os.path.join(root, d))), "")
    images = native.index_files(os.path.join(root, folder), IMAGE_SUFFIXES) if index else None
    with native.open_text(path) as f:
      for n, text in enumerate(f, start=1):
        parts = text.split()
        if not parts:
          continue
        where = f"{os.path.basename(path)}:{n}"
        if len(parts) not in (3, 4):
          raise native.LayoutError(f"{where}: expected `patientid filename label [source]`, "
                                   f"found {text.strip()!r}")
        pid, name, label = parts[:3]
        src = parts[3] if len(parts) == 4 else "unknown"
        prefix = PATIENT_PREFIX.get(src.lower(), f"covidx-{src}")
        row = native.Row(key=f"{folder or 'root'}/{name}",
                         path=(images or {}).get(name, os.path.join(root, folder, name)),
                         label=label, patient_id=f"{prefix}-{pid}", source=f"covidx/{src}",
                         line=where, findings=FINDINGS.get(label.lower(), ()))
        native.keep_if_present(row, images, name, rows, rejected)
  return rows, rejected


@dataclasses.dataclass(eq=False)
class CovidxConfig(native.NativeConfig):
  label_files: str = ""  # comma separated, relative to root; "" = every *.txt in root


class Covidx(native.NativeBuilder):
  """COVIDx label files + image folders from a local directory."""

  VERSION = native.tfds.core.Version("1.0.0")
  SOURCE = SOURCE

  def rows(self):
    cfg = self.builder_config
    return read_rows(cfg.root, label_files(cfg.root, cfg.label_files))


def make_config(root: str, image_size: int = 256, files: str = "") -> CovidxConfig:
  return native.make_config(CovidxConfig, SOURCE, root, image_size,
                            lambda r: label_files(r, files), label_files=files)

"""`ieee8023_covid`: the COVID-19 image data collection (Cohen et al., github ieee8023).

Layout (a checkout of the repository; nothing is downloaded):

  ROOT/metadata.csv     patientid, finding, view, modality, folder, filename, ...
  ROOT/images/...       (the `folder` column; files are also found at any depth below ROOT)

Both schemas of `finding` are read: the 2020 flat values ("COVID-19", "SARS",
"Pneumocystis", "Streptococcus", "No Finding", "COVID-19, ARDS", ...) and the later
hierarchical ones ("Pneumonia/Viral/COVID-19", "Pneumonia/Fungal/Pneumocystis", ...).
`label` keeps the value as written; `findings` gets COVID-19 and/or Pneumonia. Only X-rays
are kept (CT rows are left out), and by default only frontal views (PA, AP, AP Supine, AP
semi erect, ...); the rest are counted in the build report as excluded. patient_id is
`ieee-<patientid>` (the shared benchmark's form).
"""

from __future__ import annotations

import csv
import dataclasses
import os

from xrayjax.data.sources import native

METADATA = "metadata.csv"
SOURCE = "ieee8023_covid"
COLUMNS = ("patientid", "finding", "filename")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".dcm")
# Flat (2020) findings that are pneumonias; hierarchical values say "Pneumonia/..." themselves.
FLAT_PNEUMONIA = ("COVID-19", "SARS", "MERS", "Pneumocystis", "Streptococcus", "Klebsiella",
                  "Legionella", "Chlamydophila", "E.Coli", "Mycoplasma", "Influenza",
                  "Varicella", "Lipoid", "Aspergillosis", "Nocardia", "Staphylococcus",
                  "Herpes", "Candida", "Bacterial", "Viral", "Fungal")


def is_frontal(view: str) -> bool:
  return view.strip().upper().startswith(("PA", "AP"))


def finding_names(finding: str) -> tuple[str, ...]:
  """ieee8023 `finding` (either schema) -> names in tasks.FINDINGS."""
  parts = [p.strip() for p in finding.replace(",", "/").split("/") if p.strip()]
  out = []
  if "COVID-19" in parts:
    out.append("COVID-19")
  if parts and (parts[0] == "Pneumonia" or any(p in FLAT_PNEUMONIA for p in parts)):
    out.append("Pneumonia")
  return tuple(out)


def metadata_path(root: str) -> str:
  path = os.path.join(root, METADATA)
  if not os.path.isfile(path):
    raise native.LayoutError(
        f"{root} does not look like the ieee8023 covid-chestxray-dataset: expected {METADATA} "
        f"and images/ there; found {native.listing(root)}")
  return path


def read_rows(root: str, images: dict[str, str] | None = None, frontal_only: bool = True):
  path = metadata_path(root)
  rows, rejected = [], []
  with native.open_text(path) as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise native.LayoutError(f"{path}: columns {missing} are missing; found "
                               f"{reader.fieldnames}")
    for r in reader:
      line = reader.line_num
      name = r["filename"]
      folder = r.get("folder") or "images"
      row = native.Row(key=name, path=(images or {}).get(name, os.path.join(root, folder, name)),
                       label=r["finding"].strip(), patient_id=f"ieee-{r['patientid']}",
                       source=SOURCE, view=r.get("view", "").strip(), line=line,
                       findings=finding_names(r["finding"]))
      modality = r.get("modality", "X-ray").strip()
      if modality and modality != "X-ray":
        rejected.append((row, f"excluded: modality {modality} (only X-rays are kept)"))
      elif frontal_only and not is_frontal(row.view):
        rejected.append((row, f"excluded: view {row.view!r} is not frontal (frontal_only)"))
      else:
        native.keep_if_present(row, images, name, rows, rejected)
  return rows, rejected


@dataclasses.dataclass(eq=False)
class Ieee8023Config(native.NativeConfig):
  frontal_only: bool = True


class Ieee8023Covid(native.NativeBuilder):
  """ieee8023 covid-chestxray-dataset (metadata.csv + images/) from a local directory."""

  VERSION = native.tfds.core.Version("1.0.0")
  SOURCE = SOURCE

  def metadata_file(self) -> str:
    return metadata_path(self.builder_config.root)

  def rows(self):
    cfg = self.builder_config
    return read_rows(cfg.root, native.index_files(cfg.root, IMAGE_SUFFIXES), cfg.frontal_only)


def make_config(root: str, image_size: int = 256, frontal_only: bool = True) -> Ieee8023Config:
  return native.make_config(Ieee8023Config, SOURCE, root, image_size, metadata_path,
                            frontal_only=frontal_only)

"""Label spaces and the rules that map every source's labels into them.

A task turns an image's source label, findings and source into a task class index (or
-1: not in the task) and a stratum (a sub-class with its own share of the class's quota,
e.g. the six findings that make up DETL's other_disease). Tasks can mix sources; every
example keeps its `source`. Splits and pipelines only ever see task indices.

Rules (label comparisons ignore case; "findings" are the common vocabulary below):
  normal (every task): label "normal" or "No Finding" (NIH, ieee8023, COVIDx, manifests) or
    RSNA's detailed class "Normal", with no finding.
  data_a (DETL stage A, paper §III-A): normal vs disease = any of NIH's 13 findings other
    than Pneumonia, on images without Pneumonia or COVID-19 (or a manifest's
    "other_disease").
  data_b (DETL stage B): normal; pneumonia = the Pneumonia finding without COVID-19 (NIH
    pneumonia images often carry other findings too; the paper used them); other_disease =
    exactly one of Atelectasis, Cardiomegaly, Infiltration, Effusion, Nodule, Mass, drawn
    equally from the six (paper: 50 each); covid = the COVID-19 finding. Manifest and
    synthetic labels name these classes directly.
  three_class (paper 2, the authors' mapping): RSNA "Normal" -> normal, RSNA Target 1
    ("Lung Opacity") -> pneumonia, ieee8023 COVID-19 -> covid, ieee8023 Pneumocystis /
    SARS / Streptococcus -> pneumonia; RSNA "No Lung Opacity / Not Normal" and other
    ieee8023 pneumonias are left out, as the authors did. Our additions, for the other
    sources: COVIDx and manifest labels by name, NIH No Finding / Pneumonia.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# NIH ChestX-ray14's fourteen findings plus COVID-19: the common vocabulary of
# the `findings` multi-hot feature in every source.
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion",
            "Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule",
            "Pleural_Thickening", "Pneumonia", "Pneumothorax", "COVID-19")
NIH_FINDINGS = FINDINGS[:14]
DETL_OTHER = ("Atelectasis", "Cardiomegaly", "Infiltration", "Effusion", "Nodule", "Mass")
AUTHORS_IEEE_PNEUMONIA = ("Pneumocystis", "SARS", "Streptococcus")
NORMAL_LABELS = ("normal", "no finding")

Rule = Callable[[str, frozenset, str], tuple[str | None, str]]


def _normal(label: str, found: frozenset) -> bool:
  return label.lower() in NORMAL_LABELS and not found


def _data_a(label: str, found: frozenset, source: str) -> tuple[str | None, str]:
  del source
  if _normal(label, found):
    return "normal", ""
  if label.lower() == "other_disease":
    return "disease", ""
  if found and not found & {"Pneumonia", "COVID-19"}:
    return "disease", ""
  return None, ""


def _data_b(label: str, found: frozenset, source: str) -> tuple[str | None, str]:
  del source
  lab = label.lower()
  if lab in ("normal", "pneumonia", "other_disease", "covid"):
    return lab, ""
  if _normal(label, found):
    return "normal", ""
  if "COVID-19" in found:
    return "covid", ""
  if "Pneumonia" in found:
    return "pneumonia", ""
  if len(found) == 1 and next(iter(found)) in DETL_OTHER:
    return "other_disease", next(iter(found))
  return None, ""


def _three_class(label: str, found: frozenset, source: str) -> tuple[str | None, str]:
  lab = label.lower()
  if _normal(label, found):
    return "normal", ""
  if source == "rsna_pneumonia":
    return ("pneumonia" if lab in ("lung opacity", "target 1") else None), ""
  if source == "ieee8023_covid":
    if "COVID-19" in found:
      return "covid", ""
    return ("pneumonia" if any(o.lower() in lab for o in AUTHORS_IEEE_PNEUMONIA) else None), ""
  if lab in ("covid", "covid-19", "positive"):
    return "covid", ""
  if lab == "pneumonia" or (source == "nih_cxr14" and "Pneumonia" in found):
    return "pneumonia", ""
  return None, ""


@dataclasses.dataclass(frozen=True)
class Task:
  """A label space and the rule that maps a source's labels into it."""
  name: str
  classes: tuple[str, ...]
  rule: Rule

  def assign(self, meta: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(task class index per image, -1 where not in the task; stratum per image)."""
    index = {c: i for i, c in enumerate(self.classes)}
    found = _finding_sets(meta)
    out = [self.rule(str(l), f, str(s)) for l, f, s in zip(meta["label"], found, meta["source"])]
    labels = np.array([index[c] if c is not None else -1 for c, _ in out], np.int32)
    return labels, np.array([s for _, s in out], dtype=object)

  def labels(self, meta: dict[str, np.ndarray]) -> np.ndarray:
    return self.assign(meta)[0]


def _finding_sets(meta) -> list[frozenset]:
  if "findings" not in meta:
    return [frozenset()] * len(meta["label"])
  names = np.array(FINDINGS)
  return [frozenset(names[row]) for row in np.asarray(meta["findings"], bool)]


TASKS = {
    "data_a": Task("data_a", ("normal", "disease"), _data_a),
    "data_b": Task("data_b", ("normal", "pneumonia", "other_disease", "covid"), _data_b),
    "three_class": Task("three_class", ("normal", "pneumonia", "covid"), _three_class),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
  return TASKS[name]

"""Label spaces and the maps from a source's labels to them.

A task turns a source's per-image `label` (a class name of that source) into a
task class index, or excludes the image. Splits and pipelines only ever see
task indices; every example keeps its `source` so results can be broken down.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# NIH ChestX-ray14's fourteen findings plus COVID-19: the common vocabulary of
# the `findings` multi-hot feature in every source.
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion",
            "Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule",
            "Pleural_Thickening", "Pneumonia", "Pneumothorax", "COVID-19")


@dataclasses.dataclass(frozen=True)
class Task:
  """A label space and how source class names map into it."""
  name: str
  classes: tuple[str, ...]
  source_labels: dict[str, str]  # source class name -> task class name

  def labels(self, source_label_names: np.ndarray) -> np.ndarray:
    """Task class index per image, -1 where the image is not in the task."""
    index = {c: i for i, c in enumerate(self.classes)}
    return np.array([index.get(self.source_labels.get(str(s), ""), -1)
                     for s in source_label_names], np.int32)


TASKS = {
    # DETL stage A: normal vs disease, where disease excludes pneumonia (paper §III-A).
    "data_a": Task("data_a", ("normal", "disease"),
                   {"normal": "normal", "other_disease": "disease"}),
    # DETL stage B: the paper's four classes.
    "data_b": Task("data_b", ("normal", "pneumonia", "other_disease", "covid"),
                   {c: c for c in ("normal", "pneumonia", "other_disease", "covid")}),
    # Paper 2's three classes.
    "three_class": Task("three_class", ("normal", "pneumonia", "covid"),
                        {c: c for c in ("normal", "pneumonia", "covid")}),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
  return TASKS[name]

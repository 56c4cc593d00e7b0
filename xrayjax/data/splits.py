"""Splits computed on metadata only: cohorts, folds, validation carves, checks.

All functions take per-image arrays (task label, patient id) and return image
indices; they are deterministic given the seed. The corrected protocol groups
by patient everywhere; the paper protocol splits images as the papers did
(patients can leak across partitions; that is the point of reproducing it).
"""

from __future__ import annotations

import collections

import numpy as np
from sklearn import model_selection


def kfold(labels: np.ndarray, patients: np.ndarray, k: int, seed: int,
          grouped: bool = True) -> list[np.ndarray]:
  """Stratified k-fold; returns the test indices of each fold (a partition).

  Args:
    labels: task class index per image.
    patients: patient id per image (used when `grouped`).
    k: number of folds.
    seed: shuffling seed.
    grouped: keep every patient's images in one fold (corrected protocol).

  Returns:
    k sorted index arrays; every image is in exactly one of them.
  """
  n = len(labels)
  if grouped and len(np.unique(patients)) < k or n < k:
    raise ValueError(f"cannot make {k} folds from {n} images of {len(np.unique(patients))} "
                     "patients; lower `folds` or add data")
  if grouped:
    splitter = model_selection.StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  else:
    splitter = model_selection.StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
  folds = [np.sort(test) for _, test in
           splitter.split(np.zeros(n), labels, patients if grouped else None)]
  check_folds(folds, n)
  return folds


def carve(indices: np.ndarray, labels: np.ndarray, patients: np.ndarray, fraction: float,
          seed: int, grouped: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Splits `indices` into (rest, carved), carving about `fraction`, stratified.

  Used for the validation split carved from a fold's training patients.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  k = max(2, int(round(1 / fraction)))
  folds = kfold(labels[indices], patients[indices], k, seed, grouped)
  carved = indices[folds[0]]
  rest = np.setdiff1d(indices, carved)
  return rest, np.sort(carved)


def sample_patients(candidates: np.ndarray, patients: np.ndarray, target_images: int,
                    rng: np.random.Generator) -> np.ndarray:
  """Whole patients, in random order, until `target_images` images are taken.

  A patient whose images would overshoot the target is skipped, so the count is
  at most the target; 0 or a target above the supply takes every candidate.
  """
  by_patient = collections.defaultdict(list)
  for i in candidates:
    by_patient[patients[i]].append(i)
  order = sorted(by_patient)
  rng.shuffle(order)
  if target_images <= 0 or target_images >= len(candidates):
    return np.sort(np.asarray(candidates))
  taken: list[int] = []
  for p in order:
    if len(taken) + len(by_patient[p]) <= target_images:
      taken.extend(by_patient[p])
    if len(taken) == target_images:
      break
  return np.sort(np.asarray(taken, dtype=np.int64))


def check_disjoint_patients(parts: dict[str, np.ndarray], patients: np.ndarray) -> None:
  """Fails loudly if any patient has images in two of the named partitions."""
  seen: dict[str, str] = {}
  for name, idx in parts.items():
    for p in np.unique(patients[idx]):
      if p in seen and seen[p] != name:
        raise AssertionError(f"patient {p!r} is in both {seen[p]!r} and {name!r}: the split "
                             "leaks patients across partitions")
      seen[p] = name


def check_folds(folds: list[np.ndarray], n: int) -> None:
  """Fails loudly unless every image 0..n-1 is evaluated exactly once over the folds."""
  counts = np.bincount(np.concatenate(folds).astype(np.int64), minlength=n) if folds else \
      np.zeros(n, np.int64)
  if len(counts) != n or np.any(counts != 1):
    bad = np.flatnonzero(counts != 1)[:5]
    raise AssertionError(f"folds are not a partition of {n} images: images {bad.tolist()} are "
                         f"evaluated {counts[bad].tolist()} times")

"""Paper 2's own splits: its phases (the answer to class imbalance) and the authors' split
files (github.com/mr7495, `All.csv` and `fold*/train*.csv`) as image indices. Metadata only;
used by methods/concat.py's plan."""

from __future__ import annotations

import collections
import csv
import glob
import os
import re

import numpy as np

from xrayjax.data import splits


def phases(train: np.ndarray, labels: np.ndarray, patients: np.ndarray, classes: tuple[str, ...],
           count: int, fresh: dict[str, int], shared: dict[str, int], seed: int
           ) -> list[np.ndarray]:
  """`count` phase training sets drawn from the images `train`.

  Per class, every phase holds the same `shared[c]` images (-1: all of the class's training
  images, paper 2's treatment of COVID-19) plus `fresh[c]` images that no other phase
  holds. Whole patients are drawn, so a patient's images stay together. The paper: 8 phases
  of COVID-19 149 (all, shared), normal 250 (fresh), pneumonia 200 fresh + 34 shared.
  """
  rng = np.random.default_rng(seed)
  out = [[] for _ in range(count)]
  for c, name in enumerate(classes):
    pool = train[labels[train] == c]
    n_shared, n_fresh = int(shared.get(name, 0)), int(fresh.get(name, 0))
    common = pool if n_shared < 0 else splits.sample_patients(pool, patients, n_shared, rng) \
        if n_shared else np.array([], np.int64)
    rest = np.setdiff1d(pool, common)
    if n_fresh * count > len(rest):
      raise ValueError(f"phases: class {name!r} has {len(rest)} training images besides its "
                       f"{len(common)} shared ones, too few for {count} phases of {n_fresh} "
                       "fresh images; lower phases.fresh or phases.count")
    for k in range(count):
      chosen = splits.sample_patients(rest, patients, n_fresh, rng) if n_fresh else \
          np.array([], np.int64)
      rest = np.setdiff1d(rest, chosen)
      out[k].extend(common.tolist() + chosen.tolist())
  return [np.sort(np.asarray(p, np.int64)) for p in out]


def read_mr7495(directory: str) -> dict:
  """The authors' split files: All.csv and fold*/train*.csv (filename, class).

  Returns {"all": {filename: class}, "folds": [[set of filenames per phase] per fold]}.
  """
  def read(path):
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      if not {"filename", "class"} <= set(reader.fieldnames or ()):
        raise ValueError(f"{path}: expected columns filename, class; found {reader.fieldnames}")
      return {r["filename"]: r["class"] for r in reader}

  all_path = os.path.join(directory, "All.csv")
  fold_dirs = sorted(glob.glob(os.path.join(directory, "fold*")),
                     key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0))
  if not os.path.isfile(all_path) or not fold_dirs:
    raise FileNotFoundError(f"{directory} does not look like the mr7495 split files: expected "
                            "All.csv and fold1/train1.csv ...; found "
                            f"{sorted(os.listdir(directory)) if os.path.isdir(directory) else []}")
  folds = []
  for d in fold_dirs:
    files = sorted(glob.glob(os.path.join(d, "train*.csv")),
                   key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0))
    folds.append([read(p) for p in files])
  return {"all": read(all_path), "folds": folds}


def mr7495_plan(meta: dict[str, np.ndarray], directory: str) -> dict:
  """The authors' folds and phases as image indices into `meta`, with what was found on disk.

  Files are matched by name without extension (RSNA patientIds, ieee8023 file names) to
  `image_id`. Each fold's test set is every listed image in no phase of that fold (as the
  authors evaluated).
  """
  lists = read_mr7495(directory)
  stem = lambda s: os.path.splitext(os.path.basename(str(s)))[0]  # noqa: E731
  where = {}
  for k, image_id in enumerate(meta["image_id"]):
    where.setdefault(stem(image_id), k)
  found = {f: where[stem(f)] for f in lists["all"] if stem(f) in where}
  folds = []
  for fold in lists["folds"]:
    listed = set().union(*fold)
    folds.append({"phases": [np.sort(np.array([found[f] for f in ph if f in found], np.int64))
                             for ph in fold],
                  "test": np.sort(np.array([found[f] for f in lists["all"]
                                            if f in found and f not in listed], np.int64)),
                  "listed_per_phase": [dict(collections.Counter(ph.values())) for ph in fold]})
  missing = [f for f in lists["all"] if f not in found]
  return {"folds": folds, "classes": dict(collections.Counter(lists["all"].values())),
          "listed": len(lists["all"]), "found": len(found), "missing": len(missing),
          "missing_examples": missing[:10]}

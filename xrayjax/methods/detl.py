"""DETL (Basu, Mitra & Saha 2020): stage A from scratch on Data-A, then per fold stage B.

Stage A trains the network on Data-A (normal vs disease). Each fold's stage B takes stage A's
weights with a new head (the "domain extension"), freezes every layer before the last conv
block, and fine-tunes on the fold's Data-B training images; it is evaluated on the fold's
held-out Data-B images. `init=scratch` (no stage A) trains the same network on Data-B only.

Protocols (config.protocol):
  corrected (default): patient-grouped stratified folds (a true partition of Data-B); a
    validation split carved from each fold's training patients selects the stage-B
    checkpoint; no Data-A patient is in Data-B; Data-A's validation split is
    patient-grouped too.
  paper: the published recipe: image-level folds, stage B keeps its last weights (the paper
    names no stage-B selection rule and no validation split), Data-A and Data-B are drawn
    independently (patients may be shared), and Data-A's validation split is a random
    image-level carve.
"""

from __future__ import annotations

import numpy as np

from xrayjax.data import splits, tasks
from xrayjax.methods import Evaluation, Phase, Plan, Stage, seed

NAME = "DETL"
PROTOCOLS = ("corrected", "paper")
DATA_A_ROLE = "data_a"
# Config fields (beyond the runner's: method, protocol, seed, folds, data, dedup) that decide
# which images land in which partition.
SPLIT_FIELDS = ("data_a", "data_b", "stage_a.enabled")


def extra_data(config) -> dict:
  """Data-A from sources of its own (config.data_a.data), e.g. the 64 px benchmark."""
  data_a = config.data_a.get("data")
  return {DATA_A_ROLE: data_a} if data_a else {}


def check(config) -> None:
  """Config errors a plan cannot recover from, found before anything is written."""
  if config.protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {config.protocol!r}; DETL's protocols: {PROTOCOLS}")
  if not config.stage_a.enabled and any(r == "freeze" for _, r in config.stage_b.param_rules):
    raise ValueError("stage_a.enabled=False with frozen stage-B layers would train a head on "
                     "random features; use the config arg init=scratch")


def sample_classes(labels, strata, classes, sizes, groups, rng, exclude=()) -> np.ndarray:
  """Whole patients per class up to `sizes[class]` images (0: all); a class made of strata
  (sub-classes) takes an equal share of each."""
  excluded = np.isin(groups, list(exclude))
  chosen = []
  for c, name in enumerate(classes):
    candidates = np.flatnonzero((labels == c) & ~excluded)
    kinds = sorted(set(strata[candidates]) - {""})
    want = int(sizes.get(name, 0))
    if not kinds:
      chosen.append(splits.sample_patients(candidates, groups, want, rng))
      continue
    for kind in kinds:
      chosen.append(splits.sample_patients(candidates[strata[candidates] == kind], groups,
                                           -(-want // len(kinds)) if want else 0, rng))
  return np.sort(np.concatenate(chosen))


def plan(meta: dict[str, np.ndarray], config) -> Plan:
  """Data-A, Data-B and the folds from metadata only, checked for patient leakage."""
  check(config)
  grouped = config.protocol == "corrected"
  rng = np.random.default_rng(seed(config.seed, 0))
  groups = meta["group"]
  task_a, task_b = tasks.get("data_a"), tasks.get(config.data_b.task)
  labels_a, strata_a = task_a.assign(meta)
  labels_b, strata_b = task_b.assign(meta)
  role = meta["role"]
  labels_a[role != (DATA_A_ROLE if config.data_a.get("data") else "")] = -1
  if config.data_a.sources:
    labels_a[~np.isin(meta["source"], config.data_a.sources.split(","))] = -1
  labels_b[role != ""] = -1
  # Every class needs images: an empty one stops here, saying where its rows went.
  tasks.check_classes(task_b, meta, role == "",
                      f"Data-B (data.source={config.data.source!r})")
  if config.stage_a.enabled:
    a_scope = role == (DATA_A_ROLE if config.data_a.get("data") else "")
    if config.data_a.sources:
      a_scope &= np.isin(meta["source"], config.data_a.sources.split(","))
    a_from = config.data_a.data.source if config.data_a.get("data") else config.data.source
    a_sources = f", data_a.sources={config.data_a.sources!r}" if config.data_a.sources else ""
    tasks.check_classes(task_a, meta, a_scope, f"Data-A (source={a_from!r}{a_sources})",
                        "Or give Data-A its own sources (--config.data_a.data, as "
                        "data=manifest,classes=3 does), or train without stage A "
                        "(init=scratch).")

  data_b = sample_classes(labels_b, strata_b, task_b.classes, config.data_b.images_per_class,
                          groups, rng)
  # Corrected: Data-A never contains a Data-B patient (the paper drew both from NIH).
  exclude = set(groups[data_b]) if grouped else ()
  stages = []
  if config.stage_a.enabled:
    data_a = sample_classes(labels_a, strata_a, task_a.classes, config.data_a.images_per_class,
                            groups, rng, exclude)
    empty = [c for i, c in enumerate(task_a.classes) if not np.any(labels_a[data_a] == i)]
    if empty:
      raise ValueError(f"Data-A has no {' or '.join(empty)} image left after Data-B took its "
                       "patients: stage A needs both classes. Give Data-A its own sources "
                       "(--config.data_a.data, as data=manifest,classes=3 does), lower "
                       "data_b.images_per_class, or train without stage A (init=scratch)")
    a_train, a_val = splits.carve(data_a, labels_a, groups, config.data_a.val_fraction,
                                  seed(config.seed, 1), grouped)
    if grouped:
      for ids in (groups, meta["patient_id"]):
        splits.check_disjoint_patients({"data_a_train": a_train, "data_a_val": a_val}, ids)
        splits.check_disjoint_patients({"data_a": data_a, "data_b": data_b}, ids)
    sa = config.stage_a
    stages.append(Stage(
        name="stage_a", classes=task_a.classes, labels=labels_a,
        phases=[Phase(a_train, sa.epochs)], val=a_val, optimizer=sa.optimizer,
        param_rules=((".*", "train"),), batch_size=sa.batch_size,
        eval_batch_size=sa.eval_batch_size, select="best", init="random", keras_init=True,
        init_seed=seed(config.seed, 10), seed=seed(config.seed, 11), augment=config.augment,
        description="from scratch on Data-A (normal vs disease)"))

  sb = config.stage_b
  evaluations = []
  for k, test in enumerate(splits.kfold(labels_b[data_b], groups[data_b], config.folds,
                                        seed(config.seed, 2), grouped)):
    test = data_b[test]
    rest = np.setdiff1d(data_b, test)
    if grouped:
      b_train, b_val = splits.carve(rest, labels_b, groups, config.data_b.val_fraction,
                                    seed(config.seed, 3, k), grouped)
      for ids in (groups, meta["patient_id"]):
        splits.check_disjoint_patients({"train": b_train, "val": b_val, "test": test}, ids)
    else:
      b_train, b_val = rest, np.array([], np.int64)
    name = f"fold{k}/stage_b"
    stages.append(Stage(
        name=name, classes=task_b.classes, labels=labels_b, phases=[Phase(b_train, sb.epochs)],
        val=b_val, optimizer=sb.optimizer, param_rules=tuple(sb.param_rules),
        batch_size=sb.batch_size, eval_batch_size=sb.eval_batch_size,
        select="best" if grouped else "last",
        init="stage" if config.stage_a.enabled else "random",
        init_from="stage_a" if config.stage_a.enabled else None,
        keras_init=not config.stage_a.enabled,
        init_seed=seed(config.seed, 20, k), seed=seed(config.seed, 21, k),
        augment=config.augment,
        description=("stage A's weights, new head, fine-tuned on Data-B"
                     if config.stage_a.enabled else "from scratch on Data-B (init=scratch)")))
    evaluations.append(Evaluation(fold=k, stage=name, test=test, protocol=config.protocol))

  notes = ["stage B keeps the weights of best validation accuracy (a split of the fold's "
           "training patients)" if grouped else
           "stage B keeps its last weights (the paper names no selection rule)"]
  return Plan(method=NAME, protocol=config.protocol, task=task_b.name, classes=task_b.classes,
              labels=labels_b,
              stages=stages, evaluations=evaluations, notes=notes,
              partitions={"data_b": data_b})

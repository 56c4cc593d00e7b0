"""Rahimzadeh & Attar 2020: Xception + ResNet50V2 concatenated, trained in phases.

One stage per fold: the network (or Xception / ResNet50V2 alone) trains on `phases.count`
phases of `phases.epochs` epochs on one optimizer state, from the start `config.init` names:

  keras: ImageNet weights from Keras files (config.model.init_from), as the paper;
  pretrain: our stand-in for ImageNet where no weight file can be had. A stage `pretrain`,
    trained once per run (not per fold), learns a larger related task (config.pretrain.task,
    by default which of five other findings a synthetic film shows) on images that no fold
    uses (patients of other classes; patients shared with the folds are left out); every
    fold's network starts from its weights with the head swapped. Its images are the
    synthetic films of the run's own build (data=synthetic) or of a synthetic build of their
    own (config.pretrain.data, the `pretrain` role). With config.model.init_from given it is
    skipped: the Keras weights start every fold.
  random: random weights (a control: how much the start matters).

Every phase shows the same minority images (`phases.shared`, -1: all of the class's training images; the paper's
149 COVID-19 and 34 pneumonia) and fresh, disjoint majority images (`phases.fresh`; the
paper's 250 normal and 200 pneumonia), whole patients at a time.

Samplers (config.phases.sampler):
  phased: the paper's phases.
  all: one phase on every training image of the fold (paper protocol: on the union of the
    fold's phases, the images the published scheme trains on), for as many images shown as
    the phases show together (rounded to whole epochs, at least one), so the comparison
    isolates the sampling from the budget.

Protocols (config.protocol):
  paper: the published scheme. Folds and phases come from the authors' lists
    (config.data.mr7495_dir, concat_splits.read_mr7495) or, without them, are built as the authors
    built them: image-level folds of the COVID-19 images, phases drawn from every other image
    (so folds overlap), and every image that no phase of the fold used is a test image (their
    11,302 per fold). The last weights are kept. The authors' code picked checkpoints on these
    test images; we do not, and the report says so.
  corrected: patient-grouped stratified folds (a true partition), duplicates removed before
    splitting, a validation split from the fold's training patients selects the checkpoint,
    phases are drawn from the remaining training patients, and the test set is the held-out
    patients only.
"""

from __future__ import annotations

import numpy as np

from xrayjax.data import splits, tasks
from xrayjax.methods import Evaluation, Phase, Plan, Stage, Table, concat_splits, seed

NAME = "Concat (Rahimzadeh & Attar)"
PROTOCOLS = ("corrected", "paper")
SAMPLERS = ("phased", "all")
INITS = ("random", "pretrain", "keras")
PRETRAIN = "pretrain"  # the stage's name and its data's cohort role

# Config fields (beyond the runner's: method, protocol, seed, folds, data, dedup) that decide
# which images land in which partition (phase epochs do not).
SPLIT_FIELDS = ("task", "val_fraction", "phases.sampler", "phases.count", "phases.fresh",
                "phases.shared", "init", "pretrain.task", "pretrain.data", "pretrain.val_fraction")


def pretrains(config) -> bool:
  """Whether the plan has the pretraining stage (init=pretrain without Keras files)."""
  return config.init == "pretrain" and not config.model.get("init_from")


def extra_data(config) -> dict:
  """The pretraining films' own synthetic build (config.pretrain.data), when they have one."""
  data = config.pretrain.get("data")
  return {PRETRAIN: data} if pretrains(config) and data else {}


def check(config) -> None:
  if config.protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {config.protocol!r}; this method's protocols: "
                     f"{PROTOCOLS}")
  if config.phases.sampler not in SAMPLERS:
    raise ValueError(f"unknown phases.sampler {config.phases.sampler!r}; valid: {SAMPLERS}")
  if config.init not in INITS:
    raise ValueError(f"unknown init {config.init!r}; valid: {INITS} (config arg init=)")
  if config.init == "keras" and not config.model.get("init_from"):
    raise ValueError("init=keras needs the ImageNet Keras files: --config.model.init_from="
                     "PATH/xception_..._notop.h5,PATH/resnet50v2_..._notop.h5 (for one "
                     "backbone, its file); without them use init=pretrain (our stand-in) or "
                     "init=random")
  if config.init == "random" and config.model.get("init_from"):
    raise ValueError("init=random with config.model.init_from: the Keras files would be "
                     "ignored; use init=keras to start from them")
  if config.phases.count < 1 or config.phases.epochs < 1:
    raise ValueError(f"phases.count ({config.phases.count}) and phases.epochs "
                     f"({config.phases.epochs}) must be >= 1")
  classes = tasks.get(config.task).classes
  for field in ("fresh", "shared"):
    unknown = sorted(set(config.phases[field]) - set(classes))
    if unknown:
      raise ValueError(f"phases.{field} names {', '.join(map(repr, unknown))}, not a class of "
                       f"task {config.task!r}: {list(classes)}")
  if (config.protocol == "paper" and not config.data.get("mr7495_dir")
      and not any(n < 0 for n in config.phases.shared.values())):
    raise ValueError("protocol=paper without the authors' lists splits the minority class "
                     "(phases.shared = -1, e.g. covid) into folds; no class has shared = -1: "
                     "set one, or give --config.data.mr7495_dir")


def _phases(train, labels, patients, classes, config, seed_) -> list[np.ndarray]:
  ph = config.phases
  return concat_splits.phases(train, labels, patients, classes, ph.count, dict(ph.fresh),
                       dict(ph.shared), seed_)


def _stage_phases(phased: list[np.ndarray], every: np.ndarray, config) -> list[Phase]:
  """The stage's phases for the configured sampler (see the module docstring)."""
  epochs = config.phases.epochs
  if config.phases.sampler == "phased":
    return [Phase(p, epochs) for p in phased]
  shown = sum(len(p) for p in phased) * epochs  # images the phases show in all
  return [Phase(every, max(1, round(shown / max(len(every), 1))))]


def plan(meta: dict[str, np.ndarray], config) -> Plan:
  check(config)
  task = tasks.get(config.task)
  labels, _ = task.assign(meta)
  labels[meta["role"] != ""] = -1
  # Every class needs images: an empty one stops here, saying where its rows went.
  tasks.check_classes(task, meta, meta["role"] == "", f"data.source={config.data.source!r}")
  rows = np.flatnonzero(labels >= 0)
  grouped = config.protocol == "corrected"
  groups = meta["group"] if grouped else meta["image_id"]
  folds, notes = [], []
  if config.protocol == "paper" and config.data.get("mr7495_dir"):
    listed = concat_splits.mr7495_plan(meta, config.data.mr7495_dir)
    if not listed["found"]:
      raise ValueError(f"none of the {listed['listed']} images listed in "
                       f"{config.data.mr7495_dir} is in the data (matched by file name "
                       f"without extension to image_id, e.g. "
                       f"{listed['missing_examples'][:3]}); give the RSNA and ieee8023 "
                       "sources the lists were made from")
    for f in listed["folds"][:config.folds]:
      phased = [p[labels[p] >= 0] for p in f["phases"]]
      folds.append({"phased": phased, "test": f["test"][labels[f["test"]] >= 0],
                    "val": np.zeros(0, np.int64)})
    notes.append(f"folds and phases from the authors' lists ({listed['found']} of "
                 f"{listed['listed']} listed images found)")
  elif config.protocol == "paper":
    # As the authors built them: the minority class is split into folds image by image; every
    # other image may go into any fold's phases, and the images no phase used are tested.
    minority = [c for c, n in config.phases.shared.items() if n < 0]
    minority_rows = rows[np.isin(labels[rows], [task.classes.index(c) for c in minority])]
    rest = np.setdiff1d(rows, minority_rows)
    for k, held in enumerate(splits.kfold(labels[minority_rows], groups[minority_rows],
                                          config.folds, seed(config.seed, 2), grouped=False)):
      pool = np.concatenate([np.setdiff1d(minority_rows, minority_rows[held]), rest])
      phased = _phases(pool, labels, groups, task.classes, config, seed(config.seed, 4, k))
      used = np.unique(np.concatenate(phased))
      folds.append({"phased": phased, "test": np.setdiff1d(rows, used),
                    "val": np.zeros(0, np.int64)})
    notes.append("folds built as the authors built them: image-level folds of "
                 f"{', '.join(minority)}; phases drawn from every other image, so folds "
                 "overlap; every image no phase used is a test image")
  else:
    for k, test in enumerate(splits.kfold(labels[rows], groups[rows], config.folds,
                                          seed(config.seed, 2), grouped=True)):
      test = rows[test]
      train, val = splits.carve(np.setdiff1d(rows, test), labels, groups, config.val_fraction,
                                seed(config.seed, 3, k), grouped=True)
      for ids in (groups, meta["patient_id"]):
        splits.check_disjoint_patients({"train": train, "val": val, "test": test}, ids)
      phased = _phases(train, labels, groups, task.classes, config, seed(config.seed, 4, k))
      folds.append({"phased": phased, "test": test, "val": val, "train": train})
  if grouped:
    select_on = config.train.get("select_on", "val_accuracy")  # (older run directories)
    what = {"val_accuracy": "accuracy",
            "val_balanced_accuracy": "balanced accuracy (the mean of the classes' recalls)"}
    notes.append(f"the checkpoint of best validation {what.get(select_on, select_on)}, on a "
                 "split of the fold's training patients, is evaluated")
  else:
    notes.append("the last weights are evaluated; the authors' code selected checkpoints on "
                 "the test images, which we do not do")
  notes.append(f"sampler {config.phases.sampler}: " + (
      f"{config.phases.count} phases of {config.phases.epochs} epochs on one optimizer state"
      if config.phases.sampler == "phased" else
      "one phase on every training image, as many images shown as the phases would show"))

  stages, evaluations = [], []
  t = config.train
  if pretrains(config):
    used = np.unique(np.concatenate([np.concatenate([*f["phased"], f["test"], f["val"]])
                                     for f in folds]))
    stages.append(_pretrain_stage(meta, config, used))
    notes.append(f"every fold starts from the weights of stage {PRETRAIN} (task "
                 f"{config.pretrain.task}, {len(stages[0].phases[0].train)} training images of "
                 "patients no fold uses; our stand-in for ImageNet) with the head swapped")
  elif config.model.get("init_from"):
    notes.append("every fold starts from the ImageNet Keras weights in config.model.init_from"
                 + (" (init=pretrain: with Keras files, no pretraining stage)"
                    if config.init == "pretrain" else ""))
  else:
    notes.append("every fold starts from random weights (init=random)")
  for k, f in enumerate(folds):
    every = f.get("train", np.unique(np.concatenate(f["phased"])))
    name = f"fold{k}/{config.model_name}"
    stages.append(Stage(
        name=name, classes=task.classes, labels=labels,
        phases=_stage_phases(f["phased"], every, config), val=f["val"],
        optimizer=t.optimizer, param_rules=((".*", "train"),), batch_size=t.batch_size,
        eval_batch_size=t.eval_batch_size, select="best" if grouped else "last",
        select_on=t.get("select_on", "val_accuracy"), init="stage" if pretrains(config) else "random",
        init_from=PRETRAIN if pretrains(config) else None,
        keras_init=not pretrains(config), init_seed=seed(config.seed, 20, k),
        seed=seed(config.seed, 21, k), augment=config.augment,
        description=f"{config.model_name}, sampler {config.phases.sampler}"))
    evaluations.append(Evaluation(fold=k, stage=name, test=f["test"], protocol=config.protocol))
  return Plan(method=NAME, protocol=config.protocol, task=task.name, classes=task.classes,
              labels=labels,
              stages=stages, evaluations=evaluations, notes=notes)


def _pretrain_stage(meta: dict[str, np.ndarray], config, used: np.ndarray) -> Stage:
  """The stand-in for ImageNet: config.pretrain.task on the pretraining films, without any
  patient (or duplicate group) of the folds' rows `used`; a patient-grouped validation split
  selects its weights."""
  p = config.pretrain
  task = tasks.get(p.task)
  labels, _ = task.assign(meta)
  scope = meta["role"] == (PRETRAIN if p.get("data") else "")
  labels[~scope] = -1
  where = (f"pretrain.data.source={p.data.source!r}" if p.get("data") else
           f"data.source={config.data.source!r}")
  tasks.check_classes(task, meta, scope, f"the {PRETRAIN} stage's films ({where})",
                      "Give the synthetic build other_disease patients (the third entry of "
                      "data.synthetic.patients or pretrain.data.synthetic.patients), or use "
                      "init=random.")
  groups = meta["group"]
  shared = np.isin(groups, groups[used]) | np.isin(meta["patient_id"], meta["patient_id"][used])
  rows = np.flatnonzero((labels >= 0) & ~shared)
  train, val = splits.carve(rows, labels, groups, p.val_fraction, seed(config.seed, 5),
                            grouped=True)
  for ids in (groups, meta["patient_id"]):
    splits.check_disjoint_patients({f"{PRETRAIN}/train": train, f"{PRETRAIN}/val": val,
                                    "folds": used}, ids)
  t = config.train
  return Stage(
      name=PRETRAIN, classes=task.classes, labels=labels, phases=[Phase(train, p.epochs)],
      val=val, optimizer=p.optimizer, param_rules=((".*", "train"),), batch_size=t.batch_size,
      eval_batch_size=t.eval_batch_size, select="best", init="random", keras_init=False,
      init_seed=seed(config.seed, 10), seed=seed(config.seed, 11), augment=config.augment,
      description=f"{config.model_name} from random weights on task {p.task} (the stand-in "
                  "for ImageNet)")


# --- the paper's Tables 3 and 4, beside the generic report ---------------------------------------

TABLE4 = (("sensitivity", "recall"), ("specificity", "specificity"),
          ("ppv", "precision"), ("accuracy", "accuracy"))


def detection_counts(confusion, classes) -> dict[str, dict[str, int]]:
  """Table 3 from a confusion matrix (rows = truth): per class, images correctly detected
  (TP), not detected (FN) and wrongly detected as the class (FP)."""
  cm = np.asarray(confusion)
  out = {}
  for c, name in enumerate(classes):
    tp = int(cm[c, c])
    out[name] = {"correct": tp, "not_detected": int(cm[c].sum()) - tp,
                 "wrongly_detected": int(cm[:, c].sum()) - tp}
  return out


def table3(results: dict) -> list[dict]:
  """Table 3 per fold and summed: per class correct / not detected / wrongly detected."""
  classes = results["classes"]
  rows = [{"fold": str(k), **detection_counts(m["confusion"], classes)}
          for k, m in enumerate(results["fold_metrics"])]
  rows.append({"fold": "sum", **detection_counts(results["across_folds"]["confusion_summed"],
                                                 classes)})
  return rows


def table4(results: dict) -> list[dict]:
  """Table 4 per fold and averaged: overall accuracy and per class recall, specificity,
  precision and one-vs-rest accuracy."""
  classes = results["classes"]
  rows = [{"fold": str(k), "accuracy": m["accuracy"],
           **{f"{c}/{label}": m["per_class"][c][key] for c in classes for key, label in TABLE4}}
          for k, m in enumerate(results["fold_metrics"])]
  agg = results["across_folds"]["metrics"]
  rows.append({"fold": "mean", "accuracy": agg["accuracy"]["mean"],
               **{f"{c}/{label}": agg[f"{c}/{key}"]["mean"] for c in classes
                  for key, label in TABLE4}})
  return rows


def tables(results: dict) -> list[Table]:
  """The paper's Tables 4 and 3 of a run (the report hook of methods.tables)."""
  classes = results["classes"]
  t3, t4 = table3(results), table4(results)
  mean, summed = t4[-1], t3[-1]
  pct = lambda v: "n/a" if v != v else f"{100 * v:.1f}%"
  count = lambda r, c: (f"{r[c]['correct']} / {r[c]['not_detected']} / "
                        f"{r[c]['wrongly_detected']}")
  return [
      Table(name="table4", title="Paper 2's Table 4: overall accuracy; per class recall, "
            "specificity, precision, one-vs-rest accuracy",
            header=list(t4[0]), rows=[[r["fold"]] + [pct(v) for k, v in r.items() if k != "fold"] for r in t4],
            csv=t4,
            summary=[f"paper 2's Table 4 (mean over folds): accuracy "
                     f"{100 * mean['accuracy']:.2f}%; per class recall / specificity / "
                     "precision / accuracy:"] +
            ["  {:<14} ".format(c) + " / ".join(f"{100 * mean[f'{c}/{label}']:.2f}%"
                                                for _, label in TABLE4) for c in classes]),
      Table(name="table3", title="Paper 2's Table 3: per class correct / not detected / "
            "wrongly detected", header=["fold"] + list(classes),
            rows=[[r["fold"]] + [count(r, c) for c in classes] for r in t3],
            csv=[{"fold": r["fold"], **{f"{c}/{k}": v for c in classes
                                        for k, v in r[c].items()}} for r in t3],
            summary=["paper 2's Table 3 (summed over folds): correct / not detected / wrongly "
                     "detected: " + "; ".join(f"{c} {count(summed, c)}" for c in classes)]),
  ]

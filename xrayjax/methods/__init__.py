"""Published methods as plans: metadata + config -> stages to train and evaluations to run.

A method module (one per paper: `detl.py`, `concat.py`) needs no JAX and does no I/O. It
exposes
  - `NAME`: what reports call it;
  - `extra_data(config) -> {role: data config}`: data it loads beside `config.data` (the
    cohort tags those rows with the role; e.g. DETL's Data-A from other sources);
  - `plan(meta, config) -> Plan`: every training stage and every evaluation, as row
    indices into the cohort's metadata table.

The runner (`experiment.py`), training, evaluation, the reports and `predict` read only the
plan, so a third method is one new module here and one config file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

INITS = ("random", "stage")
SELECTIONS = ("best", "last")
# What select="best" maximises on the validation split (train.py computes each per epoch).
SELECT_ON = ("val_accuracy", "val_balanced_accuracy")


@dataclasses.dataclass
class Phase:
  """A training index set shown for `epochs` epochs (paper 2: a subset of the majority
  classes per phase). All phases of a stage share one optimizer state."""
  train: np.ndarray
  epochs: int


def partition_name(stage: str, phase: int, phases: int) -> str:
  """The name of a stage's training partition (of phase `phase` of `phases`, from 0) in data
  summaries, plan.json and the run directory's checks."""
  return f"{stage}/train" + (f"_phase{phase + 1}" if phases > 1 else "")


def counts(rows: np.ndarray, labels: np.ndarray, classes) -> dict[str, int]:
  """Images of each class among `rows`."""
  return {c: int(np.sum(labels[rows] == i)) for i, c in enumerate(classes)}


@dataclasses.dataclass
class Stage:
  """One network trained once: everything `train.train_stage` needs, as plain data.

  Attributes:
    name: its directory under the run directory, e.g. "stage_a" or "fold2/stage_b".
    classes: class names of its head (label k is classes[k]).
    labels: class index per cohort row (-1: not in this stage's task).
    init: "random" (plus Keras files from config.model.init_from when `keras_init`) or
      "stage" (the weights of stage `init_from`, with this stage's head swapped in).
    init_from: the stage whose weights start this one (init="stage").
    keras_init: load config.model.init_from over the random initialisation.
    phases: the training index sets, in order.
    optimizer: config of optim.optimizer (name, lr, schedule, momentum).
    param_rules: (regex, "train"|"freeze") pairs (optim.param_labels).
    batch_size, eval_batch_size: global batch sizes.
    val: validation rows (empty: none).
    select: "best" validation score (`select_on`) or "last" weights.
    select_on: the validation score select="best" maximises: val_accuracy, or
      val_balanced_accuracy (the mean of the classes' recalls: a rare class counts as much
      as a common one).
    init_seed, seed: seeds of the random initialisation and of data order / augmentation /
      dropout.
    augment: augmentation config (pipeline.augment_ops).
    description: one line for reports.
  """
  name: str
  classes: tuple[str, ...]
  labels: np.ndarray
  phases: list[Phase]
  optimizer: Any
  param_rules: tuple
  batch_size: int
  eval_batch_size: int
  select: str
  init_seed: int
  seed: int
  augment: Any
  val: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  init: str = "random"
  init_from: str | None = None
  keras_init: bool = False
  description: str = ""
  select_on: str = "val_accuracy"

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"stage {self.name}: init {self.init!r} is not one of {INITS}")
    if self.select not in SELECTIONS:
      raise ValueError(f"stage {self.name}: select {self.select!r} is not one of {SELECTIONS}")
    if self.init == "stage" and not self.init_from:
      raise ValueError(f"stage {self.name}: init='stage' needs init_from")
    if self.select_on not in SELECT_ON:
      raise ValueError(f"stage {self.name}: select_on {self.select_on!r} is not one of "
                       f"{SELECT_ON}")
    if self.select == "best" and not len(self.val):
      raise ValueError(f"stage {self.name}: select='best' needs a validation split")
    bad = [j + 1 for j, p in enumerate(self.phases) if p.epochs < 1 or not len(p.train)]
    if not self.phases or bad:
      raise ValueError(f"stage {self.name}: every phase needs at least one epoch and one "
                       f"training image (phases {bad or 'none given'}); check the config's "
                       "epochs and data sizes")

  @property
  def epochs(self) -> int:
    return sum(p.epochs for p in self.phases)

  def partitions(self) -> dict[str, np.ndarray]:
    """The stage's training rows (per phase when it has several) and validation rows, by
    partition name."""
    out = {partition_name(self.name, j, len(self.phases)): p.train
           for j, p in enumerate(self.phases)}
    if len(self.val):
      out[f"{self.name}/val"] = self.val
    return out

  def rows(self) -> np.ndarray:
    """Every row the stage trains or validates on."""
    return np.unique(np.concatenate([p.train for p in self.phases] + [self.val]))


@dataclasses.dataclass
class Evaluation:
  """Stage `stage`'s model scored on `test` rows (fold `fold` of protocol `protocol`), in
  batches of `batch_size` (0: the stage's eval_batch_size)."""
  fold: int
  stage: str
  test: np.ndarray
  protocol: str
  batch_size: int = 0


@dataclasses.dataclass
class Plan:
  """What a method trains and evaluates, and what its reports must say.

  `stages` are in training order (a stage's `init_from` comes before it); `evaluations`
  are the folds whose predictions are pooled; `notes` are lines every report repeats
  (e.g. how the checkpoint was selected); `partitions` names extra row sets worth counting
  in the data summary (e.g. DETL's Data-A); `task` names the data/tasks.py task that
  `labels` (and an external test set's labels) come from.
  """
  method: str
  protocol: str
  task: str
  classes: tuple[str, ...]
  labels: np.ndarray
  stages: list[Stage]
  evaluations: list[Evaluation]
  notes: list[str] = dataclasses.field(default_factory=list)
  partitions: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def stage(self, name: str) -> Stage:
    for s in self.stages:
      if s.name == name:
        return s
    raise KeyError(f"the plan has no stage {name!r}; stages: {[s.name for s in self.stages]}")

  def check(self) -> None:
    """Stages come before the stages they initialise; evaluations name planned stages."""
    seen = set()
    for s in self.stages:
      if s.init == "stage" and s.init_from not in seen:
        raise ValueError(f"stage {s.name} starts from {s.init_from!r}, which is not planned "
                         "before it")
      seen.add(s.name)
    for e in self.evaluations:
      if e.stage not in seen:
        raise ValueError(f"evaluation of fold {e.fold} names unplanned stage {e.stage!r}")

  def partition_rows(self) -> dict[str, np.ndarray]:
    """Every partition of the plan by name: each stage's training rows (per phase when it
    has several) and validation rows, each fold's test rows, and `partitions`."""
    out = {name: rows for s in self.stages for name, rows in s.partitions().items()}
    for e in self.evaluations:
      out[f"fold{e.fold}/test"] = e.test
    return {**out, **self.partitions}

  def rows(self) -> np.ndarray:
    """Every row some partition of the plan holds."""
    return np.unique(np.concatenate(list(self.partition_rows().values())))

  def describe(self) -> dict:
    """JSON-ready plan: per stage its init, phases (images per class) and selection."""
    return {
        "method": self.method, "protocol": self.protocol, "task": self.task,
        "classes": list(self.classes),
        "notes": list(self.notes),
        "stages": [{"name": s.name, "classes": list(s.classes), "init": s.init,
                    "init_from": s.init_from, "keras_init": s.keras_init, "select": s.select,
                    "description": s.description, "epochs": s.epochs,
                    "eval_batch_size": s.eval_batch_size,
                    "phases": [{"epochs": p.epochs, **counts(p.train, s.labels, s.classes)}
                               for p in s.phases],
                    "val": counts(s.val, s.labels, s.classes)} for s in self.stages],
        "evaluations": [{"fold": e.fold, "stage": e.stage, "protocol": e.protocol,
                         "test": counts(e.test, self.labels, self.classes)}
                        for e in self.evaluations],
    }


def leave_out(plan: Plan, meta: dict, field: str, value: str) -> Plan:
  """`plan` trained without the images whose `field` (source, site) is `value`, and every
  fold's model tested on those images (the ones of classes it learnt elsewhere):
  leave-one-source-out. Folds keep their other training images."""
  column = np.asarray(meta[field]).astype(str)
  if value not in set(column):
    raise ValueError(f"config.audit.leave_out={field}:{value}: no image has {field} "
                     f"{value!r}; its values are {sorted(set(column))}")
  out = column == value
  for s in plan.stages:
    if any(not np.any(~out[p.train]) for p in s.phases) or (
        s.select == "best" and not np.any(~out[s.val])):
      raise ValueError(f"config.audit.leave_out={field}:{value}: stage {s.name} has no "
                       f"training or validation image left without {field} {value}; leave "
                       f"out another {field}")
  stages = [dataclasses.replace(
      s, phases=[dataclasses.replace(p, train=p.train[~out[p.train]]) for p in s.phases],
      val=s.val[~out[s.val]]) for s in plan.stages]
  held = np.flatnonzero(out & (plan.labels >= 0))
  by_name = {s.name: s for s in stages}
  evaluations = []
  for e in plan.evaluations:
    learnt = set(plan.labels[np.concatenate([p.train for p in by_name[e.stage].phases])])
    test = held[np.isin(plan.labels[held], sorted(learnt))]
    if not len(test):
      raise ValueError(f"config.audit.leave_out={field}:{value}: none of its images is of a "
                       f"class the fold-{e.fold} model learnt from the other {field}s")
    evaluations.append(dataclasses.replace(e, test=test))
  classes = sorted(set(plan.labels[evaluations[0].test]))
  note = (f"leave-one-{field}-out: trained without {field} {value} ({int(out.sum())} images); "
          f"every fold's model tested on its {len(evaluations[0].test)} images of "
          f"{', '.join(plan.classes[k] for k in classes)}")
  return dataclasses.replace(plan, stages=stages, evaluations=evaluations,
                             notes=plan.notes + [note])


@dataclasses.dataclass
class Table:
  """A method's own table of a run's results (its module's `tables(results)` returns them):
  written to `{results}_{name}.csv` (`csv` rows), shown in report.html under `title`
  (`header`, `rows` of display cells) and in the summary (`summary` lines)."""
  name: str
  title: str
  header: list[str]
  rows: list[list[str]]
  csv: list[dict]
  summary: list[str]


def tables(method: str, results: dict) -> list[dict]:
  """The method's own tables of `results` (JSON-ready; none when its module defines no
  `tables`)."""
  make = getattr(get(method), "tables", None)
  return [dataclasses.asdict(t) for t in make(results)] if make else []


def seed(*parts: int) -> int:
  """A 31-bit seed derived from integers (the run seed and a purpose code)."""
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % (2**31))


def get(name: str):
  """The method module registered as `name`."""
  from xrayjax.methods import concat, detl
  registry = {"detl": detl, "concat": concat}
  if name not in registry:
    raise ValueError(f"unknown method {name!r}; valid methods: {sorted(registry)}")
  return registry[name]

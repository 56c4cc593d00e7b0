"""External test sets: a trained run's fold models scored on another collection
(`--mode=eval --eval_data=SOURCE:PATH`), with every image their training data held left out."""

from __future__ import annotations

import os
import time

import numpy as np

from xrayjax import files, infer, methods, rundir, sharding
from xrayjax.data import sources, tasks
from xrayjax.data.cohort import Cohort
from xrayjax.evaluate import score


def evaluate(config, workdir: str, eval_data: str, eval_dir: str | None = None
                      ) -> dict:
  """Scores a trained run's fold models on another collection, as an external test set.

  `eval_data` is SOURCE:PATH (a manifest CSV, or a native source's directory). Every fold's
  model scores every image of the new data (pooled metrics average the folds'
  probabilities per image); images a model's training data held (same file content, image
  id or patient id) are left out and counted.
  """
  start = time.time()
  source, _, path = eval_data.partition(":")
  if source not in sources.SOURCES or source == "synthetic" or not path:
    raise ValueError(f"--eval_data={eval_data!r}: expected SOURCE:PATH with SOURCE one of "
                     f"{[s for s in sources.SOURCES if s != 'synthetic']} (a manifest CSV or "
                     "the source's directory)")
  if config.protocol == "both":
    raise ValueError("--eval_data scores one protocol's models: point --workdir at "
                     f"{workdir}/paper or {workdir}/corrected")
  for required in (rundir.SPLITS, rundir.PLAN):
    if not os.path.exists(os.path.join(workdir, required)):
      raise FileNotFoundError(f"{workdir} has no {required}: it is not a trained run directory")
  out_dir, note = rundir.eval_dir(workdir, eval_dir)
  if note:
    print(note, flush=True)
  mesh = sharding.make_mesh()
  saved = files.read_json(os.path.join(workdir, rundir.SPLITS))
  described = files.read_json(os.path.join(workdir, rundir.PLAN))
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    data.source = source
    if source == "manifest":
      data.manifest.path = path
    else:
      data[source].root = path
  cohort = Cohort.load(data, None, config.dedup.max_distance, drop_duplicates=False,
                       audit=config.audit)
  meta = cohort.meta
  if "task" not in described or "trained_sha1" not in saved:
    raise ValueError(f"{workdir} was trained by an older xrayjax, whose records lack what "
                     "--eval_data needs to keep the training images out (their hashes and "
                     "patients, the task); train the method again in a new --workdir")
  task = tasks.get(described["task"])
  labels, _ = task.assign(meta)
  trained_keys, trained_patients = set(), set()
  for s in saved["stages"].values():
    for part in s["phases"] + [s["val"]]:
      trained_keys |= set(part["keys"])
      trained_patients |= set(part["patients"])
  seen = {"same file content": np.isin(meta["file_sha1"], saved.get("trained_sha1", [])),
          "same image id": np.isin(meta["image_id"].astype(str), list(trained_keys)),
          "same patient id": np.isin(meta["patient_id"].astype(str), list(trained_patients))}
  overlap = np.any(list(seen.values()), axis=0)
  rows = np.flatnonzero((labels >= 0) & ~overlap)
  if not len(rows):
    raise ValueError(f"--eval_data={eval_data}: no image is both in task {task.name!r} "
                     f"(classes {task.classes}) and unseen by the run's models")
  notes = [f"external test set {eval_data}: {len(rows)} images scored by each fold's model "
           f"of {workdir} (trained on {config.data.source}); pooled metrics average the "
           "folds' probabilities per image"]
  left_out = {k: int(np.sum(v & (labels >= 0))) for k, v in seen.items() if np.any(v)}
  if left_out:
    notes.append("left out as possibly seen in training: " +
                 ", ".join(f"{n} with {k}" for k, n in left_out.items()))
  if np.any(labels < 0):
    notes.append(f"{int(np.sum(labels < 0))} images are not in task {task.name!r}")
  batch = {st["name"]: st.get("eval_batch_size", 32) for st in described["stages"]}
  plan = methods.Plan(
      method=described["method"], protocol="external", task=task.name, classes=task.classes,
      labels=labels, stages=[], notes=notes,
      evaluations=[methods.Evaluation(fold=e["fold"], stage=e["stage"], test=rows,
                                      protocol="external", batch_size=batch[e["stage"]])
                   for e in saved["evaluations"]])
  variables, stages = {}, []
  for e in plan.evaluations:
    variables[e.stage], summary = infer.restore(os.path.join(workdir, e.stage), e.stage)
    stages.append({"name": e.stage, "description": f"trained in {workdir}", **summary})
  return score.evaluate(config, cohort, plan, variables, stages, score.describe(cohort, plan),
                        out_dir, "external", mesh, start,
                        infer.model_builder(config.model_name, config.model, mesh),
                        f"the fold models of {workdir}")

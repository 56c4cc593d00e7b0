"""The runner: cohort -> the method's plan -> train its stages -> evaluate -> aggregate -> report.

It names no method. `config.method` picks a module of `xrayjax.methods`, which turns the
cohort's metadata and the config into a plan (stages to train, evaluations to run); this
module trains each stage in order (a finished stage is skipped, a killed one resumes),
scores each evaluation's test rows with its stage's model, pools the predictions, and writes
the run directory. `config.protocol="both"` runs the method under the paper's protocol and
the corrected one on the same data and model, and tabulates how much the published protocol
inflates each metric.
"""

from __future__ import annotations

import os
import time

import flax
import jax
import numpy as np
from absl import logging

from xrayjax import checks, compare, files, infer, methods, models, rundir, sharding, train
from xrayjax.data import regions
from xrayjax.data.cohort import Cohort
from xrayjax.evaluate import report, score, shortcuts

MODES = ("train", "eval")
BOTH = "both"
COMPARED = ("paper", "corrected")  # the protocols protocol="both" runs


def prepare(config, mesh=None) -> tuple[Cohort, methods.Plan]:
  """The cohort (sources loaded, duplicates handled as the protocol says) and the method's
  checked plan: everything a run decides before it trains. Every config error that can be
  found before training is raised here, before anything is written."""
  method = methods.get(config.method)
  method.check(config)
  checks.config_fields(config)
  cohort = Cohort.load(config.data, method.extra_data(config), config.dedup.max_distance,
                       drop_duplicates=config.protocol == "corrected", audit=config.audit)
  plan = method.plan(cohort.meta, config)
  if config.audit.leave_out:
    plan = methods.leave_out(plan, cohort.meta, *config.audit.leave_out.split(":", 1))
  if cohort.input_op:
    plan.notes.append(f"shortcut audit: the model trained and was tested on {config.audit.input}"
                      f" inputs ({cohort.input_op}, data/regions.py), not whole images")
    if cohort.input_op in regions.LUNG_OPS:
      rows = plan.rows()
      missing = int(np.sum(~cohort.masks(rows, 8)["has_lung"]))
      if missing:
        plan.notes.append(f"{missing} of {len(rows)} images have no lung mask: the fixed box "
                          f"config.audit.lung_box {tuple(config.audit.lung_box)} stood in "
                          "for their lungs")
  plan.check()
  checks.plan_sizes(config, plan, mesh or sharding.make_mesh())
  return cohort, plan


def run(config, workdir: str, mode: str = "train", allow_config_change: bool = False,
        retrain: tuple[str, ...] = (), eval_dir: str | None = None) -> dict:
  """Runs (or, with mode="eval", re-evaluates) the configured method in `workdir`.

  With config.protocol="both", runs it under each protocol in `workdir/paper` and
  `workdir/corrected` and writes the comparison (compare.json, compare.csv) to `workdir`.
  `retrain` names stages to train again (with the stages started from them); `eval_dir`
  is where mode="eval" writes (default: the run directory, or a temporary directory when
  it is read-only).
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; valid modes: {MODES}")
  out_dir = workdir
  if mode == "eval":
    out_dir, note = rundir.eval_dir(workdir, eval_dir)
    if note:
      logging.warning(note)
      print(note, flush=True)
  # One job writes into a run directory at a time (evaluations elsewhere go beside it).
  lock = rundir.hold(workdir) if out_dir == workdir else None
  try:
    if config.protocol == BOTH:
      return _run_both(config, workdir, mode, allow_config_change, retrain, out_dir)
    return _run_checked(config, workdir, mode, allow_config_change, retrain, out_dir,
                        _prepared(config, workdir))
  finally:
    if lock:
      lock.release()


def _prepared(config, workdir: str) -> tuple[Cohort, methods.Plan, bool]:
  """prepare(config) and the run directory checked against it (True: it has records)."""
  cohort, plan = prepare(config)
  return cohort, plan, rundir.check_run(workdir, config, cohort, plan)


def _run_both(config, workdir: str, mode: str, allow_config_change: bool,
              retrain: tuple[str, ...], out_dir: str) -> dict:
  subs = {}
  for protocol in COMPARED:
    subs[protocol] = config.copy_and_resolve_references()
    with subs[protocol].unlocked():
      subs[protocol].protocol = protocol
  # A data error of either protocol (e.g. an empty class), or a change of its data or splits,
  # stops the run before it writes.
  prepared = {p: _prepared(sub, os.path.join(workdir, p)) for p, sub in subs.items()}
  if mode == "train":  # so that --mode=eval finds the run's config here too
    os.makedirs(workdir, exist_ok=True)
    rundir.write_config(workdir, config, allow_config_change)
  results = {p: _run_checked(sub, os.path.join(workdir, p), mode, allow_config_change, retrain,
                             os.path.join(out_dir, p), prepared[p])
             for p, sub in subs.items()}
  table = report.compare_protocols(results["paper"], results["corrected"])
  name = "compare" if mode == "train" else "eval_compare"
  text = report.compare_text(table, results["paper"], results["corrected"])
  paired = None
  if jax.process_index() == 0:  # (it reads the predictions process 0 wrote)
    # The same images under both protocols, paired (python -m xrayjax.compare's test): what
    # training by the published scheme changes, apart from which images each one tests.
    runs = [compare.load(os.path.join(out_dir, p), "results" if mode == "train" else "eval",
                         os.path.join(workdir, p)) for p in ("corrected", "paper")]
    paired = compare.paired(*compare.on_shared_images(*runs), n_boot=config.eval.bootstrap,
                            seed=config.seed)
    text += ("\nOn the test images both protocols scored, paired (paper - corrected):\n" +
             compare.text([paired]))
    files.write_json(os.path.join(out_dir, f"{name}.json"), {"rows": table, "paired": paired})
    files.write_csv(os.path.join(out_dir, f"{name}.csv"), table)
    files.write_text(os.path.join(out_dir, f"{name}_summary.txt"), text + "\n")
  print(text, flush=True)
  return {"protocols": results, "compare": table, "paired": paired}


def _run_checked(config, workdir: str, mode: str, allow_config_change: bool,
                 retrain: tuple[str, ...], out_dir: str,
                 prepared: tuple[Cohort, methods.Plan, bool]) -> dict:
  """Runs one protocol of the configured method in `workdir` (see `run`), its cohort and
  plan prepared and the run directory checked against them; mode="eval" writes its results
  to `out_dir`."""
  start = time.time()
  mesh = sharding.make_mesh()
  cohort, plan, recorded = prepared
  if mode == "eval" and not recorded:
    raise FileNotFoundError(f"{workdir} has no {rundir.SPLITS}: it is not a trained run "
                            "directory (train it first, or check --workdir)")
  if mode == "train":
    os.makedirs(workdir, exist_ok=True)
    rundir.write_config(workdir, config, allow_config_change)
    rundir.write_records(workdir, config, cohort, plan, recorded)
    rundir.set_aside(workdir, plan, retrain)
  data_summary = score.describe(cohort, plan)
  logging.info("plan: %s", {k: v for k, v in data_summary["partitions"].items()})
  logging.info("duplicates: %s", cohort.duplicates["summary"])

  # --- train every stage, in order ---
  model_for = infer.model_builder(config.model_name, config.model, mesh)
  spec = models.spec(config.model_name)
  init_from = config.model.get(models.INIT_FROM)
  size = config.data.image_size
  variables, summaries = {}, {}
  for stage in plan.stages:
    if mode == "eval":  # the selected weights only: no optimizer, no training data
      variables[stage.name], summaries[stage.name] = infer.restore(
          os.path.join(workdir, stage.name), stage.name)
      continue
    model, _ = model_for(len(stage.classes))
    phases = []
    for j, p in enumerate(stage.phases):
      ds, how = cohort.partition_data(p.train, stage.labels, size, config.cache_budget_mb)
      logging.info("%s: %s", methods.partition_name(stage.name, j, len(stage.phases)), how)
      phases.append((ds, len(p.train)))
    val = None
    if len(stage.val):
      val, how = cohort.partition_data(stage.val, stage.labels, size, config.cache_budget_mb)
      logging.info("%s/val: %s", stage.name, how)
    data = train.StageData(phases=phases, val=val, num_val=len(stage.val))
    try:
      variables[stage.name], summaries[stage.name] = train.train_stage(
          stage=stage, model=model,
          init_variables=train.initial_variables(stage, model, spec, size, variables, init_from),
          groups=spec.PARAM_GROUPS, data=data, ckpt_dir=os.path.join(workdir, stage.name),
          mesh=mesh, log_every=config.log_every,
          tb_dir=os.path.join(workdir, "tensorboard", stage.name),
          checkpoint_every_steps=config.get("checkpoint_every_steps", 0))
    except FloatingPointError as e:
      fields = [k for k in flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
                if k.endswith(".lr") and k.split(".")[0] in ("train", stage.name.split("/")[-1])]
      raise FloatingPointError(f"{e} Learning-rate fields of this config: "
                               f"{', '.join('--config.' + f for f in fields) or 'none found'}."
                               ) from None

  stages = [{"name": s.name, "description": s.description, **summaries[s.name]}
            for s in plan.stages]
  variants = {}
  for name, sub in shortcuts.audit_variants(config, cohort.meta, plan).items():
    sub_dir = os.path.join(workdir, "audit", name)
    r = _run_checked(sub, sub_dir, mode, allow_config_change, (),
                     os.path.join(out_dir, "audit", name), _prepared(sub, sub_dir))
    variants[name] = {"accuracy": r["pooled"]["accuracy"],
                      "macro_auroc": r["pooled"]["macro_auroc"],
                      "auroc": {c: r["pooled"]["per_class"][c]["auroc"] for c in r["classes"]},
                      "images": r["num_images"], "workdir": sub_dir}
  return score.evaluate(config, cohort, plan, variables, stages, data_summary, out_dir,
                        "results" if mode == "train" else "eval", mesh, start, model_for,
                        train.describe_starts(plan.stages, init_from), variants)

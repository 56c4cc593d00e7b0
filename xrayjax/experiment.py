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
import jax.numpy as jnp
import numpy as np
from absl import logging

from xrayjax import compare, files, infer, methods, models, rundir, sharding, train
from xrayjax.data import regions, sources, tasks
from xrayjax.data.cohort import Cohort
from xrayjax.evaluate import audit, html, shortcuts
from xrayjax.evaluate import metrics as metrics_lib
from xrayjax.evaluate import report
from xrayjax.models import keras_weights

MODES = ("train", "eval")
BOTH = "both"
COMPARED = ("paper", "corrected")  # the protocols protocol="both" runs


# --- data summary -----------------------------------------------------------------------------


def describe(cohort: Cohort, plan: methods.Plan) -> dict:
  """Counts per class of every partition of the plan, the evaluated images per source and
  site, and test patients a model of the plan saw in training."""
  meta = cohort.meta

  def counts(rows, labels, classes):
    return {c: int(np.sum(labels[rows] == i)) for i, c in enumerate(classes)}

  # A stage's partitions count its own classes; tests and the plan's extras the plan's.
  stage_of = {name: s for s in plan.stages for name in (f"{s.name}/train", f"{s.name}/val")}
  partitions = {}
  for name, rows in plan.partition_rows().items():
    s = stage_of.get(name.rsplit("_phase", 1)[0])
    partitions[name] = (counts(rows, s.labels, s.classes) if s else
                        counts(rows, plan.labels, plan.classes))
  evaluated = np.unique(np.concatenate([e.test for e in plan.evaluations]))
  out = {"partitions": partitions, "evaluated": counts(evaluated, plan.labels, plan.classes)}
  for key in ("site", "source"):
    values = meta[key][evaluated]
    out[f"evaluated_label_by_{key}"] = {
        v: counts(evaluated[values == v], plan.labels, plan.classes) for v in sorted(set(values))}
  # Leakage: test patients whose images trained the evaluated model or a stage it started from.
  seen_total = 0
  for e in plan.evaluations:
    trained, name = set(), e.stage
    while name in {s.name for s in plan.stages}:  # (an external test set plans no stage)
      stage = plan.stage(name)
      trained |= set(meta["patient_id"][stage.rows()])
      name = stage.init_from if stage.init == "stage" else None
    seen_total += len(set(meta["patient_id"][e.test]) & trained)
  out["test_patients_seen_in_training"] = seen_total
  out["evaluated_images"] = int(len(evaluated))
  out["evaluated_patients"] = int(len(set(meta["patient_id"][evaluated])))
  return out


def warnings(config, data_summary: dict) -> list[str]:
  """What a reader of the results must know about how far to trust them."""
  out = []
  if "synthetic" in str(config.data.source) and config.data.synthetic.site_confounding > 0:
    out.append(f"the data are site-confounded (site_confounding="
               f"{config.data.synthetic.site_confounding}): site markers and exposure curves "
               "predict the label, so these scores may measure a shortcut")
  for name, share in source_confounded(data_summary["evaluated_label_by_site"]).items():
    out.append(f"label and source are confounded: {100 * share:.0f}% of the evaluated {name} "
               f"images come from sources where {name} makes up at least 80% of the images, so "
               "a model can score by recognising the source")
  if data_summary["test_patients_seen_in_training"]:
    out.append(f"{data_summary['test_patients_seen_in_training']} (fold, test patient) pairs "
               "had images in the training data of the model that scored them (paper "
               "protocol): those scores are not held out")
  return out


def source_confounded(label_by_site: dict[str, dict[str, int]],
                      threshold: float = 0.8) -> dict[str, float]:
  """Classes whose images mostly (>= threshold) come from sites they dominate (>= threshold)."""
  out = {}
  classes = {c for counts in label_by_site.values() for c in counts}
  for c in sorted(classes):
    total = sum(counts.get(c, 0) for counts in label_by_site.values())
    dominated = sum(counts.get(c, 0) for counts in label_by_site.values()
                    if counts.get(c, 0) >= threshold * sum(counts.values()))
    if total and dominated / total >= threshold:
      out[c] = dominated / total
  return out


# --- stages -----------------------------------------------------------------------------------


def transfer(source, target, head_layer: str):
  """`target` variables with every layer but `head_layer` taken from `source` (a head swap).

  Both are {"params", "batch_stats"} collections; BatchNorm statistics move with their layers.
  """
  src = flax.traverse_util.flatten_dict(source, sep="/")
  out = {}
  for path, value in flax.traverse_util.flatten_dict(target, sep="/").items():
    if path.split("/")[1] == head_layer:
      out[path] = value
      continue
    if path not in src or src[path].shape != value.shape:
      found = src[path].shape if path in src else "missing"
      raise ValueError(f"cannot transfer weights between stages: {path} expects {value.shape}, "
                       f"the earlier stage has {found}; both stages must use the same model "
                       "config")
    out[path] = src[path]
  return flax.traverse_util.unflatten_dict(out, sep="/")


def init_variables(model, image_size: int, seed: int, init_from: str | None = None,
                   spec=None) -> dict:
  """{"params", "batch_stats"} of `model` for 1-channel images: random, or Keras weights.

  `init_from` (config.model.init_from): Keras weight files (comma separated) to load over the
  random initialisation (see models/keras_weights.py); `spec` is the model's module.
  """
  dummy = np.zeros((1, image_size, image_size, 1), np.float32)
  variables = jax.jit(lambda k: train.variables_of(model.init({"params": k}, dummy,
                                                              train=False)))(
      jax.random.PRNGKey(seed))
  if init_from:
    variables = keras_weights.load(init_from, jax.device_get(variables), spec)
  return variables


def initialisation(config, plan: methods.Plan) -> str:
  """Where every stage's weights start, for reports (stages with one start named together)."""
  files_ = config.model.get(models.INIT_FROM)
  starts: dict[str, list[str]] = {}
  for s in plan.stages:
    if s.init == "stage":
      how = f"{s.init_from}'s weights, head swapped"
    elif s.keras_init and files_:
      how = f"Keras weights {files_}"
    else:
      how = "random"
    starts.setdefault(how, []).append(s.name)
  return "; ".join(f"{names[0] if len(names) == 1 else f'{names[0]} .. {names[-1]}'}: {how}"
                   for how, names in starts.items())


# --- shortcut audit: retrained variants -------------------------------------------------------

RETRAIN = ("border", "centre", "lungs", "no_lungs", "loso")


def retrain_names(config) -> list[str]:
  return [n.strip() for n in str(config.audit.retrain).split(",") if n.strip()]


def audit_variants(config, meta: dict, plan: methods.Plan) -> dict:
  """{subdirectory: config} of the runs config.audit.retrain asks for: the method on masked
  inputs (input_<input>), and leave-one-source-out (loso_<field>_<value>: one per source,
  or per site where there is one source, holding a class that other sources hold too).
  A variant's own report carries no Grad-CAM, perturbations or probes."""
  if config.audit.input != "full" or config.audit.leave_out:
    return {}
  out = {}
  for name in retrain_names(config):
    if name != "loso":
      out[f"input_{name}"] = {"input": name}
      continue
    rows = plan.rows()
    rows = rows[plan.labels[rows] >= 0]
    field = shortcuts.group_field(meta, rows)
    column = np.asarray(meta[field][rows]).astype(str)
    for value in sorted(set(column)):
      if set(plan.labels[rows][column == value]) & set(plan.labels[rows][column != value]):
        out[f"loso_{field}_{value}"] = {"leave_out": f"{field}:{value}"}
  configs = {}
  for name, audit_fields in out.items():
    sub = config.copy_and_resolve_references()
    with sub.unlocked():
      sub.audit.update(retrain="", perturb=False, probes=False, **audit_fields)
      sub.eval.gradcam.enabled = False
    configs[name] = sub
  return configs


# --- run --------------------------------------------------------------------------------------


def check_workdir_config(workdir: str, config, allow_change: bool) -> None:
  """Refuses to reuse a workdir whose saved config differs (unless allowed)."""
  path = os.path.join(workdir, "config.json")
  current = config.to_dict()
  if os.path.exists(path):
    saved = files.read_json(path)
    diffs = rundir.diff(flax.traverse_util.flatten_dict(saved, sep="."),
                  flax.traverse_util.flatten_dict(rundir.plain(current), sep="."))
    if diffs and not allow_change:
      raise ValueError(
          f"{workdir} holds a run with a different config; differing fields:\n  "
          + "\n  ".join(diffs)
          + "\nUse a new --workdir, or pass --allow_config_change to resume with the new "
            "config (finished stages are kept as they are).")
    if diffs:
      logging.warning("config changed in %s: %s", workdir, "; ".join(diffs))
      if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, f"config.{int(time.time())}.json"), saved)
  if jax.process_index() == 0:
    files.write_json(path, rundir.plain(current))


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
  lock = hold(workdir) if out_dir == workdir else None
  try:
    return _run(config, workdir, mode, allow_config_change, retrain, out_dir)
  finally:
    if lock:
      lock.release()


def hold(workdir: str) -> rundir.RunLock:
  """The run directory's lock, taken by process 0 for the whole job (every process raises
  LockedError when another job holds it)."""
  lock, error = rundir.RunLock(workdir), ""
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except rundir.LockedError as e:
      error = str(e)
  error = sharding.from_process_0(f"lock {workdir}", error)
  if error:
    raise rundir.LockedError(error)
  if lock.stale:
    logging.warning(lock.stale)
  return lock


def _run(config, workdir: str, mode: str, allow_config_change: bool, retrain: tuple[str, ...],
         out_dir: str) -> dict:
  if config.protocol != BOTH:
    return run_protocol(config, workdir, mode, allow_config_change, retrain, out_dir)
  subs = {}
  for protocol in COMPARED:
    subs[protocol] = config.copy_and_resolve_references()
    with subs[protocol].unlocked():
      subs[protocol].protocol = protocol
    methods.get(config.method).check(subs[protocol])
  # A data error of either protocol (e.g. an empty class), or a change of its data or splits,
  # stops the run before it writes.
  prepared = {protocol: prepare(sub) for protocol, sub in subs.items()}
  for protocol, sub in subs.items():
    rundir.check(os.path.join(workdir, protocol), *records(sub, *prepared[protocol]),
                 _eval_data_hint(sub))
  if mode == "train":  # so that --mode=eval finds the run's config here too
    os.makedirs(workdir, exist_ok=True)
    check_workdir_config(workdir, config, allow_config_change)
  results = {protocol: run_protocol(sub, os.path.join(workdir, protocol), mode,
                                    allow_config_change, retrain,
                                    os.path.join(out_dir, protocol), prepared[protocol])
             for protocol, sub in subs.items()}
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


def prepare(config, mesh=None) -> tuple[Cohort, methods.Plan]:
  """The cohort (sources loaded, duplicates handled as the protocol says) and the method's
  checked plan: everything a run decides before it trains. Every config error that can be
  found before training is raised here, before anything is written."""
  method = methods.get(config.method)
  method.check(config)
  check_config(config)
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
  check_plan(config, plan, mesh or sharding.make_mesh())
  return cohort, plan


def check_config(config) -> None:
  """Config values no plan can repair: named with the field and what is valid."""
  for field in ("log_every", "folds"):
    if int(config.get(field, 1)) < 1:
      raise ValueError(f"config.{field}={config[field]} must be >= 1")
  if int(config.get("checkpoint_every_steps", 0)) < 0:
    raise ValueError(f"config.checkpoint_every_steps={config.checkpoint_every_steps} must be "
                     ">= 0 (0: about every 10 minutes)")
  models.spec(config.model_name)  # an unknown model is named with the valid ones
  a = config.audit
  if a.input not in regions.INPUTS:
    raise ValueError(f"config.audit.input={a.input!r}; valid: {list(regions.INPUTS)}")
  field, _, value = a.leave_out.partition(":")
  if a.leave_out and (field not in ("source", "site") or not value):
    raise ValueError(f"config.audit.leave_out={a.leave_out!r}: expected FIELD:VALUE with FIELD "
                     "source or site, e.g. source:ieee8023")
  unknown = [n for n in retrain_names(config) if n not in RETRAIN]
  if unknown:
    raise ValueError(f"config.audit.retrain: unknown {unknown}; valid: {list(RETRAIN)} "
                     "(comma separated)")
  for key in ("centre", "corner", "top_crop"):
    if not 0 < a[key] < 1:
      raise ValueError(f"config.audit.{key}={a[key]} must be a fraction of the image side, "
                       "between 0 and 1")
  for path in str(config.model.get(models.INIT_FROM) or "").split(","):
    if path.strip() and not os.path.exists(os.path.expanduser(path.strip())):
      raise FileNotFoundError(f"config.model.{models.INIT_FROM}: {path.strip()} does not exist "
                              "(Keras weight files, comma separated; see README)")


def check_plan(config, plan: methods.Plan, mesh) -> None:
  """What only the plan knows: classes, batch sizes against the devices and the images,
  and the input size against the model."""
  if not plan.classes:
    raise ValueError(f"the plan of {config.method} has no classes; check the task")
  for s in plan.stages:
    if not s.classes:
      raise ValueError(f"stage {s.name} has no classes; check the task")
    sharding.check_batch_size(s.batch_size, mesh, f"[{s.name}] batch_size")
    sharding.check_batch_size(s.eval_batch_size, mesh, f"[{s.name}] eval_batch_size")
    for j, p in enumerate(s.phases):
      if len(p.train) < s.batch_size:
        which = f" of phase {j + 1}" if len(s.phases) > 1 else ""
        raise ValueError(f"[{s.name}] training set{which} has {len(p.train)} images, fewer "
                         f"than one batch of {s.batch_size}; lower the stage's batch_size in "
                         "the config or add data")
  check_image_size(config.model_name, config.model, config.data.image_size)


def check_image_size(model_name: str, model_config, image_size: int) -> None:
  """Raises unless `model_name` keeps a feature map of at least 1x1 at `image_size`."""
  def fits(size):
    model = models.build(model_name, 2, model_config)
    try:
      shapes = jax.eval_shape(lambda: model.init_with_output(
          {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, size, size, 1)), train=False)[0])
    except (ValueError, TypeError, ZeroDivisionError):
      return False
    return all(d >= 1 for leaf in jax.tree.leaves(shapes) for d in leaf.shape)

  if fits(image_size):
    return
  low, high = image_size, 1024
  if not fits(high):
    raise ValueError(f"model {model_name} does not run at data.image_size={image_size}")
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (low, mid) if fits(mid) else (mid, high)
  raise ValueError(f"data.image_size={image_size} is below the minimum input of model "
                   f"{model_name} ({high} px): its feature maps would be empty. Set "
                   f"--config.data.image_size to at least {high}")


def run_protocol(config, workdir: str, mode: str = "train", allow_config_change: bool = False,
                 retrain: tuple[str, ...] = (), out_dir: str | None = None,
                 prepared: tuple | None = None) -> dict:
  """Runs one protocol of the configured method in `workdir` (see `run`); mode="eval"
  writes its results to `out_dir`."""
  start = time.time()
  mesh = sharding.make_mesh()
  spec = models.spec(config.model_name)
  image_size = config.data.image_size
  out_dir = out_dir or workdir

  # --- cohort and plan (a config or data error stops the run before it writes anything) ---
  cohort, plan = prepared or prepare(config, mesh)
  current, record = records(config, cohort, plan)
  recorded = rundir.check(workdir, current, record, _eval_data_hint(config))
  if mode == "eval" and not recorded:
    raise FileNotFoundError(f"{workdir} has no {rundir.SPLITS}: it is not a trained run "
                            "directory (train it first, or check --workdir)")
  if mode == "train":
    os.makedirs(workdir, exist_ok=True)
    check_workdir_config(workdir, config, allow_config_change)
    if jax.process_index() == 0:  # one writer on a shared file system; records never change
      if not recorded:
        files.write_json(os.path.join(workdir, rundir.SPLITS), record)
      if not os.path.exists(os.path.join(workdir, rundir.FINGERPRINT)):
        files.write_json(os.path.join(workdir, rundir.FINGERPRINT), current)
      files.write_json(os.path.join(workdir, "plan.json"), plan.describe())
      files.write_json(os.path.join(workdir, "duplicates.json"), cohort.duplicates)
    set_aside(workdir, plan, retrain)
  data_summary = describe(cohort, plan)
  logging.info("plan: %s", {k: v for k, v in data_summary["partitions"].items()})
  logging.info("duplicates: %s", cohort.duplicates["summary"])

  # --- train every stage, in order ---
  model_for = _model_cache(config, mesh)
  variables, summaries = {}, {}
  for stage in plan.stages:
    if mode == "eval":  # the selected weights only: no optimizer, no training data
      variables[stage.name], summaries[stage.name] = infer.restore(
          os.path.join(workdir, stage.name), stage.name)
      continue
    model, _ = model_for(len(stage.classes))
    if stage.init == "stage":
      init = transfer(variables[stage.init_from],
                      init_variables(model, image_size, stage.init_seed), spec.HEAD_LAYER)
    else:
      init = init_variables(model, image_size, stage.init_seed,
                            config.model.get(models.INIT_FROM) if stage.keras_init else None,
                            spec)
    data = train.StageData(
        phases=[(cohort.dataset(p.train, stage.labels, image_size), len(p.train))
                for p in stage.phases],
        val=cohort.dataset(stage.val, stage.labels, image_size) if len(stage.val) else None,
        num_val=len(stage.val))
    try:
      variables[stage.name], summaries[stage.name] = train.train_stage(
          stage=stage, model=model, init_variables=init, groups=spec.PARAM_GROUPS, data=data,
          ckpt_dir=os.path.join(workdir, stage.name), mesh=mesh, log_every=config.log_every,
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
  for name, sub in audit_variants(config, cohort.meta, plan).items():
    r = run_protocol(sub, os.path.join(workdir, "audit", name), mode, allow_config_change,
                     out_dir=os.path.join(out_dir, "audit", name))
    variants[name] = {"accuracy": r["pooled"]["accuracy"],
                      "macro_auroc": r["pooled"]["macro_auroc"],
                      "auroc": {c: r["pooled"]["per_class"][c]["auroc"] for c in r["classes"]},
                      "images": r["num_images"], "workdir": os.path.join(workdir, "audit", name)}
  return evaluate(config, cohort, plan, variables, stages, data_summary, out_dir,
                  "results" if mode == "train" else "eval", mesh, start,
                  warnings(config, data_summary), model_for, initialisation(config, plan),
                  variants)


def evaluate(config, cohort: Cohort, plan: methods.Plan, variables: dict, stages: list[dict],
             data_summary: dict, out_dir: str, name: str, mesh, start: float,
             warns: list[str], model_for, init: str, variants: dict | None = None) -> dict:
  """Scores every evaluation of `plan` with its stage's variables (and, for the shortcut
  audit, every test image again under each perturbation), pools, audits, and writes the
  results named `name` (results, eval, external) with their report to `out_dir`.
  `variants`: the audit's retrained runs (audit_variants)."""
  spec = models.spec(config.model_name)
  image_size = config.data.image_size
  classes = plan.classes
  prevalences = tuple(config.eval.prevalences)
  explain = config.eval.gradcam.enabled and jax.process_count() == 1
  if config.eval.gradcam.enabled and not explain:
    logging.warning("Grad-CAM runs in single-process jobs only; this %d-process run skips it "
                    "(re-run --mode=eval on one host for the maps)", jax.process_count())
  fold_metrics, predictions, explained = [], [], []
  scored: dict[str, list] = {}  # the audit's perturbations, over all evaluations
  meta = cohort.meta
  for e in plan.evaluations:
    model, predict_fn = model_for(len(classes))  # evaluated models output the plan's classes
    test_ds = cohort.dataset(e.test, plan.labels, image_size)
    batch_size = e.batch_size or plan.stage(e.stage).eval_batch_size
    probs, labels, index = infer.predict(predict_fn, variables[e.stage], test_ds, len(e.test),
                                         batch_size, mesh)
    masks = (cohort.masks(e.test, image_size) if explain or config.audit.perturb else None)
    if config.audit.perturb:
      for op in regions.OPS:
        scored.setdefault(op, []).append(infer.predict(
            predict_fn, variables[e.stage], regions.apply(test_ds, op, config.audit, masks),
            len(e.test), batch_size, mesh)[0])
      for key, value in (("none", probs), ("labels", labels), ("has_lung", masks["has_lung"])):
        scored.setdefault(key, []).append(value)
    m = metrics_lib.classification(labels, probs, classes, prevalences)
    fold_metrics.append(m)
    logging.info("[fold%d] test accuracy %.4f, macro F1 %.4f", e.fold, m["accuracy"],
                 m["macro_f1"])
    if explain:
      explained.append(audit.explain_fold(
          model=model, variables=jax.device_get(variables[e.stage]), ds=test_ds,
          num_examples=len(e.test), labels=labels, masks=masks,
          classes=classes, cfg=config.eval.gradcam, groups=spec.PARAM_GROUPS,
          out_dir=os.path.join(out_dir, "gradcam" if name != "external" else "external_gradcam"),
          names=meta["image_id"][e.test], fold=e.fold, seed=methods.seed(config.seed, 30, e.fold),
          sanity=e.fold < config.eval.gradcam.sanity_folds, mesh=mesh))
    for i, r in enumerate(e.test[index]):
      predictions.append({"fold": e.fold, "image_id": meta["image_id"][r],
                          "patient_id": meta["patient_id"][r], "source": meta["source"][r],
                          "site": meta["site"][r],
                          "label": classes[labels[i]], "prediction": classes[probs[i].argmax()],
                          **{f"p_{c}": float(probs[i, j]) for j, c in enumerate(classes)}})

  # --- aggregate and report ---
  pooled = metrics_lib.per_image(predictions, classes)
  if len(pooled) < len(predictions):
    plan.notes.append(f"test sets overlap across folds ({len(predictions)} predictions of "
                      f"{len(pooled)} images): pooled metrics average each image's "
                      "probabilities over the folds that tested it")
  pooled_results = pooled_metrics(config, pooled, classes, prevalences)
  shortcut_audit = shortcuts.audit(
      config, cohort, plan, pooled, pooled_results["pooled"],
      {k: np.concatenate(v) for k, v in scored.items()}, variants or {})
  results = {
      "method": plan.method, "protocol": plan.protocol, "model": config.model_name,
      "data": f"{config.data.source}", "classes": list(classes),
      "initialisation": init,
      "notes": plan.notes, "stages": stages,
      "num_images": data_summary["evaluated_images"],
      "num_patients": data_summary["evaluated_patients"],
      "data_summary": data_summary, "warnings": warns,
      "build_reports": cohort.build_reports(),
      "duplicates": {**cohort.duplicates["summary"], "applied": cohort.duplicates["applied"]},
      "per_source": metrics_lib.per_group(pooled, "source", classes),
      **pooled_results,
      "shortcuts": shortcut_audit,
      "gradcam": audit.summarise(explained) if explained else None,
      "gradcam_targets": {t: audit.summarise([r["targets"][t] for r in explained])
                          for t in (explained[0]["targets"] if explained else {})},
      "gradcam_folds": [{k: v for k, v in r.items()
                         if k != "targets" and not isinstance(v, np.ndarray)}
                        for r in explained],
      "fold_metrics": fold_metrics, "across_folds": metrics_lib.across_folds(fold_metrics),
      "seconds": time.time() - start, "devices": jax.device_count(),
  }
  results["table3"], results["table4"] = report.table3(results), report.table4(results)
  text = report.summary_text(results)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    report.write(out_dir, results, predictions, name)
    html.write(out_dir, results, pooled, rundir.plain(config.to_dict()),
               {"results": "report", "eval": "eval_report"}.get(name, f"{name}_report"))
    files.write_text(os.path.join(out_dir, f"{name}_summary.txt"), text + "\n")
  print(text, flush=True)
  return results


def records(config, cohort: Cohort, plan: methods.Plan) -> tuple[dict, dict]:
  """What a run directory records about its data and splits (rundir.check's arguments):
  ({"split_config", "data"}, the splits record)."""
  method = methods.get(config.method)
  # What the model sees and which images it leaves out decide its data too (recorded only
  # when set, so run directories from before the audit existed still match).
  fields = method.SPLIT_FIELDS
  if config.audit.input != "full" or config.audit.leave_out:
    fields += ("audit.input", "audit.leave_out", "audit.centre", "audit.lung_box")
  current = {"split_config": rundir.split_config(config, fields),
             "data": rundir.data_fingerprint(cohort)}
  return current, rundir.splits_record(cohort, plan)


def _eval_data_hint(config) -> str:
  source = str(config.data.source)
  if "," in source or source not in sources.SOURCES or source == "synthetic":
    return ""
  return f" (e.g. {source}:<its new path>)"


def set_aside(workdir: str, plan: methods.Plan, names: tuple[str, ...]) -> list[str]:
  """Moves the directories of the stages `names` and of every stage started from them to
  `<dir>.replaced-<time>` (kept, not deleted), so they train again. Returns what moved."""
  if not names:
    return []
  known = [s.name for s in plan.stages]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"--retrain: no stage {unknown} in this run; its stages are {known}")
  chosen = set(names)
  for s in plan.stages:  # in training order, so dependents of dependents are found
    if s.init == "stage" and s.init_from in chosen:
      chosen.add(s.name)
  moved = []
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for s in plan.stages:
    path = os.path.join(workdir, s.name)
    if s.name in chosen and os.path.exists(path):
      if jax.process_index() == 0:
        os.replace(path, f"{path}.replaced-{stamp}")
      moved.append(s.name)
  sharding.barrier("retrain")
  logging.warning("--retrain: training %s again (old directories kept as *.replaced-%s)",
                  ", ".join(sorted(chosen)), stamp)
  return moved


# --- external test sets -----------------------------------------------------------------------


def evaluate_external(config, workdir: str, eval_data: str, eval_dir: str | None = None
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
  if config.protocol == BOTH:
    raise ValueError("--eval_data scores one protocol's models: point --workdir at "
                     f"{workdir}/paper or {workdir}/corrected")
  for required in (rundir.SPLITS, "plan.json"):
    if not os.path.exists(os.path.join(workdir, required)):
      raise FileNotFoundError(f"{workdir} has no {required}: it is not a trained run directory")
  out_dir, note = rundir.eval_dir(workdir, eval_dir)
  if note:
    print(note, flush=True)
  mesh = sharding.make_mesh()
  saved = files.read_json(os.path.join(workdir, rundir.SPLITS))
  described = files.read_json(os.path.join(workdir, "plan.json"))
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
  data_summary = describe(cohort, plan)
  return evaluate(config, cohort, plan, variables, stages, data_summary, out_dir, "external",
                  mesh, start, warnings(config, data_summary), _model_cache(config, mesh),
                  f"the fold models of {workdir}")


def _model_cache(config, mesh):
  """model_for(num_classes) -> (model, compiled predict fn): one per head size."""
  built = {}

  def model_for(num_classes):
    if num_classes not in built:
      m = models.build(config.model_name, num_classes, config.model)
      built[num_classes] = (m, infer.make_predict_fn(m, mesh))
    return built[num_classes]
  return model_for


def pooled_metrics(config, predictions: list[dict], classes, prevalences) -> dict:
  """Metrics of all folds' test predictions pooled, with patient-clustered bootstrap CIs."""
  labels = np.array([classes.index(r["label"]) for r in predictions])
  probs = np.array([[r[f"p_{c}"] for c in classes] for r in predictions])
  patients = np.array([r["patient_id"] for r in predictions], dtype=object)
  pooled = metrics_lib.classification(labels, probs, classes, prevalences)
  intervals = (metrics_lib.bootstrap_intervals(labels, probs, patients, classes,
                                               config.eval.bootstrap,
                                               methods.seed(config.seed, 40), prevalences)
               if config.eval.bootstrap else {})
  return {"pooled": pooled, "bootstrap_ci": intervals, "prevalences": list(prevalences)}

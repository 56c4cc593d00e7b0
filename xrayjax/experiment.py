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

from xrayjax import files, infer, methods, models, sharding, train
from xrayjax.data.cohort import Cohort
from xrayjax.evaluate import audit, html
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

  partitions = {}
  for s in plan.stages:
    for j, p in enumerate(s.phases):
      key = f"{s.name}/train" + (f"_phase{j + 1}" if len(s.phases) > 1 else "")
      partitions[key] = counts(p.train, s.labels, s.classes)
    if len(s.val):
      partitions[f"{s.name}/val"] = counts(s.val, s.labels, s.classes)
  for e in plan.evaluations:
    partitions[f"fold{e.fold}/test"] = counts(e.test, plan.labels, plan.classes)
  for name, rows in plan.partitions.items():
    partitions[name] = counts(rows, plan.labels, plan.classes)
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
    while name:
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
  """How the first stage's weights start, for reports."""
  first = plan.stages[0]
  files_ = config.model.get(models.INIT_FROM)
  if first.keras_init and files_:
    return f"{first.name}: Keras weights {files_}"
  return f"{first.name}: random (no config.model.init_from)"


# --- run --------------------------------------------------------------------------------------


def check_workdir_config(workdir: str, config, allow_change: bool) -> None:
  """Refuses to reuse a workdir whose saved config differs (unless allowed)."""
  path = os.path.join(workdir, "config.json")
  current = config.to_dict()
  if os.path.exists(path):
    saved = files.read_json(path)
    diffs = _diff(flax.traverse_util.flatten_dict(saved, sep="."),
                  flax.traverse_util.flatten_dict(_jsonable(current), sep="."))
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
    files.write_json(path, _jsonable(current))


def _jsonable(obj):
  if isinstance(obj, dict):
    return {k: _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  return obj


def _diff(old: dict, new: dict) -> list[str]:
  return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def run(config, workdir: str, mode: str = "train", allow_config_change: bool = False) -> dict:
  """Runs (or, with mode="eval", re-evaluates) the configured method in `workdir`.

  With config.protocol="both", runs it under each protocol in `workdir/paper` and
  `workdir/corrected` and writes the comparison (compare.json, compare.csv) to `workdir`.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; valid modes: {MODES}")
  if config.protocol != BOTH:
    return run_protocol(config, workdir, mode, allow_config_change)
  subs = {}
  for protocol in COMPARED:
    subs[protocol] = config.copy_and_resolve_references()
    with subs[protocol].unlocked():
      subs[protocol].protocol = protocol
    methods.get(config.method).check(subs[protocol])
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":  # so that --mode=eval finds the run's config here too
    check_workdir_config(workdir, config, allow_config_change)
  results = {protocol: run_protocol(sub, os.path.join(workdir, protocol), mode,
                                    allow_config_change) for protocol, sub in subs.items()}
  table = report.compare_protocols(results["paper"], results["corrected"])
  name = "compare" if mode == "train" else "eval_compare"
  text = report.compare_text(table, results["paper"], results["corrected"])
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, f"{name}.json"), {"rows": table})
    files.write_csv(os.path.join(workdir, f"{name}.csv"), table)
    files.write_text(os.path.join(workdir, f"{name}_summary.txt"), text + "\n")
  print(text, flush=True)
  return {"protocols": results, "compare": table}


def prepare(config) -> tuple[Cohort, methods.Plan]:
  """The cohort (sources loaded, duplicates handled as the protocol says) and the method's
  checked plan: everything a run decides before it trains."""
  method = methods.get(config.method)
  method.check(config)
  cohort = Cohort.load(config.data, method.extra_data(config), config.dedup.max_distance,
                       drop_duplicates=config.protocol == "corrected")
  plan = method.plan(cohort.meta, config)
  plan.check()
  return cohort, plan


def run_protocol(config, workdir: str, mode: str = "train",
                 allow_config_change: bool = False) -> dict:
  """Runs one protocol of the configured method in `workdir` (see `run`)."""
  start = time.time()
  mesh = sharding.make_mesh()
  spec = models.spec(config.model_name)
  image_size = config.data.image_size

  # --- cohort and plan (a config or data error stops the run before it writes anything) ---
  cohort, plan = prepare(config)
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":
    check_workdir_config(workdir, config, allow_config_change)
  if mode == "train" and jax.process_index() == 0:  # one writer on a shared file system
    files.write_json(os.path.join(workdir, "splits.json"), {
        "stages": {s.name: {"phases": [cohort.keys(p.train) for p in s.phases],
                            "val": cohort.keys(s.val)} for s in plan.stages},
        "evaluations": [{"fold": e.fold, "stage": e.stage, "test": cohort.keys(e.test)}
                        for e in plan.evaluations]})
    files.write_json(os.path.join(workdir, "plan.json"), plan.describe())
    files.write_json(os.path.join(workdir, "duplicates.json"), cohort.duplicates)
  data_summary = describe(cohort, plan)
  logging.info("plan: %s", {k: v for k, v in data_summary["partitions"].items()})
  logging.info("duplicates: %s", cohort.duplicates["summary"])

  # --- train every stage, in order ---
  built = {}  # one model (and compiled predict function) per head size

  def model_for(num_classes):
    if num_classes not in built:
      m = models.build(config.model_name, num_classes, config.model)
      built[num_classes] = (m, infer.make_predict_fn(m, mesh))
    return built[num_classes]

  variables, summaries = {}, {}
  for stage in plan.stages:
    if mode == "eval":  # the selected weights only: no optimizer, no training data
      variables[stage.name], summaries[stage.name] = infer.restore(
          os.path.join(workdir, stage.name))
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
    variables[stage.name], summaries[stage.name] = train.train_stage(
        stage=stage, model=model, init_variables=init, groups=spec.PARAM_GROUPS, data=data,
        ckpt_dir=os.path.join(workdir, stage.name), mesh=mesh, log_every=config.log_every,
        tb_dir=os.path.join(workdir, "tensorboard", stage.name))

  # --- evaluate ---
  classes = plan.classes
  prevalences = tuple(config.eval.prevalences)
  explain = config.eval.gradcam.enabled and jax.process_count() == 1
  if config.eval.gradcam.enabled and not explain:
    logging.warning("Grad-CAM runs in single-process jobs only; this %d-process run skips it "
                    "(re-run --mode=eval on one host for the maps)", jax.process_count())
  fold_metrics, predictions, explained = [], [], []
  meta = cohort.meta
  for e in plan.evaluations:
    stage = plan.stage(e.stage)
    model, predict_fn = model_for(len(stage.classes))
    test_ds = cohort.dataset(e.test, plan.labels, image_size)
    probs, labels, index = infer.predict(predict_fn, variables[e.stage], test_ds, len(e.test),
                                         stage.eval_batch_size, mesh)
    m = metrics_lib.classification(labels, probs, classes, prevalences)
    fold_metrics.append(m)
    logging.info("[fold%d] test accuracy %.4f, macro F1 %.4f", e.fold, m["accuracy"],
                 m["macro_f1"])
    if explain:
      explained.append(audit.explain_fold(
          model=model, variables=jax.device_get(variables[e.stage]), ds=test_ds,
          num_examples=len(e.test), labels=labels, masks=cohort.masks(e.test, image_size),
          classes=classes, cfg=config.eval.gradcam, groups=spec.PARAM_GROUPS,
          out_dir=os.path.join(workdir, "gradcam"), names=meta["image_id"][e.test],
          fold=e.fold, seed=methods.seed(config.seed, 30, e.fold),
          sanity=e.fold < config.eval.gradcam.sanity_folds, mesh=mesh))
    for i, r in enumerate(e.test[index]):
      predictions.append({"fold": e.fold, "image_id": meta["image_id"][r],
                          "patient_id": meta["patient_id"][r], "source": meta["source"][r],
                          "site": meta["site"][r],
                          "label": classes[labels[i]], "prediction": classes[probs[i].argmax()],
                          **{f"p_{c}": float(probs[i, j]) for j, c in enumerate(classes)}})

  # --- aggregate and report ---
  pooled = per_image(predictions, classes)
  if len(pooled) < len(predictions):
    plan.notes.append(f"test sets overlap across folds ({len(predictions)} predictions of "
                      f"{len(pooled)} images): pooled metrics average each image's "
                      "probabilities over the folds that tested it")
  results = {
      "method": plan.method, "protocol": config.protocol, "model": config.model_name,
      "data": f"{config.data.source}", "classes": list(classes),
      "initialisation": initialisation(config, plan), "notes": plan.notes,
      "stages": [{"name": s.name, "description": s.description, **summaries[s.name]}
                 for s in plan.stages],
      "num_images": data_summary["evaluated_images"],
      "num_patients": data_summary["evaluated_patients"],
      "data_summary": data_summary, "warnings": warnings(config, data_summary),
      "build_reports": cohort.build_reports(),
      "duplicates": {**cohort.duplicates["summary"], "applied": cohort.duplicates["applied"]},
      "per_source": metrics_lib.per_group(pooled, "source", classes),
      **pooled_metrics(config, pooled, classes, prevalences),
      "gradcam": audit.summarise(explained) if explained else None,
      "gradcam_folds": [{k: v for k, v in r.items() if not isinstance(v, np.ndarray)}
                        for r in explained],
      "fold_metrics": fold_metrics, "across_folds": metrics_lib.across_folds(fold_metrics),
      "seconds": time.time() - start, "devices": jax.device_count(),
  }
  results["table3"], results["table4"] = report.table3(results), report.table4(results)
  name = "results" if mode == "train" else "eval"
  text = report.summary_text(results)
  if jax.process_index() == 0:
    report.write(workdir, results, predictions, name)
    html.write(workdir, results, pooled, _jsonable(config.to_dict()),
               "report" if mode == "train" else "eval_report")
    files.write_text(os.path.join(workdir, f"{name}_summary.txt"), text + "\n")
  print(text, flush=True)
  return results


def per_image(predictions: list[dict], classes) -> list[dict]:
  """One row per image: where several folds tested an image (the paper protocol's
  overlapping folds), its class probabilities averaged over them, so that pooled metrics
  count every image once. Rows of images tested once are returned as they are."""
  rows: dict[tuple, list[dict]] = {}
  for r in predictions:
    rows.setdefault((r["source"], r["image_id"]), []).append(r)
  out = []
  for group in rows.values():
    if len(group) == 1:
      out.append(group[0])
      continue
    probs = np.mean([[r[f"p_{c}"] for c in classes] for r in group], axis=0)
    out.append({**{k: v for k, v in group[0].items() if k != "fold"},
                "folds": " ".join(str(r["fold"]) for r in group),
                "prediction": classes[int(probs.argmax())],
                **{f"p_{c}": float(p) for c, p in zip(classes, probs)}})
  return out


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

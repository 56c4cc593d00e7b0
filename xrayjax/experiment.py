"""DETL experiments: data plan per protocol, stage A -> stage B per fold, aggregation.

Protocols (config.protocol):
  corrected (default): patient-grouped stratified folds (a true partition); a
    validation split carved from each fold's training patients selects the
    stage-B checkpoint; no Data-A patient is in Data-B; Data-A's validation
    split is patient-grouped too.
  paper: the published recipe: image-level folds, stage B keeps its last
    weights (the paper names no stage-B selection rule and no validation split),
    Data-A and Data-B are drawn independently (patients may be shared), and
    Data-A's validation split is a random image-level carve.
"""

from __future__ import annotations

import os
import time

import flax
import jax
import numpy as np
from absl import logging

from xrayjax import files, models, train
from xrayjax.models import keras_weights
from xrayjax.data import pipeline, sources, splits, tasks
from xrayjax.evaluate import audit, html
from xrayjax.evaluate import metrics as metrics_lib
from xrayjax.evaluate import report
from xrayjax import sharding

PROTOCOLS = ("corrected", "paper")
MODES = ("train", "eval")


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % (2**31))


# --- data plan --------------------------------------------------------------------------------


def load_data(config) -> tuple[list, dict[str, np.ndarray], dict]:
  """Builders and metadata of Data-B's sources and, when configured apart, Data-A's.

  `meta` gains `for_a` / `for_b` (which rows each stage may draw from) and `group` (the
  split group: patients joined by duplicate images; see splits.deduplicate). In the
  corrected protocol duplicate copies are dropped here; the paper protocol only reports them.
  """
  builders, meta = sources.load(config.data)
  names = list(sources.names(config.data))
  n = len(meta["image_id"])
  meta["for_a"], meta["for_b"] = np.ones(n, bool), np.ones(n, bool)
  data_a = config.data_a.get("data")
  if data_a:  # Data-A from other sources (e.g. the 64 px benchmark for a 256 px Data-B)
    builders_a, meta_a = sources.load(data_a)
    meta_a["builder"] = meta_a["builder"] + len(builders)
    meta["for_a"] = np.zeros(n, bool)
    n_a = len(meta_a["image_id"])
    meta_a["for_a"], meta_a["for_b"] = np.ones(n_a, bool), np.zeros(n_a, bool)
    meta = {k: np.concatenate([meta[k], meta_a[k]]) for k in meta}
    builders += builders_a
    names += [f"data_a:{n}" for n in sources.names(data_a)]
  dup = splits.deduplicate(meta, config.dedup.max_distance)
  applied = config.protocol == "corrected"
  dup["report"]["applied"] = applied
  meta["group"] = dup["group"] if applied else meta["patient_id"]
  if applied:
    meta = {k: v[dup["keep"]] for k, v in meta.items()}
  reports = {}
  for name, b in zip(names, builders):
    r = sources.build_report(b) or {}
    reports[name] = {"built": r.get("built"), "skipped": r.get("skipped", 0),
                     "skipped_by_reason": r.get("skipped_by_reason", {}),
                     "report": os.path.join(b.data_dir, sources.BUILD_REPORT)}
  return builders, meta, {"build_reports": reports, "duplicates": dup["report"]}


def plan(meta: dict[str, np.ndarray], config) -> dict:
  """Image indices of every partition, from metadata only; checked for integrity.

  `meta` as load_data returns it. The corrected protocol groups by `group` (patients,
  merged where duplicates join them); the paper protocol splits images.
  """
  if config.protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {config.protocol!r}; valid protocols: {PROTOCOLS}")
  grouped = config.protocol == "corrected"
  rng = np.random.default_rng(_seed(config.seed, 0))
  groups = meta["group"]
  task_a, task_b = tasks.get("data_a"), tasks.get(config.data_b.task)
  labels_a, strata_a = task_a.assign(meta)
  labels_b, strata_b = task_b.assign(meta)
  labels_a[~meta["for_a"]] = -1
  if config.data_a.sources:
    labels_a[~np.isin(meta["source"], config.data_a.sources.split(","))] = -1
  labels_b[~meta["for_b"]] = -1

  def sample(labels, strata, classes, sizes, exclude=()):
    excluded = np.isin(groups, list(exclude))
    chosen = []
    for c, name in enumerate(classes):
      candidates = np.flatnonzero((labels == c) & ~excluded)
      kinds = sorted(set(strata[candidates]) - {""})
      want = int(sizes.get(name, 0))
      if not kinds:
        chosen.append(splits.sample_patients(candidates, groups, want, rng))
        continue
      for kind in kinds:  # a class made of sub-classes takes an equal share of each
        chosen.append(splits.sample_patients(candidates[strata[candidates] == kind], groups,
                                             -(-want // len(kinds)) if want else 0, rng))
    return np.sort(np.concatenate(chosen))

  data_b = sample(labels_b, strata_b, task_b.classes, config.data_b.images_per_class)
  if len(data_b) == 0:
    raise ValueError(f"Data-B is empty: no image of data.source={config.data.source!r} falls in "
                     f"task {task_b.name!r} (classes {task_b.classes}); check data_b.task and the "
                     "source's labels")
  # Corrected: Data-A never contains a Data-B patient (the paper drew both from NIH).
  exclude = set(groups[data_b]) if grouped else ()
  a_train = a_val = np.array([], np.int64)
  if config.stage_a.enabled:
    data_a = sample(labels_a, strata_a, task_a.classes, config.data_a.images_per_class, exclude)
    empty = [c for i, c in enumerate(task_a.classes) if not np.any(labels_a[data_a] == i)]
    if empty:
      raise ValueError(f"Data-A has no {' or '.join(empty)} image left after Data-B took its "
                       "patients: stage A needs both classes. Give Data-A its own sources "
                       "(--config.data_a.data, as data=manifest,classes=3 does), lower "
                       "data_b.images_per_class, or train without stage A (init=scratch)")
    a_train, a_val = splits.carve(data_a, labels_a, groups, config.data_a.val_fraction,
                                  _seed(config.seed, 1), grouped)
  folds = []
  for k, test in enumerate(splits.kfold(labels_b[data_b], groups[data_b], config.folds,
                                        _seed(config.seed, 2), grouped)):
    test = data_b[test]
    rest = np.setdiff1d(data_b, test)
    if grouped:
      b_train, b_val = splits.carve(rest, labels_b, groups, config.data_b.val_fraction,
                                    _seed(config.seed, 3, k), grouped)
      for ids in (groups, meta["patient_id"]):
        splits.check_disjoint_patients({"train": b_train, "val": b_val, "test": test}, ids)
    else:
      b_train, b_val = rest, np.array([], np.int64)
    folds.append({"train": b_train, "val": b_val, "test": test})
  if grouped:
    for ids in (groups, meta["patient_id"]):
      splits.check_disjoint_patients({"data_a_train": a_train, "data_a_val": a_val}, ids)
      splits.check_disjoint_patients({"data_a": np.concatenate([a_train, a_val]),
                                      "data_b": data_b}, ids)
  return {"labels_a": labels_a, "labels_b": labels_b, "a_train": a_train, "a_val": a_val,
          "data_b": data_b, "folds": folds, "task_b": task_b.name}


def describe(meta, p) -> dict:
  """Counts per class for every partition, per source for Data-B, and patient overlap."""
  def counts(idx, labels, classes):
    return {c: int(np.sum(labels[idx] == i)) for i, c in enumerate(classes)}

  a, b = tasks.get("data_a").classes, tasks.get(p["task_b"]).classes
  out = {"data_a_train": counts(p["a_train"], p["labels_a"], a),
         "data_a_val": counts(p["a_val"], p["labels_a"], a),
         "data_b": counts(p["data_b"], p["labels_b"], b)}
  for k, f in enumerate(p["folds"]):
    for part in ("train", "val", "test"):
      out[f"fold{k}_{part}"] = counts(f[part], p["labels_b"], b)
  for key in ("site", "source"):
    values = meta[key][p["data_b"]]
    out[f"data_b_label_by_{key}"] = {
        s: counts(p["data_b"][values == s], p["labels_b"], b) for s in sorted(set(values))}
  a_patients = set(meta["patient_id"][np.concatenate([p["a_train"], p["a_val"]])])
  out["data_b_patients_also_in_data_a"] = len(set(meta["patient_id"][p["data_b"]]) & a_patients)
  return out


def warnings(config, data_summary: dict) -> list[str]:
  """What a reader of the results must know about how far to trust them."""
  out = []
  if config.data.source == "synthetic" and config.data.synthetic.site_confounding > 0:
    out.append(f"the data are site-confounded (site_confounding="
               f"{config.data.synthetic.site_confounding}): site markers and exposure curves "
               "predict the label, so these scores may measure a shortcut")
  for name, share in source_confounded(data_summary["data_b_label_by_site"]).items():
    out.append(f"label and source are confounded: {100 * share:.0f}% of Data-B's {name} images "
               f"come from sources where {name} makes up at least 80% of the images, so a model "
               "can score by recognising the source")
  if data_summary["data_b_patients_also_in_data_a"]:
    out.append(f"{data_summary['data_b_patients_also_in_data_a']} Data-B patients are also in "
               "Data-A (paper protocol): stage A has seen them")
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
  """`target` variables with every layer but `head_layer` taken from `source` (DETL's head swap).

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
      raise ValueError(f"cannot transfer stage-A weights: {path} expects {value.shape}, "
                       f"stage A has {found}; stage A and B must use the same model config")
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


# --- evaluation -------------------------------------------------------------------------------


def explain_fold(config, model, variables, builders, meta, rows, ds, labels, classes, spec,
                 workdir, k) -> dict:
  """Grad-CAM gallery and audits of fold k's test images: `ds` selects `rows` (which index
  `meta`), the dataset its predictions came from (cached: nothing is decoded again)."""
  cfg = config.eval.gradcam
  images, index = [], []
  for batch in pipeline.eval_batches(ds, len(rows), cfg.batch_size):
    keep = batch["mask"] > 0
    images.append(batch["image"][keep])
    index.append(batch["index"][keep])
  images, index = np.concatenate(images), np.concatenate(index)
  order = np.argsort(index)
  images, rows = images[order], rows[index[order]]
  masks = pipeline.masks(builders, meta["builder"][rows], meta["image_id"][rows],
                         config.data.image_size)
  return audit.explain_fold(
      model=model, variables=jax.device_get(variables), images=images, labels=labels[rows],
      masks=masks, classes=classes, cfg=cfg, groups=spec.PARAM_GROUPS,
      out_dir=os.path.join(workdir, "gradcam"), names=meta["image_id"][rows], fold=k,
      seed=_seed(config.seed, 30, k), sanity=k < cfg.sanity_folds)


def pooled_metrics(config, predictions: list[dict], meta, classes, prevalences) -> dict:
  """Metrics of all folds' test predictions pooled, with patient-clustered bootstrap CIs."""
  labels = np.array([classes.index(r["label"]) for r in predictions])
  probs = np.array([[r[f"p_{c}"] for c in classes] for r in predictions])
  patients = np.array([r["patient_id"] for r in predictions], dtype=object)
  pooled = metrics_lib.classification(labels, probs, classes, prevalences)
  intervals = (metrics_lib.bootstrap_intervals(labels, probs, patients, classes,
                                               config.eval.bootstrap, _seed(config.seed, 40),
                                               prevalences)
               if config.eval.bootstrap else {})
  return {"pooled": pooled, "bootstrap_ci": intervals, "prevalences": list(prevalences)}


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
      files.write_json(os.path.join(workdir, f"config.{int(time.time())}.json"), saved)
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
  """Runs (or, with mode="eval", re-evaluates) a DETL experiment in `workdir`."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; valid modes: {MODES}")
  if not config.stage_a.enabled and any(r == "freeze" for _, r in config.stage_b.param_rules):
    raise ValueError("stage_a.enabled=False with frozen stage-B layers would train a head on "
                     "random features; use the config arg init=scratch")
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":
    check_workdir_config(workdir, config, allow_config_change)
  start = time.time()
  mesh = sharding.make_mesh()
  spec = models.spec(config.model_name)
  init_from = config.model.get(models.INIT_FROM)

  # --- data ---
  builders, meta, data_info = load_data(config)
  p = plan(meta, config)
  key = meta["image_id"] if len(builders) == 1 else np.array(
      [f"{b}/{i}" for b, i in zip(meta["builder"], meta["image_id"])], dtype=object)
  files.write_json(os.path.join(workdir, "splits.json"), {
      "data_a_train": key[p["a_train"]].tolist(), "data_a_val": key[p["a_val"]].tolist(),
      "folds": [{k: key[v].tolist() for k, v in f.items()} for f in p["folds"]]})
  files.write_json(os.path.join(workdir, "duplicates.json"), data_info["duplicates"])
  data_summary = describe(meta, p)
  logging.info("data plan: %s", {k: v for k, v in data_summary.items() if k.startswith("data")})
  logging.info("duplicates: %s", data_info["duplicates"]["summary"])

  def dataset(idx, labels):
    return pipeline.select(builders, meta["builder"][idx], meta["image_id"][idx], labels[idx],
                           config.data.image_size)

  common = dict(augment_cfg=config.augment, mesh=mesh, log_every=config.log_every,
                require_finished=mode == "eval")

  # --- stage A: from scratch on Data-A ---
  stage_a_summary = None
  if config.stage_a.enabled:
    model_a = models.build(config.model_name, 2, config.model)
    variables_a, stage_a_summary = train.train_stage(
        name="stage_a", model=model_a,
        init_variables=init_variables(model_a, config.data.image_size, _seed(config.seed, 10),
                                      init_from, spec),
        rules=((".*", "train"),), groups=spec.PARAM_GROUPS, cfg=config.stage_a, select="best",
        data=train.StageData(dataset(p["a_train"], p["labels_a"]), len(p["a_train"]),
                             dataset(p["a_val"], p["labels_a"]), len(p["a_val"])),
        ckpt_dir=os.path.join(workdir, "stage_a"), seed=_seed(config.seed, 11),
        tb_dir=os.path.join(workdir, "tensorboard", "stage_a"), **common)

  # --- stage B: per fold, on Data-B ---
  classes = tasks.get(config.data_b.task).classes
  model_b = models.build(config.model_name, len(classes), config.model)
  predict_b = train.make_predict_fn(model_b, mesh)  # one compiled function for every fold
  fold_metrics, predictions, fold_summaries, explained = [], [], [], []
  prevalences = tuple(config.eval.prevalences)
  explain = config.eval.gradcam.enabled and jax.process_count() == 1
  if config.eval.gradcam.enabled and not explain:
    logging.warning("Grad-CAM runs in single-process jobs only; this %d-process run skips it "
                    "(re-run --mode=eval on one host for the maps)", jax.process_count())
  for k, fold in enumerate(p["folds"]):
    if config.stage_a.enabled:
      init = transfer(variables_a, init_variables(model_b, config.data.image_size,
                                                  _seed(config.seed, 20, k)), spec.HEAD_LAYER)
    else:
      init = init_variables(model_b, config.data.image_size, _seed(config.seed, 20, k),
                            init_from, spec)
    val = (dataset(fold["val"], p["labels_b"]), len(fold["val"])) if len(fold["val"]) else \
        (None, 0)
    variables_b, summary = train.train_stage(
        name=f"fold{k}/stage_b", model=model_b, init_variables=init,
        rules=tuple(config.stage_b.param_rules), groups=spec.PARAM_GROUPS, cfg=config.stage_b,
        select="best" if config.protocol == "corrected" else "last",
        data=train.StageData(dataset(fold["train"], p["labels_b"]), len(fold["train"]), *val),
        ckpt_dir=os.path.join(workdir, f"fold{k}", "stage_b"), seed=_seed(config.seed, 21, k),
        tb_dir=os.path.join(workdir, "tensorboard", f"fold{k}"), **common)
    fold_summaries.append(summary)
    test_ds = dataset(fold["test"], p["labels_b"])
    probs, labels, index = train.predict_dataset(
        predict_b, variables_b, test_ds,
        len(fold["test"]), config.stage_b.eval_batch_size, mesh)
    m = metrics_lib.classification(labels, probs, classes, prevalences)
    fold_metrics.append(m)
    logging.info("[fold%d] test accuracy %.4f, macro F1 %.4f", k, m["accuracy"], m["macro_f1"])
    rows = fold["test"][index]
    if explain:
      explained.append(explain_fold(config, model_b, variables_b, builders, meta, fold["test"],
                                    test_ds, p["labels_b"], classes, spec, workdir, k))
    for i, r in enumerate(rows):
      predictions.append({"fold": k, "image_id": meta["image_id"][r],
                          "patient_id": meta["patient_id"][r], "source": meta["source"][r],
                          "site": meta["site"][r],
                          "label": classes[labels[i]], "prediction": classes[probs[i].argmax()],
                          **{f"p_{c}": float(probs[i, j]) for j, c in enumerate(classes)}})

  # --- aggregate and report ---
  results = {
      "method": "DETL", "protocol": config.protocol, "model": config.model_name,
      "data": f"{config.data.source}", "task": config.data_b.task, "classes": list(classes),
      "stage_a": ("trained on Data-A, val accuracy "
                  f"{stage_a_summary['selected_metrics'].get('val_accuracy', float('nan')):.4f}"
                  if stage_a_summary else "none (trained from scratch on Data-B)"),
      "stage_a_summary": stage_a_summary, "stage_b_summaries": fold_summaries,
      "num_images": int(len(p["data_b"])),
      "num_patients": int(len(set(meta["patient_id"][p["data_b"]]))),
      "data_summary": data_summary, "warnings": warnings(config, data_summary),
      "build_reports": data_info["build_reports"],
      "duplicates": data_info["duplicates"]["summary"],
      "per_source": metrics_lib.per_group(predictions, "source", classes),
      **pooled_metrics(config, predictions, meta, classes, prevalences),
      "gradcam": audit.summarise(explained) if explained else None,
      "gradcam_folds": [{k: v for k, v in r.items() if not isinstance(v, np.ndarray)}
                        for r in explained],
      "fold_metrics": fold_metrics, "across_folds": metrics_lib.across_folds(fold_metrics),
      "seconds": time.time() - start, "devices": jax.device_count(),
  }
  name = "results" if mode == "train" else "eval"
  text = report.summary_text(results)
  if jax.process_index() == 0:
    report.write(workdir, results, predictions, name)
    html.write(workdir, results, predictions, _jsonable(config.to_dict()),
               "report" if mode == "train" else "eval_report")
    with open(os.path.join(workdir, f"{name}_summary.txt"), "w") as f:
      f.write(text + "\n")
  print(text, flush=True)
  return results

"""Scoring a plan's trained models: every evaluation's test images once, the predictions
pooled over folds with patient-clustered intervals, the shortcut audit and Grad-CAM, and the
results, summary and report written; the data summary every report opens with."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from xrayjax import files, infer, methods, models, rundir, sharding
from xrayjax.data import regions
from xrayjax.data.cohort import Cohort
from xrayjax.evaluate import audit, html, report, shortcuts
from xrayjax.evaluate import metrics as metrics_lib


def describe(cohort: Cohort, plan: methods.Plan) -> dict:
  """Counts per class of every partition of the plan, the evaluated images per source and
  site, and test patients a model of the plan saw in training."""
  meta = cohort.meta
  counts = methods.counts
  # A stage's partitions count its own classes; tests and the plan's extras the plan's.
  stage_of = {name: s for s in plan.stages for name in s.partitions()}
  partitions = {}
  for name, rows in plan.partition_rows().items():
    s = stage_of.get(name)
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


def evaluate(config, cohort: Cohort, plan: methods.Plan, variables: dict, stages: list[dict],
             data_summary: dict, out_dir: str, name: str, mesh, start: float, model_for,
             init: str, variants: dict | None = None) -> dict:
  """Scores every evaluation of `plan` with its stage's variables (and, for the shortcut
  audit, every test image again under each perturbation), pools, audits, and writes the
  results named `name` (results, eval, external) with their report to `out_dir`.

  `data_summary` is describe(cohort, plan); `model_for` infer.model_builder's; `init` says
  where the weights started (train.describe_starts); `variants` are the audit's retrained
  runs (shortcuts.audit_variants)."""
  spec = models.spec(config.model_name)
  image_size = config.data.image_size
  classes = plan.classes
  prevalences = tuple(config.eval.prevalences)
  explain = config.eval.gradcam.enabled
  # Multi-host: process 0 draws the maps on its own devices while the others wait for it.
  cam_mesh = mesh if jax.process_count() == 1 else sharding.make_mesh(jax.local_devices())
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
    if explain and jax.process_index() == 0:
      explained.append(audit.explain_fold(
          model=model, variables=jax.device_get(variables[e.stage]), ds=test_ds,
          num_examples=len(e.test), labels=labels, masks=masks,
          classes=classes, cfg=config.eval.gradcam, groups=spec.PARAM_GROUPS,
          out_dir=os.path.join(out_dir, "gradcam" if name != "external" else "external_gradcam"),
          names=meta["image_id"][e.test], fold=e.fold, seed=methods.seed(config.seed, 30, e.fold),
          sanity=e.fold < config.eval.gradcam.sanity_folds, mesh=cam_mesh,
          reference=_reference(cohort, plan, e.stage, config.eval.gradcam.reference,
                               image_size)))
    if explain:
      sharding.barrier(f"gradcam {out_dir} fold {e.fold}")
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
      "data_summary": data_summary, "warnings": warnings(config, data_summary),
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
  results["tables"] = methods.tables(config.method, results)
  text = report.summary_text(results)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    report.write(out_dir, results, predictions, name)
    html.write(out_dir, results, pooled, rundir.plain(config.to_dict()),
               {"results": "report", "eval": "eval_report"}.get(name, f"{name}_report"))
    files.write_text(os.path.join(out_dir, f"{name}_summary.txt"), text + "\n")
  print(text, flush=True)
  return results


def reference_rows(stage: methods.Stage, name: str) -> np.ndarray:
  """The stage's training images of class `name` (a Grad-CAM reference); raises ValueError,
  naming the field, when the stage has no such class or no such training image."""
  rows = np.unique(np.concatenate([p.train for p in stage.phases]))
  if name not in stage.classes:
    raise ValueError(f"config.eval.gradcam.reference={name!r} is not a class of stage "
                     f"{stage.name} (classes {list(stage.classes)}); name one, or '' for none")
  rows = rows[stage.labels[rows] == stage.classes.index(name)]
  if not len(rows):
    raise ValueError(f"config.eval.gradcam.reference={name!r}: stage {stage.name} trains on no "
                     f"{name} image to take the reference map from; name another class")
  return rows


def _reference(cohort: Cohort, plan: methods.Plan, stage: str, name: str, image_size: int):
  """(dataset, count) of the stage's training images of class `name`; None for '' or for
  an external test set's model (its training images are not in this cohort: a plan note
  says its maps are measured against zero)."""
  if not name:
    return None
  if stage not in {s.name for s in plan.stages}:
    note = (f"Grad-CAM maps are measured against zero, not against the models' mean {name} "
            "training map (eval.gradcam.reference): their training images are not in this "
            "data")
    if note not in plan.notes:
      plan.notes.append(note)
    return None
  stage = plan.stage(stage)
  rows = reference_rows(stage, name)
  return cohort.dataset(rows, stage.labels, image_size), len(rows)


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

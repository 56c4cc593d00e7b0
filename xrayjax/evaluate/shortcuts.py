"""Shortcut audits: could a run's scores come from the source rather than the lungs?

Networks trained on collections where a class comes from its own source learn the source
(DeGrave et al. 2021; Maguolo & Nanni 2021; Roberts et al. 2021). Every run reports
(config.audit; docs/shortcut-audit.md):

1. Confounding tables: label x source, site and view (and sex / age band where the
   metadata has them) for every partition, with Cramér's V.
2. Perturbations at evaluation (no retraining; data/regions.py): each test image scored
   again after cropping the top, keeping only the centre or only the border, erasing the
   lungs or everything but them, mirroring, and erasing the corners; per op the accuracy
   and AUROC, the share of predictions that flip and the drop against the unperturbed
   images.
3. Pixel probes: a logistic regression on 32x32 pixels (patient-grouped 5-fold) predicting
   the label from the whole image, the border alone, the lungs alone and everything but
   the lungs; and the *source baseline*, the same probe predicting the source (the site
   where there is one source): how recognisable each source is.
4. Within-source metrics: per source with several classes, the run's metrics on its images
   alone.
5. Opt-in retraining (config.audit.retrain, in subdirectories of the run): the same method
   trained and tested on border-only / centre-only / lung-only / lung-erased inputs
   (`audit.input`), and leave-one-source-out (`audit.leave_out`): trained without one source,
   tested on it.
6. A verdict, "shortcut risk: high / moderate / low", from the rule in `verdict`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import threadpoolctl
from scipy.stats import contingency
from sklearn import linear_model, model_selection, pipeline as skpipeline, preprocessing

from xrayjax.data import pipeline, regions
from xrayjax.evaluate import metrics as metrics_lib

FIELDS = ("source", "site", "view", "sex", "age_band")
PROBE_SIZE = 32
PROBE_INPUTS = ("full", "border_only", "lungs_only", "no_lungs")
LEVELS = ("low", "moderate", "high")


# --- 1. confounding tables --------------------------------------------------------------------


def cramers_v(table) -> tuple[float, float]:
  """(Cramér's V, the chi-square test's p-value) of a contingency table (rows and columns
  that are all zero are dropped); nan when fewer than two rows or columns remain."""
  t = np.asarray(table, np.int64)
  t = t[t.sum(1) > 0][:, t.sum(0) > 0]
  if min(t.shape) < 2:
    return float("nan"), float("nan")
  return (float(contingency.association(t, method="cramer")),
          float(contingency.chi2_contingency(t).pvalue))


def age_band(age) -> str:
  """Ten-year band of an age in years ("" when unknown)."""
  try:
    a = int(float(age))
  except (TypeError, ValueError):
    return ""
  return f"{10 * (a // 10)}-{10 * (a // 10) + 9}"


def confounding(meta: dict, partitions: dict[str, np.ndarray], labels: np.ndarray,
                classes) -> dict:
  """Per partition (name -> cohort rows) and per metadata field the metadata has: the label
  x value table of images ({label: {value: count}}), its Cramér's V, and the chi-square
  p-value of the same table counting each patient once (a patient's images share label,
  site and source, so counting images would overstate the evidence)."""
  columns = {f: np.asarray(meta[f]).astype(str) for f in FIELDS if f in meta}
  if "age" in meta and "age_band" not in columns:
    columns["age_band"] = np.array([age_band(a) for a in meta["age"]], dtype=object)
  patients = np.asarray(meta["patient_id"]).astype(str) if "patient_id" in meta else None
  out = {}
  for name, rows in partitions.items():
    rows = np.asarray(rows)[labels[np.asarray(rows)] >= 0]
    entry = {}
    for field, column in columns.items():
      values = sorted(set(column[rows]) - {""})

      def table(r):
        return np.array([[np.sum((labels[r] == k) & (column[r] == v)) for v in values]
                         for k in range(len(classes))])
      counts = table(rows)
      once = rows
      if patients is not None:
        _, first = np.unique(np.stack([patients[rows], labels[rows].astype(str),
                                       column[rows]]), axis=1, return_index=True)
        once = rows[first]
      entry[field] = {"values": values,
                      "table": {c: dict(zip(values, map(int, row)))
                                for c, row in zip(classes, counts)},
                      "cramers_v": cramers_v(counts)[0], "p_value": cramers_v(table(once))[1]}
    out[name] = entry
  return out


# --- 2. perturbations -------------------------------------------------------------------------


def perturbation_table(labels: np.ndarray, base: np.ndarray, perturbed: dict[str, np.ndarray],
                       classes) -> list[dict]:
  """Per op: accuracy and macro AUROC of the perturbed predictions (and per class AUROC),
  their drop against the unperturbed ones `base`, and the share of predictions that flip.
  The first row is the unperturbed model ("none")."""
  rows = []
  for op, probs in {"none": base, **perturbed}.items():
    m = metrics_lib.classification(labels, probs, classes)
    rows.append({"op": op, "accuracy": m["accuracy"], "macro_auroc": m["macro_auroc"],
                 "accuracy_drop": rows[0]["accuracy"] - m["accuracy"] if rows else 0.0,
                 "auroc_drop": rows[0]["macro_auroc"] - m["macro_auroc"] if rows else 0.0,
                 "flipped": float(np.mean(probs.argmax(-1) != base.argmax(-1))),
                 **{f"{c}/auroc": m["per_class"][c]["auroc"] for c in classes}})
  return rows


# --- 3. pixel probes and the source baseline --------------------------------------------------


def downsample(images: np.ndarray, size: int = PROBE_SIZE) -> np.ndarray:
  """uint8 [n, s, s] -> float32 [n, size, size] in [0, 1] (area average)."""
  x = tf.image.resize(np.asarray(images, np.float32)[..., None], (size, size), antialias=True)
  return np.asarray(x)[..., 0] / 255.0


def probe(x: np.ndarray, target: np.ndarray, groups: np.ndarray, seed: int,
          folds: int = 5) -> np.ndarray:
  """Out-of-fold class probabilities [n, K] of a logistic regression on the pixels `x`
  [n, ...], folds grouped by `groups` (patients) and stratified by `target` (0..K-1); None
  unless two classes each have two patients."""
  present = np.unique(target)
  smallest = min(len(set(groups[target == c])) for c in present)
  if len(present) < 2 or smallest < 2:
    return None
  x = x.reshape(len(x), -1)
  k = int(target.max()) + 1
  splitter = model_selection.StratifiedGroupKFold(min(folds, smallest), shuffle=True,
                                                  random_state=seed)
  out = np.zeros((len(x), k))
  # One BLAS thread: these small products ran 3x slower on more (docs/shortcut-audit.md), and
  # the probes' round-off no longer depends on the machine's core count.
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    for train, test in splitter.split(x, target, groups):
      model = skpipeline.make_pipeline(
          preprocessing.StandardScaler(),
          linear_model.LogisticRegression(C=0.01, max_iter=2000))
      model.fit(x[train], target[train])
      out[np.ix_(test, model.classes_)] = model.predict_proba(x[test])
  return out


def group_field(meta: dict, rows: np.ndarray) -> str:
  """What the audit calls a source among `rows`: "source" where they come from several,
  else "site" (e.g. the synthetic data's acquisition sites)."""
  return "source" if len(set(meta["source"][rows])) > 1 else "site"


def pixel_probes(images: np.ndarray, labels: np.ndarray, classes, groups: np.ndarray,
                 lung_keep: dict[str, np.ndarray], field: str, values: np.ndarray,
                 seed: int) -> dict:
  """The label probes (PROBE_INPUTS) and the source baseline on the evaluated images.

  Args:
    images: [n, 32, 32] in [0, 1] (downsample).
    labels: class index per image; classes: their names; groups: patient per image.
    lung_keep: {op: [n, 32, 32] bool} the kept pixels of border_only, lungs_only, no_lungs.
    field, values: the images' source (or site: group_field) for the source baseline.
  Returns {"label": {input: {accuracy, macro_auroc, per_class auroc}} (empty unless two
  classes have two patients each), "source_baseline": {field, values, accuracy,
  balanced_accuracy, chance, recall per value} or None}.
  """
  out = {"label": {}, "source_baseline": None}
  for name in PROBE_INPUTS:
    x = images if name == "full" else images * lung_keep[name]
    probs = probe(x, labels, groups, seed)
    if probs is None:
      out["label"] = {}
      break
    m = metrics_lib.classification(labels, probs, classes)
    out["label"][name] = {"accuracy": m["accuracy"], "macro_auroc": m["macro_auroc"],
                          "auroc": {c: m["per_class"][c]["auroc"] for c in classes}}
  names, target = np.unique(np.asarray(values).astype(str), return_inverse=True)
  probs = probe(images, target, groups, seed) if len(names) > 1 else None
  if probs is not None:
    m = metrics_lib.classification(target, probs, list(names))
    out["source_baseline"] = {
        "field": field, "values": list(names), "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "chance": float(np.bincount(target).max() / len(target)),
        "recall": {v: m["per_class"][v]["sensitivity"] for v in names}}
  return out


# --- 4. within-source metrics -----------------------------------------------------------------


def within_groups(predictions: list[dict], field: str, classes) -> dict:
  """Per value of `field` whose pooled test predictions hold at least two classes: the
  metrics on its images alone (over the classes present there)."""
  out = {}
  for value in sorted({str(p[field]) for p in predictions}):
    rows = [p for p in predictions if str(p[field]) == value]
    labels = np.array([classes.index(p["label"]) for p in rows])
    present = sorted(set(labels))
    if len(present) < 2:
      continue
    probs = np.array([[p[f"p_{c}"] for c in classes] for p in rows])
    m = metrics_lib.classification(labels, probs, classes)
    out[value] = {"classes": [classes[k] for k in present], "images": len(rows),
                  "accuracy": m["accuracy"], "macro_auroc": m["macro_auroc"],
                  "auroc": {classes[k]: m["per_class"][classes[k]]["auroc"] for k in present}}
  return out


# --- 6. the verdict ---------------------------------------------------------------------------

# The rule (docs/shortcut-audit.md). Retention: how much of the whole image's signal above
# chance an input keeps, (AUROC_input - 0.5) / (AUROC_full - 0.5), for the class where the
# input does best (a shortcut often serves one class: the one that came from its own source).
# A part of the image (border, outside the lungs) that scores as well as the whole image:
KEPT = {"high": (0.75, 0.7), "moderate": (0.65, 0.5)}  # (AUROC on the part, retention) >=
# (Cramér's V, the source baseline's balanced accuracy) at least, with the chi-square test's
# p < P_CONFOUNDED (a V that chance alone gives small samples does not count).
CONFOUNDED = {"high": (0.5, 0.8), "moderate": (0.3, 0.6)}
P_CONFOUNDED = 0.01
# Accuracy lost when the corners are erased (not the share of predictions that flip: a weak
# model's predictions flip under any perturbation, mirroring included, with no loss).
CORNERS = {"high": 0.10, "moderate": 0.05}


def retention(full: dict[str, float], part: dict[str, float]) -> tuple[str, float, float]:
  """(class, its AUROC on the part, retention) of the class whose part AUROC is highest;
  `full` and `part` map class -> one-vs-rest AUROC."""
  defined = [c for c in part if np.isfinite(part[c]) and np.isfinite(full.get(c, np.nan))]
  if not defined:
    return "", float("nan"), float("nan")
  c = max(defined, key=lambda k: part[k])
  gain = full[c] - 0.5
  return c, part[c], (part[c] - 0.5) / gain if gain > 0 else float("nan")


def _kept(name: str, what: str, full: dict, part: dict) -> dict:
  """The evidence that `part` (class -> AUROC) keeps the signal of `full`."""
  c, a, r = retention(full, part)
  if not np.isfinite(r):
    return {"evidence": name, "level": "low",
            "text": f"{what}: not assessable, the whole-image AUROC of every class is at or "
                    "below chance"}
  kept = (f"{100 * r:.0f}% of the signal above chance kept" if r < 1 else
          "as much signal above chance as the whole image, or more")
  return {"evidence": name, "level": _level(KEPT, a, r),
          "text": f"{what}: {c} AUROC {a:.3f} against {full[c]:.3f} on whole images "
                  f"(chance 0.5), {kept}"}


def _level(table: dict, *values: float) -> str:
  for level in ("high", "moderate"):
    if all(np.isfinite(v) and v >= t for v, t in zip(values, np.atleast_1d(table[level]))):
      return level
  return "low"


def verdict(audit: dict) -> dict:
  """"shortcut risk: high / moderate / low" from an audit (the `shortcuts` block of
  results.json): the highest level any piece of evidence reaches, each with its numbers
  ("not assessed" without evidence: audit.perturb and audit.probes off).

  Evidence (thresholds above):
    border: a model trained and tested on border-only inputs (central box erased;
      audit.retrain=border) scores as well as the run on whole images.
    outside_lungs: the pixel probe on the pixels outside the lungs (on the border, when some
      image has no lung mask) scores as well as on whole images.
    no_lungs: the run's model still separates the classes with the lungs erased (left out
      when some images have no lung mask and a fixed box stands in: the two kinds of erasure
      would themselves tell sources apart).
    corners: erasing the corners (where site markers sit) costs the model accuracy.
    confounding: the label goes with the source (or site) among the evaluated images
      (Cramér's V) and the source baseline recognises sources from the pixels.
  """
  evidence = []
  variants = audit.get("variants") or {}
  if "input_border" in variants:
    evidence.append(_kept("border", "a model trained and tested on border-only inputs",
                          audit["auroc"], variants["input_border"]["auroc"]))
  if (audit.get("probes") or {}).get("label"):
    probes = audit["probes"]["label"]
    op, where = (("no_lungs", "outside the lungs") if not audit["probes"]["lung_stand_in"] else
                 ("border_only", "on the border (not every image has a lung mask)"))
    evidence.append(_kept("outside_lungs", f"pixel probe on the pixels {where}",
                          probes["full"]["auroc"], probes[op]["auroc"]))
  table = {row["op"]: row for row in audit.get("perturbations") or []}
  if "no_lungs" in table:
    stand_in, images = audit["lung_masks"]["stand_in"], audit["lung_masks"]["images"]
    if 0 < stand_in < images:
      evidence.append({"evidence": "no_lungs", "level": "low", "text": (
          f"erasing the lungs: left out of the verdict, since {stand_in} of {images} test "
          "images have no lung mask (a fixed box stood in; the two kinds of erasure would "
          "themselves tell sources apart)")})
    else:
      whole, part = ({k[:-len("/auroc")]: v for k, v in table[op].items() if k.endswith("/auroc")}
                     for op in ("none", "no_lungs"))
      evidence.append(_kept("no_lungs", "the run's model with the lungs erased", whole, part))
  if "no_corners" in table:
    r = table["no_corners"]
    evidence.append({"evidence": "corners", "level": _level(CORNERS, r["accuracy_drop"]),
                     "text": f"erasing the corners moves the run's accuracy from "
                             f"{100 * table['none']['accuracy']:.1f}% to "
                             f"{100 * r['accuracy']:.1f}% (AUROC drop {r['auroc_drop']:+.3f}; "
                             f"{100 * r['flipped']:.1f}% of its predictions change)"})
  baseline = (audit.get("probes") or {}).get("source_baseline")
  evaluated = (audit.get("confounding") or {}).get("evaluated", {})
  if baseline and baseline["field"] in evaluated:
    field = baseline["field"]
    v, p = evaluated[field]["cramers_v"], evaluated[field]["p_value"]
    b = baseline["balanced_accuracy"]
    level = _level(CONFOUNDED, v, b) if p < P_CONFOUNDED else "low"
    evidence.append({"evidence": "confounding", "level": level, "text": (
        f"label x {field} Cramér's V {v:.2f} (chi-square p {p:.2g}) among the evaluated "
        f"images; the {field} baseline recognises {field}s with balanced accuracy {b:.2f} "
        f"(chance {1 / len(baseline['values']):.2f})")})
  risk = max((e["level"] for e in evidence), key=LEVELS.index, default="not assessed")
  return {"risk": risk, "evidence": evidence}


def caveats(audit: dict) -> list[str]:
  """What a reader of the audit's tables must know (the summary and report.html print it)."""
  out = []
  if (audit.get("lung_masks") or {}).get("stand_in"):
    m = audit["lung_masks"]
    out.append(f"{m['stand_in']} of {m['images']} test images have no lung mask: for them the "
               "perturbations' lung ops used the fixed box config.audit.lung_box")
  if (audit.get("probes") or {}).get("lung_stand_in"):
    out.append(f"{audit['probes']['lung_stand_in']} evaluated images have no lung mask: the "
               "lung probes used the fixed box for them, and where some images have masks and "
               "others the box, the erased shape alone can tell sources apart")
  return out


# --- the audit of one run ---------------------------------------------------------------------


def audit(config, cohort, plan, pooled: list[dict], whole: dict, scored: dict,
          variants: dict) -> dict:
  """The `shortcuts` block of results.json.

  Args:
    config: the run's config (config.audit, config.seed, config.data.image_size).
    cohort, plan: the run's.
    pooled: the pooled test predictions, one row per image (metrics.per_image), and
      `whole` their metrics (metrics.classification).
    scored: {"labels": [n], "none": [n, C] probs, op: [n, C] probs of the perturbed images,
      "has_lung": [n]} over every evaluation's test images (or {} when not perturbed).
    variants: {name: {"accuracy", "macro_auroc", "auroc", "images", "workdir"}} of the
      retrained runs (config.audit.retrain).
  """
  classes = list(plan.classes)
  rows = np.unique(np.concatenate([e.test for e in plan.evaluations]))
  partitions = {**plan.partition_rows(), "evaluated": rows}
  out = {"confounding": confounding(cohort.meta, partitions, plan.labels, classes),
         "accuracy": whole["accuracy"], "macro_auroc": whole["macro_auroc"],
         "auroc": {c: whole["per_class"][c]["auroc"] for c in classes},
         "input": config.audit.input, "variants": variants}
  field = group_field(cohort.meta, rows)
  out["within"] = {"field": field, "groups": within_groups(pooled, field, classes)}
  if scored:
    labels = scored["labels"]
    out["perturbations"] = perturbation_table(
        labels, scored["none"], {op: scored[op] for op in regions.OPS}, classes)
    out["lung_masks"] = {"images": int(len(labels)),
                         "stand_in": int(np.sum(~scored["has_lung"]))}
  if config.audit.probes:
    size = config.data.image_size
    ds = cohort.dataset(rows, plan.labels, size)
    images = pipeline.images(ds, range(len(rows)))
    x = downsample(np.stack([images[i] for i in range(len(rows))]))
    masks = cohort.masks(rows, PROBE_SIZE)
    keep = {op: np.broadcast_to(regions.keep_mask(op, PROBE_SIZE, config.audit, masks["lung"],
                                                  masks["has_lung"]), x.shape)
            for op in PROBE_INPUTS if op != "full"}
    out["probes"] = pixel_probes(
        x, plan.labels[rows], classes, cohort.meta["patient_id"][rows].astype(str), keep,
        field, cohort.meta[field][rows], config.seed)
    out["probes"]["lung_stand_in"] = int(np.sum(~masks["has_lung"]))
  out["caveats"] = caveats(out)
  out["verdict"] = verdict(out)
  return out


# --- retrained variants (config.audit.retrain) -------------------------------------------------

RETRAIN = ("border", "centre", "lungs", "no_lungs", "loso")


def retrain_names(config) -> list[str]:
  return [n.strip() for n in str(config.audit.retrain).split(",") if n.strip()]


def audit_variants(config, meta: dict, plan) -> dict:
  """{subdirectory: config} of the retrained runs config.audit.retrain asks for: the method on masked
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
    field = group_field(meta, rows)
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

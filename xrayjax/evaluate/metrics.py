"""Classification metrics that survive class imbalance, and fold aggregation."""

from __future__ import annotations

import numpy as np
from scipy import stats


def _ratio(num: float, den: float) -> float:
  return float(num / den) if den else float("nan")


def classification(labels: np.ndarray, probs: np.ndarray, classes,
                   prevalences: tuple[float, ...] = (), bins: int = 15) -> dict:
  """Overall and per-class (one-vs-rest) metrics.

  Args:
    labels: true class index per image.
    probs: [n, C] predicted class probabilities.
    classes: class names, in index order.
    prevalences: PPV and NPV are also given as they would be at these prevalences of each
      class (from its sensitivity and specificity, Bayes' rule): `ppv@0.01`, `npv@0.01`.
    bins: equal-width confidence bins of the calibration error and reliability curve.

  Returns:
    dict with accuracy, balanced_accuracy, macro_f1, macro_auroc, macro_auprc, ece (expected
    calibration error of the top-label confidence), reliability (per bin: mean confidence,
    accuracy, count), confusion (rows = truth, columns = prediction) and per_class[name] =
    sensitivity (recall), specificity, ppv (precision), one-vs-rest accuracy, npv, f1,
    auroc, auprc (average precision), support.
  """
  labels = np.asarray(labels)
  pred = probs.argmax(-1)
  k = len(classes)
  cm = confusion(labels, pred, k)
  per_class = {}
  for c, name in enumerate(classes):
    tp = cm[c, c]
    fn = cm[c].sum() - tp
    fp = cm[:, c].sum() - tp
    tn = cm.sum() - tp - fn - fp
    sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    positives = labels == c
    both = 0 < positives.sum() < len(labels)
    auroc = auroc_of(positives, probs[:, c]) if both else float("nan")
    auprc = average_precision(positives, probs[:, c]) if both else float("nan")
    spec = _ratio(tn, tn + fp)
    per_class[name] = {
        "sensitivity": sens, "specificity": spec, "ppv": ppv,
        "accuracy": _ratio(tp + tn, cm.sum()),  # one vs rest (paper 2's per-class accuracy)
        "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn), "auroc": auroc,
        "auprc": auprc, "support": int(tp + fn)}
    for p in prevalences:
      per_class[name][f"ppv@{p:g}"], per_class[name][f"npv@{p:g}"] = at_prevalence(sens, spec, p)
  present = [c for c in classes if per_class[c]["support"] > 0]
  return {
      "accuracy": float(np.mean(pred == labels)),
      "balanced_accuracy": float(np.mean([per_class[c]["sensitivity"] for c in present])),
      "macro_f1": float(np.mean([per_class[c]["f1"] for c in present])),
      "macro_auroc": _nanmean([per_class[c]["auroc"] for c in present]),
      "macro_auprc": _nanmean([per_class[c]["auprc"] for c in present]),
      **calibration(labels, probs, bins),
      "confusion": cm.tolist(),
      "per_class": per_class,
      "num_images": int(len(labels)),
  }


def confusion(labels: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
  """[k, k] counts of (true class, predicted class): rows are the truth."""
  return np.bincount(np.asarray(labels, np.int64) * k + pred, minlength=k * k).reshape(k, k)


# AUROC and average precision in numpy, equal to sklearn's roc_auc_score and
# average_precision_score (tests/test_metrics.py): sklearn's input checks cost about 40 ms per
# classification() of four classes, and a bootstrap calls it thousands of times.
def auroc_of(positives: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve: the Mann-Whitney statistic, ties counted one half."""
  positives = np.asarray(positives, bool)
  n_pos = int(positives.sum())
  n_neg = len(positives) - n_pos
  ranks = stats.rankdata(scores)
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(positives: np.ndarray, scores: np.ndarray) -> float:
  """Sum over the distinct score thresholds, highest first, of precision x recall's step."""
  order = np.argsort(-np.asarray(scores), kind="mergesort")
  ranked, hits = np.asarray(scores)[order], np.asarray(positives, bool)[order]
  last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # each threshold's last image
  tp = np.cumsum(hits)[last]
  precision, recall = tp / (last + 1), tp / tp[-1]
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def at_prevalence(sensitivity: float, specificity: float, prevalence: float
                  ) -> tuple[float, float]:
  """(PPV, NPV) of a test with this sensitivity and specificity at `prevalence` (Bayes)."""
  se, sp, p = sensitivity, specificity, prevalence
  return (_ratio(se * p, se * p + (1 - sp) * (1 - p)),
          _ratio(sp * (1 - p), sp * (1 - p) + (1 - se) * p))


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
  """Expected calibration error of the top-label confidence, and the reliability curve.

  ECE = sum over equal-width confidence bins of (bin size / n) |accuracy - confidence|.
  """
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  which = np.minimum((conf * bins).astype(int), bins - 1)
  curve, ece = [], 0.0
  for b in range(bins):
    sel = which == b
    if sel.any():
      acc, mean_conf = float(correct[sel].mean()), float(conf[sel].mean())
      ece += sel.sum() / len(labels) * abs(acc - mean_conf)
      curve.append({"bin": [b / bins, (b + 1) / bins], "confidence": mean_conf,
                    "accuracy": acc, "count": int(sel.sum())})
  return {"ece": float(ece), "reliability": curve}


def cluster_bootstrap(statistic, groups: np.ndarray, n_boot: int, seed: int,
                      level: float = 0.95) -> dict[str, dict[str, float]]:
  """Percentile intervals of `statistic(indices) -> {name: float}` resampling whole groups.

  Patients, not images, are drawn with replacement (a patient's images are correlated), so
  the interval reflects how many independent patients the estimate rests on.
  """
  rng = np.random.default_rng(seed)
  members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
  draws: dict[str, list[float]] = {}
  for _ in range(n_boot):
    pick = rng.integers(len(members), size=len(members))
    for k, v in statistic(np.concatenate([members[i] for i in pick])).items():
      draws.setdefault(k, []).append(v)
  tail = (1 - level) / 2 * 100
  out = {}
  for k, v in draws.items():
    v = np.asarray(v, np.float64)
    v = v[~np.isnan(v)]
    out[k] = ({"low": float(np.percentile(v, tail)), "high": float(np.percentile(v, 100 - tail)),
               "level": level} if len(v) else {"low": float("nan"), "high": float("nan"),
                                                "level": level})
  return out


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, classes,
                        n_boot: int, seed: int, prevalences: tuple[float, ...] = ()) -> dict:
  """Patient-clustered bootstrap 95% intervals of every scalar of `classification`."""
  def stat(idx):
    return flat(classification(labels[idx], probs[idx], classes, prevalences))
  return cluster_bootstrap(stat, np.asarray(patients), n_boot, seed)


def _nanmean(values) -> float:
  values = np.array(values, np.float64)
  values = values[~np.isnan(values)]
  return float(values.mean()) if len(values) else float("nan")


def flat(m: dict) -> dict[str, float]:
  """Scalar metrics of `classification` as flat names, e.g. `covid/sensitivity`."""
  out = {k: v for k, v in m.items() if isinstance(v, float)}
  for name, pc in m["per_class"].items():
    out.update({f"{name}/{k}": float(v) for k, v in pc.items() if k != "support"})
  return out


def across_folds(fold_metrics: list[dict]) -> dict:
  """Mean and sample sd (ddof=1) of every scalar over folds; summed confusion matrix."""
  flats = [flat(m) for m in fold_metrics]
  summary = {}
  for key in flats[0]:
    values = np.array([f[key] for f in flats], np.float64)
    finite = values[~np.isnan(values)]  # e.g. PPV of a class never predicted in a fold
    summary[key] = {"mean": float(finite.mean()) if len(finite) else float("nan"),
                    "sd": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
                    "folds_defined": int(len(finite))}
  confusion = np.sum([np.array(m["confusion"]) for m in fold_metrics], axis=0)
  return {"folds": len(fold_metrics), "metrics": summary, "confusion_summed": confusion.tolist()}


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


def per_group(predictions: list[dict], key: str, classes) -> dict:
  """Accuracy and confusion per value of `key` (e.g. source), over pooled test predictions
  (one row per image: per_image)."""
  index = {c: i for i, c in enumerate(classes)}
  out = {}
  for value in sorted({str(p[key]) for p in predictions}):
    rows = [p for p in predictions if str(p[key]) == value]
    labels = np.array([index[p["label"]] for p in rows])
    pred = np.array([index[p["prediction"]] for p in rows])
    cm = confusion(labels, pred, len(classes))
    out[value] = {"images": len(rows), "accuracy": float(np.mean(labels == pred)),
                  "confusion": cm.tolist(),
                  "sensitivity": {c: _ratio(cm[i, i], cm[i].sum()) for i, c in
                                  enumerate(classes) if cm[i].sum()}}
  return out

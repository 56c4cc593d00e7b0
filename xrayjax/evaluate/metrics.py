"""Classification metrics that survive class imbalance, and fold aggregation."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def _ratio(num: float, den: float) -> float:
  return float(num / den) if den else float("nan")


def classification(labels: np.ndarray, probs: np.ndarray, classes) -> dict:
  """Overall and per-class (one-vs-rest) metrics.

  Args:
    labels: true class index per image.
    probs: [n, C] predicted class probabilities.
    classes: class names, in index order.

  Returns:
    dict with accuracy, balanced_accuracy, macro_f1, macro_auroc, confusion
    (rows = truth, columns = prediction) and per_class[name] = sensitivity,
    specificity, ppv, npv, f1, auroc, support.
  """
  labels = np.asarray(labels)
  pred = probs.argmax(-1)
  k = len(classes)
  cm = skm.confusion_matrix(labels, pred, labels=list(range(k)))
  per_class = {}
  for c, name in enumerate(classes):
    tp = cm[c, c]
    fn = cm[c].sum() - tp
    fp = cm[:, c].sum() - tp
    tn = cm.sum() - tp - fn - fp
    sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    positives = labels == c
    auroc = (float(skm.roc_auc_score(positives, probs[:, c]))
             if 0 < positives.sum() < len(labels) else float("nan"))
    per_class[name] = {
        "sensitivity": sens, "specificity": _ratio(tn, tn + fp), "ppv": ppv,
        "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn), "auroc": auroc,
        "support": int(tp + fn)}
  present = [c for c in classes if per_class[c]["support"] > 0]
  return {
      "accuracy": float(np.mean(pred == labels)),
      "balanced_accuracy": float(np.mean([per_class[c]["sensitivity"] for c in present])),
      "macro_f1": float(np.mean([per_class[c]["f1"] for c in present])),
      "macro_auroc": _nanmean([per_class[c]["auroc"] for c in present]),
      "confusion": cm.tolist(),
      "per_class": per_class,
      "num_images": int(len(labels)),
  }


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


def per_group(predictions: list[dict], key: str, classes) -> dict:
  """Accuracy and confusion per value of `key` (e.g. source), over pooled test predictions.

  Each image is in exactly one fold's test set, so pooling the folds counts it once.
  """
  index = {c: i for i, c in enumerate(classes)}
  out = {}
  for value in sorted({str(p[key]) for p in predictions}):
    rows = [p for p in predictions if str(p[key]) == value]
    labels = np.array([index[p["label"]] for p in rows])
    pred = np.array([index[p["prediction"]] for p in rows])
    cm = skm.confusion_matrix(labels, pred, labels=list(range(len(classes))))
    out[value] = {"images": len(rows), "accuracy": float(np.mean(labels == pred)),
                  "confusion": cm.tolist(),
                  "sensitivity": {c: _ratio(cm[i, i], cm[i].sum()) for i, c in
                                  enumerate(classes) if cm[i].sum()}}
  return out

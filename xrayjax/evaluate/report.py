"""Run outputs: results.json, per-fold CSV, per-image predictions, printed summary."""

from __future__ import annotations

import os

import numpy as np

from xrayjax import files
from xrayjax.evaluate import metrics as metrics_lib


def write(workdir: str, results: dict, predictions: list[dict], name: str = "results") -> None:
  """Writes `{name}.json`, `{name}_folds.csv` (every metric per fold), `{name}_metrics.csv`
  (per metric: pooled value, bootstrap interval, fold mean and sd) and
  `{name}_predictions.csv`."""
  files.write_json(os.path.join(workdir, f"{name}.json"), results)
  rows = [{"fold": i, **metrics_lib.flat(m)} for i, m in enumerate(results["fold_metrics"])]
  files.write_csv(os.path.join(workdir, f"{name}_folds.csv"), rows)
  agg, ci = results["across_folds"]["metrics"], results.get("bootstrap_ci", {})
  files.write_csv(os.path.join(workdir, f"{name}_metrics.csv"), [
      {"metric": k, "pooled": v, "ci_low": ci.get(k, {}).get("low"),
       "ci_high": ci.get(k, {}).get("high"), "fold_mean": agg.get(k, {}).get("mean"),
       "fold_sd": agg.get(k, {}).get("sd")}
      for k, v in metrics_lib.flat(results["pooled"]).items()])
  files.write_csv(os.path.join(workdir, f"{name}_predictions.csv"), predictions)


def summary_text(results: dict) -> str:
  """A short human summary: protocol, fold mean ± sd, per class, summed confusion, per
  source, build reports and duplicates."""
  classes = results["classes"]
  agg = results["across_folds"]["metrics"]
  lines = [
      f"xrayjax DETL | model {results['model']} | protocol {results['protocol']} | "
      f"data {results['data']} | stage A: {results['stage_a']}",
  ]
  if results.get("warnings"):
    lines += [f"WARNING: {w}" for w in results["warnings"]]
  lines.append(f"{results['across_folds']['folds']}-fold cross-validation on Data-B "
               f"({results['num_images']} images, {results['num_patients']} patients):")
  for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
    lines.append(f"  {key:<18} {100 * agg[key]['mean']:6.2f}% ± {100 * agg[key]['sd']:.2f}")
  lines.append("  per fold: accuracy " + ", ".join(
      f"{100 * m['accuracy']:.2f}%" for m in results["fold_metrics"]) + "; macro AUROC " +
      ", ".join(f"{m['macro_auroc']:.3f}" for m in results["fold_metrics"]))
  ci = results.get("bootstrap_ci", {})
  if ci:
    pooled = metrics_lib.flat(results["pooled"])
    lines.append("  pooled over folds (95% interval, patient bootstrap): " + ", ".join(
        f"{k} {100 * pooled[k]:.1f}% ({100 * ci[k]['low']:.1f}-{100 * ci[k]['high']:.1f})"
        for k in ("accuracy", "macro_auroc", "macro_auprc", "ece") if k in ci))
  lines.append("  per class (mean over folds): sensitivity / specificity / PPV / AUROC")
  for c in classes:
    lines.append("    {:<14} {:6.2f}% / {:6.2f}% / {:6.2f}% / {:.3f}".format(
        c, *(100 * agg[f"{c}/{m}"]["mean"] for m in ("sensitivity", "specificity", "ppv")),
        agg[f"{c}/auroc"]["mean"]))
  cm = np.array(results["across_folds"]["confusion_summed"])
  width = max(len(c) for c in classes) + 2
  lines.append("  confusion matrix summed over folds (rows = truth, columns = prediction):")
  lines.append(" " * (width + 4) + "".join(f"{c[:width]:>{width}}" for c in classes))
  for c, row in zip(classes, cm):
    lines.append(f"    {c:<{width}}" + "".join(f"{v:>{width}d}" for v in row))
  if results.get("per_source"):
    lines.append("  per source (test predictions of all folds): images, accuracy, sensitivity")
    for src, m in results["per_source"].items():
      sens = ", ".join(f"{c} {100 * v:.1f}%" for c, v in m["sensitivity"].items())
      lines.append(f"    {src:<18} {m['images']:5d}  {100 * m['accuracy']:6.2f}%  ({sens})")
  for name, r in (results.get("build_reports") or {}).items():
    reasons = ", ".join(f"{k} {v}" for k, v in r["skipped_by_reason"].items()) or "none"
    lines.append(f"  data {name}: {r['built']} images built, {r['skipped']} skipped ({reasons})")
  if results.get("gradcam"):
    g = results["gradcam"]
    lines.append("  Grad-CAM: " + "; ".join(f"{k} {v['mean']:.3f} ({v['images']} images)"
                                             for k, v in g.items()) + " (report.html)")
  if results.get("duplicates"):
    d = results["duplicates"]
    lines.append(f"  duplicates: {d['exact_sets']} exact sets, {d['perceptual_pairs']} perceptual "
                 f"pairs, {d['dropped']} images dropped, {d['merged_patient_groups']} patient "
                 "groups merged (duplicates.json)")
  return "\n".join(lines)

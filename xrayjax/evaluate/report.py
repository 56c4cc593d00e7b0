"""Run outputs: results.json, per-fold CSV, per-image predictions, printed summary."""

from __future__ import annotations

import os

import numpy as np

from xrayjax import files
from xrayjax.evaluate import metrics as metrics_lib


def write(workdir: str, results: dict, predictions: list[dict], name: str = "results") -> None:
  """Writes `{name}.json`, `{name}_folds.csv` (every metric per fold), `{name}_metrics.csv`
  (per metric: pooled value, bootstrap interval, fold mean and sd), `{name}_predictions.csv`
  and the method's own tables, `{name}_{table}.csv` (methods.tables)."""
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
  for t in results.get("tables", []):
    files.write_csv(os.path.join(workdir, f"{name}_{t['name']}.csv"), t["csv"])


COMPARED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")
COMPARED_PER_CLASS = ("sensitivity", "specificity", "ppv", "auroc")


def summary_text(results: dict) -> str:
  """A short human summary: method, protocol, notes, fold mean ± sd, per class, paper 2's
  tables, summed confusion, per source, build reports and duplicates."""
  classes = results["classes"]
  agg = results["across_folds"]["metrics"]
  lines = verdict_lines(results.get("shortcuts")) + [
      f"xrayjax {results['method']} | model {results['model']} | protocol "
      f"{results['protocol']} | data {results['data']} | init {results['initialisation']}",
  ]
  lines += [f"  note: {n}" for n in results.get("notes", [])]
  lines.append("  stages (selected step of total" + (", its validation accuracy" if any(
      "val_accuracy" in st["selected_metrics"] for st in results["stages"]) else "") + "): " +
      "; ".join(f"{st['name']} {st['selected_step']}/{st['total_steps']}" + (
          f" {st['selected_metrics']['val_accuracy']:.3f}"
          if "val_accuracy" in st["selected_metrics"] else "") for st in results["stages"]))
  if results.get("warnings"):
    lines += [f"WARNING: {w}" for w in results["warnings"]]
  lines.append(f"{results['across_folds']['folds']}-fold evaluation "
               f"({results['num_images']} test images, {results['num_patients']} patients):")
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
  lines.append("  per class (mean over folds): sensitivity / specificity / PPV / NPV / AUROC")
  for c in classes:
    lines.append("    {:<14} {:6.2f}% / {:6.2f}% / {:6.2f}% / {:6.2f}% / {:.3f}".format(
        c, *(100 * agg[f"{c}/{m}"]["mean"] for m in ("sensitivity", "specificity", "ppv",
                                                      "npv")),
        agg[f"{c}/auroc"]["mean"]))
  prev = results.get("prevalences") or []
  if prev:
    pc = results["pooled"]["per_class"]
    lines.append("  PPV at prevalence " + ", ".join(f"{p:g}" for p in prev) + " (pooled): " +
                 "; ".join(f"{c} " + " / ".join(f"{100 * pc[c][f'ppv@{p:g}']:.1f}%"
                                                 for p in prev) for c in classes))
  lines += [f"  {line}" for t in results.get("tables", []) for line in t["summary"]]
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
    g, first = results["gradcam"], results["gradcam_folds"][0]
    scores = "; ".join(f"{k} {v['mean']:.3f} ({v['images']} images)" for k, v in g.items())
    lines.append(f"  Grad-CAM ({first['method']} on {first['target']}): {scores} (report.html)")
    for target, t in (results.get("gradcam_targets") or {}).items():
      scores = "; ".join(f"{k} {v['mean']:.3f}" for k, v in t.items())
      lines.append(f"    on {target}: {scores}")
  lines += audit_lines(results.get("shortcuts"))
  if results.get("duplicates"):
    d = results["duplicates"]
    lines.append(f"  duplicates: {d['exact_sets']} exact sets, {d['perceptual_pairs']} perceptual "
                 f"pairs; {duplicate_handling(d)} (duplicates.json)")
  return "\n".join(lines)


def verdict_lines(audit: dict | None) -> list[str]:
  """The shortcut audit's verdict and the evidence behind it (first in every summary)."""
  if not audit:
    return []
  v = audit["verdict"]
  return ([f"shortcut risk: {v['risk'].upper()} (the highest level of the evidence below; "
           "rule: docs/shortcut-audit.md)"] +
          [f"  [{e['level']}] {e['evidence']}: {e['text']}" for e in v["evidence"]])


def audit_lines(audit: dict | None) -> list[str]:
  """The shortcut audit's tables, in short."""
  if not audit:
    return []
  lines = []
  v = {f: e["cramers_v"] for f, e in audit["confounding"]["evaluated"].items()}
  lines.append("  shortcut audit: label x field Cramér's V among the evaluated images: " +
               ", ".join(f"{f} {x:.2f}" for f, x in v.items()) + " (every partition in "
               "results.json)")
  if audit.get("perturbations"):
    lines.append("  perturbed test images (the run's models): op, accuracy, macro AUROC, "
                 "AUROC drop, predictions flipped")
    for r in audit["perturbations"]:
      lines.append(f"    {r['op']:<12} {100 * r['accuracy']:6.2f}%  {r['macro_auroc']:.3f}  "
                   f"{r['auroc_drop']:+.3f}  {100 * r['flipped']:5.1f}%")
  if (audit.get("probes") or {}).get("label"):
    p = audit["probes"]
    lines.append("  pixel probes (logistic regression on 32x32 pixels, patient-grouped 5-fold), "
                 "macro AUROC: " + ", ".join(f"{k} {m['macro_auroc']:.3f}"
                                             for k, m in p["label"].items()))
    full = p["label"].get("full")
    if full and audit.get("auroc"):  # "the network learned" means more than this probe does
      lines.append(f"  this run against the full-image probe on the same images, AUROC: macro "
                   f"{audit['macro_auroc']:.3f} vs {full['macro_auroc']:.3f}; " +
                   ", ".join(f"{c} {audit['auroc'][c]:.3f} vs {full['auroc'][c]:.3f}"
                             for c in full["auroc"]))
    b = p["source_baseline"]
    if b:
      lines.append(f"  {b['field']} baseline (the probe predicting the {b['field']}): accuracy "
                   f"{100 * b['accuracy']:.1f}% (majority {100 * b['chance']:.1f}%), recall " +
                   ", ".join(f"{k} {100 * x:.0f}%" for k, x in b["recall"].items()))
  lines += [f"    note: {c}" for c in audit.get("caveats", [])]
  for value, m in audit["within"]["groups"].items():
    lines.append(f"  within {audit['within']['field']} {value} ({m['images']} images, "
                 f"{' vs '.join(m['classes'])}): accuracy {100 * m['accuracy']:.1f}%, macro "
                 f"AUROC {m['macro_auroc']:.3f}")
  if audit.get("variants"):
    lines.append("  retrained (config.audit.retrain): run, accuracy, macro AUROC, images")
    lines.append(f"    {'this run (' + audit['input'] + ')':<28} {100 * audit['accuracy']:6.2f}%  "
                 f"{audit['macro_auroc']:.3f}")
    for name, m in audit["variants"].items():
      lines.append(f"    {name:<28} {100 * m['accuracy']:6.2f}%  {m['macro_auroc']:.3f}  "
                   f"{m['images']}  ({m['workdir']})")
  return lines


def duplicate_handling(d: dict) -> str:
  """What the run did with the duplicates it found (the paper protocol only reports them)."""
  if d.get("applied", True):
    return f"{d['dropped']} images dropped, {d['merged_patient_groups']} patient groups merged"
  return (f"kept as the paper protocol does ({d['dropped']} copies and "
          f"{d['merged_patient_groups']} patient merges the corrected protocol would make)")


def compare_protocols(paper: dict, corrected: dict) -> list[dict]:
  """Per metric: fold mean ± sd under each protocol and the inflation (paper - corrected)."""
  a, b = paper["across_folds"]["metrics"], corrected["across_folds"]["metrics"]
  keys = list(COMPARED_METRICS) + [f"{c}/{m}" for c in paper["classes"]
                                   for m in COMPARED_PER_CLASS]
  ci = corrected.get("bootstrap_ci", {})
  return [{"metric": k, "paper_mean": a[k]["mean"], "paper_sd": a[k]["sd"],
           "corrected_mean": b[k]["mean"], "corrected_sd": b[k]["sd"],
           "corrected_pooled_ci_low": ci.get(k, {}).get("low"),
           "corrected_pooled_ci_high": ci.get(k, {}).get("high"),
           "inflation": a[k]["mean"] - b[k]["mean"]} for k in keys if k in a and k in b]


def compare_text(table: list[dict], paper: dict, corrected: dict) -> str:
  lines = [f"xrayjax {paper['method']} | model {paper['model']} | data {paper['data']}: the "
           "published protocol against the corrected one (fold mean ± sd; inflation = paper "
           "- corrected)",
           f"  paper: {paper['num_images']} test images, "
           f"{paper['data_summary']['test_patients_seen_in_training']} (fold, test patient) "
           f"pairs seen in training; corrected: {corrected['num_images']} test images, "
           f"{corrected['data_summary']['test_patients_seen_in_training']}",
           f"  {'metric':<26}{'paper':>17}{'corrected':>17}{'inflation':>11}"]
  for r in table:
    lines.append(f"  {r['metric']:<26}{100 * r['paper_mean']:8.2f}% ± {100 * r['paper_sd']:5.2f}"
                 f"{100 * r['corrected_mean']:8.2f}% ± {100 * r['corrected_sd']:5.2f}"
                 f"{100 * r['inflation']:+10.2f}")
  return "\n".join(lines)

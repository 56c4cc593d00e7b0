r"""Paired comparison of runs scored on the same test images.

  python -m xrayjax.compare RUN_A RUN_B [RUN_C ...] [--out=DIR] [--bootstrap=2000]

RUN_A is the reference; every other run is compared with it, image by image. A claim that
one run beats another is a difference measured on the same images, so runs whose evaluated
images differ (their splits.json records: other data, seed, folds or protocol) are refused.
For a protocol=both run name its protocol's directory (RUN/corrected or RUN/paper).

Per metric (accuracy, balanced accuracy, macro F1, macro AUROC, per-class sensitivity and
PPV): both runs' pooled values, their difference (other - reference) and its 95% interval
from a paired, patient-clustered bootstrap (the same patients drawn for both runs, so the
interval reflects that the runs share their test images and that a patient's images are
correlated). For accuracy also the exact McNemar test on the discordant images (one run
right, the other wrong); it treats images as independent, which patients with several
images are not, so read it beside the clustered interval. Writes compare.json and
compare.html to --out (default: beside RUN_A, compare_<A>_vs_<B>...), prints the table.

Exit status 0, or 2 when the runs cannot be compared (the message says why).
"""

from __future__ import annotations

import csv
import html
import os
import sys

import numpy as np
from scipy import stats

from xrayjax import files
from xrayjax.evaluate import metrics as metrics_lib

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")
PER_CLASS = ("sensitivity", "ppv")
SPLITS = "splits.json"


class NotComparable(ValueError):
  """The runs were not scored on the same test images, or a directory is not a run."""


def load(run_dir: str, name: str = "results", splits_dir: str | None = None) -> dict:
  """A finished run's classes, per-image pooled test predictions and evaluated patients:
  `name`.json and `name`_predictions.csv (results, or eval for --mode=eval's) in `run_dir`,
  splits.json in `splits_dir` (default: `run_dir`)."""
  need = [os.path.join(run_dir, f"{name}.json"), os.path.join(run_dir, f"{name}_predictions.csv"),
          os.path.join(splits_dir or run_dir, SPLITS)]
  missing = [p for p in need if not os.path.exists(p)]
  if missing:
    hint = ""
    if os.path.exists(os.path.join(run_dir, "compare.json")):
      hint = (f" It is a protocol=both run: name one protocol, {run_dir}/corrected or "
              f"{run_dir}/paper.")
    raise NotComparable(f"{run_dir} is not a finished run directory: {', '.join(missing)} "
                        f"missing.{hint}")
  results = files.read_json(need[0])
  classes = list(results["classes"])
  with open(need[1], newline="") as f:
    rows = [{**r, **{f"p_{c}": float(r[f"p_{c}"]) for c in classes}}
            for r in csv.DictReader(f)]
  # (the paper protocol may test an image in several folds: its probabilities are averaged)
  pooled = sorted(metrics_lib.per_image(rows, classes),
                  key=lambda r: (r["source"], r["image_id"]))
  index = {c: i for i, c in enumerate(classes)}
  splits = files.read_json(need[2])
  return {"dir": run_dir, "name": os.path.basename(os.path.normpath(run_dir)),
          "classes": classes, "images": [f"{r['source']}/{r['image_id']}" for r in pooled],
          "probs": np.array([[r[f"p_{c}"] for c in classes] for r in pooled]),
          "labels": np.array([index[r["label"]] for r in pooled]),
          "patients": np.array([r["patient_id"] for r in pooled]),
          "evaluated_patients": sorted({p for e in splits["evaluations"] for p in e["patients"]}),
          "protocol": results.get("protocol"), "model": results.get("model"),
          "initialisation": results.get("initialisation"),
          "prevalences": tuple(results.get("prevalences") or (0.01,))}


def check_same_images(reference: dict, other: dict) -> None:
  """Raises NotComparable unless both runs scored the same images with the same labels."""
  problems = []
  if reference["classes"] != other["classes"]:
    problems.append(f"classes {reference['classes']} against {other['classes']}")
  if reference["evaluated_patients"] != other["evaluated_patients"]:
    a, b = set(reference["evaluated_patients"]), set(other["evaluated_patients"])
    problems.append(f"their splits records evaluate other patients ({len(a - b)} only in "
                    f"{reference['name']}, {len(b - a)} only in {other['name']})")
  if reference["images"] != other["images"]:
    a, b = set(reference["images"]), set(other["images"])
    problems.append(f"{len(a - b)} test images only in {reference['name']}, {len(b - a)} only "
                    f"in {other['name']} (e.g. {sorted(a ^ b)[:3]})")
  elif not np.array_equal(reference["labels"], other["labels"]):
    problems.append("the same images carry other labels")
  if problems:
    raise NotComparable(
        f"{reference['dir']} and {other['dir']} were not scored on the same test images, so "
        "a paired comparison would not compare like with like: " + "; ".join(problems) +
        ". Compare runs of one data set, seed, folds and protocol (config args that change "
        "only the model, sampler or start keep the splits).")


def _scalars(labels, probs, classes, prevalences) -> dict[str, float]:
  m = metrics_lib.classification(labels, probs, classes, prevalences)
  out = {k: m[k] for k in METRICS}
  for c in classes:
    out.update({f"{c}/{k}": m["per_class"][c][k] for k in PER_CLASS})
  return out


def on_shared_images(a: dict, b: dict) -> tuple[dict, dict]:
  """Both runs restricted to the test images both scored (e.g. the two protocols of a
  protocol=both run, whose test sets differ), for a paired comparison on them."""
  shared = sorted(set(a["images"]) & set(b["images"]))
  if not shared:
    raise NotComparable(f"{a['dir']} and {b['dir']} share no test image")
  out = []
  for run in (a, b):
    keep = np.flatnonzero(np.isin(run["images"], shared))  # (both sorted the same way)
    out.append({**run, "images": [run["images"][i] for i in keep], "probs": run["probs"][keep],
                "labels": run["labels"][keep], "patients": run["patients"][keep],
                "evaluated_patients": sorted(set(run["patients"][keep].tolist()))})
  return out[0], out[1]


def mcnemar(reference_right: np.ndarray, other_right: np.ndarray) -> dict:
  """Exact McNemar test: discordant images and the two-sided binomial p-value."""
  only_ref = int(np.sum(reference_right & ~other_right))
  only_other = int(np.sum(~reference_right & other_right))
  n = only_ref + only_other
  p = float(stats.binomtest(only_ref, n, 0.5).pvalue) if n else 1.0
  return {"reference_only_right": only_ref, "other_only_right": only_other, "p_value": p}


def paired(reference: dict, other: dict, n_boot: int = 2000, seed: int = 0) -> dict:
  """The difference other - reference of every compared metric, with its paired
  patient-clustered bootstrap interval, and McNemar's test for accuracy."""
  check_same_images(reference, other)
  classes, labels = reference["classes"], reference["labels"]
  prev = reference["prevalences"]
  a = _scalars(labels, reference["probs"], classes, prev)
  b = _scalars(labels, other["probs"], classes, prev)

  def difference(idx):
    x = _scalars(labels[idx], reference["probs"][idx], classes, prev)
    y = _scalars(labels[idx], other["probs"][idx], classes, prev)
    return {k: y[k] - x[k] for k in x}

  ci = metrics_lib.cluster_bootstrap(difference, reference["patients"], n_boot, seed)
  rows = [{"metric": k, "reference": a[k], "other": b[k], "difference": b[k] - a[k],
           "ci_low": ci.get(k, {}).get("low", np.nan),
           "ci_high": ci.get(k, {}).get("high", np.nan)} for k in a]  # (no draws: no interval)
  test = mcnemar(reference["probs"].argmax(-1) == labels, other["probs"].argmax(-1) == labels)
  return {"reference": reference["dir"], "other": other["dir"], "images": len(labels),
          "patients": int(len(set(reference["patients"]))), "bootstrap": n_boot,
          "rows": rows, "mcnemar_accuracy": test}


def compare(run_dirs: list[str], n_boot: int = 2000, seed: int = 0) -> list[dict]:
  """Every run after the first against the first (paired)."""
  if len(run_dirs) < 2:
    raise NotComparable("name at least two run directories (the first is the reference)")
  runs = [load(d) for d in run_dirs]
  for other in runs[1:]:  # refuse before any bootstrap runs
    check_same_images(runs[0], other)
  return [paired(runs[0], other, n_boot, seed) for other in runs[1:]]


def _interval_excludes_zero(r: dict) -> bool:
  return r["ci_low"] > 0 or r["ci_high"] < 0


def text(comparisons: list[dict]) -> str:
  lines = []
  for c in comparisons:
    t = c["mcnemar_accuracy"]
    lines += [f"{c['other']} - {c['reference']}: {c['images']} test images of {c['patients']} "
              f"patients, paired patient bootstrap ({c['bootstrap']} draws)",
              f"  {'metric':<24}{'reference':>10}{'other':>10}{'difference':>12}  95% interval",
              *[f"  {r['metric']:<24}{100 * r['reference']:9.2f}%{100 * r['other']:9.2f}%"
                f"{100 * r['difference']:+11.2f}  [{100 * r['ci_low']:+.2f}, "
                f"{100 * r['ci_high']:+.2f}]{' *' if _interval_excludes_zero(r) else ''}"
                for r in c["rows"]],
              f"  accuracy, exact McNemar: {t['reference_only_right']} images right only in the "
              f"reference, {t['other_only_right']} only in the other; p = {t['p_value']:.4g}",
              "  (* the interval excludes 0)"]
  return "\n".join(lines)


def html_page(comparisons: list[dict]) -> str:
  parts = ["<!doctype html><meta charset='utf-8'><title>xrayjax paired comparison</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style>",
           "<h1>Paired comparison</h1><p>Difference = other - reference on the same test "
           "images; 95% interval from a paired, patient-clustered bootstrap. Bold: the "
           "interval excludes 0.</p>"]
  for c in comparisons:
    t = c["mcnemar_accuracy"]
    parts.append(f"<h2>{html.escape(c['other'])} − {html.escape(c['reference'])}</h2>"
                 f"<p>{c['images']} images of {c['patients']} patients; {c['bootstrap']} "
                 "bootstrap draws.</p><table><tr><th>metric</th><th>reference</th><th>other"
                 "</th><th>difference</th><th>95% interval</th></tr>")
    for r in c["rows"]:
      cell = (f"{100 * r['difference']:+.2f}" if not _interval_excludes_zero(r)
              else f"<b>{100 * r['difference']:+.2f}</b>")
      parts.append(f"<tr><td style='text-align:left'>{html.escape(r['metric'])}</td>"
                   f"<td>{100 * r['reference']:.2f}%</td><td>{100 * r['other']:.2f}%</td>"
                   f"<td>{cell}</td><td>[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"
                   "</td></tr>")
    parts.append(f"</table><p>Accuracy, exact McNemar: {t['reference_only_right']} images "
                 f"right only in the reference, {t['other_only_right']} only in the other; "
                 f"p = {t['p_value']:.4g}.</p>")
  return "\n".join(parts)


def default_out(run_dirs: list[str]) -> str:
  names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  parent = os.path.dirname(os.path.normpath(run_dirs[0]))
  return os.path.join(parent, "compare_" + "_vs_".join(names))


def write(out_dir: str, comparisons: list[dict]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  files.write_json(os.path.join(out_dir, "compare.json"), {"comparisons": comparisons})
  files.write_text(os.path.join(out_dir, "compare.html"), html_page(comparisons))


def main(argv: list[str]) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m xrayjax.compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", help="run directories; the first is the reference")
  parser.add_argument("--out", default=None, help="where compare.json and compare.html go")
  parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws")
  parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  args = parser.parse_args(argv)
  try:
    comparisons = compare(args.runs, args.bootstrap, args.seed)
  except NotComparable as e:
    print(f"xrayjax.compare: {e}", file=sys.stderr)
    return 2
  out = args.out or default_out(args.runs)
  write(out, comparisons)
  print(text(comparisons))
  print(f"written: {os.path.join(out, 'compare.json')}, {os.path.join(out, 'compare.html')}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

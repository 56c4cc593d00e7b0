"""report.html: one static page per run (opens from disk), with matplotlib figures as PNGs.

Sections: run and protocol, data (per class, source and split; build reports; duplicates),
metrics with patient-clustered bootstrap 95% intervals and fold mean ± sd, PPV and NPV at
the configured prevalences, per-source breakdown, confusion matrix, ROC and PR curves,
reliability diagram, Grad-CAM localisation scores and gallery. A small inline script counts
the images that loaded (`data-images-loaded` on <body>), which the browser test reads.
"""

from __future__ import annotations

import html
import os

import numpy as np

from xrayjax import files
from xrayjax.evaluate import metrics as metrics_lib
from xrayjax.evaluate import report

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "macro_auprc", "ece")
PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "auprc")
PLOTS = "plots"


def _figures(workdir: str, results: dict, predictions: list[dict], plots: str
             ) -> dict[str, str]:
  """Writes the PNGs; returns {name: relative path}."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  from sklearn import metrics as skm

  classes = results["classes"]
  labels = np.array([classes.index(r["label"]) for r in predictions])
  probs = np.array([[r[f"p_{c}"] for c in classes] for r in predictions])
  os.makedirs(os.path.join(workdir, plots), exist_ok=True)
  out = {}

  def save(fig, name):
    path = os.path.join(plots, f"{name}.png")
    fig.tight_layout()
    files.write_with(os.path.join(workdir, path), lambda p: fig.savefig(p, dpi=90))
    plt.close(fig)
    out[name] = path

  cm = np.array(results["across_folds"]["confusion_summed"])
  fig, ax = plt.subplots(figsize=(4.2, 3.6))
  ax.imshow(cm, cmap="Blues")
  for (i, j), v in np.ndenumerate(cm):
    ax.text(j, i, str(v), ha="center", va="center",
            color="white" if v > cm.max() / 2 else "black")
  ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
  ax.set_yticks(range(len(classes)), classes)
  ax.set_xlabel("predicted")
  ax.set_ylabel("truth")
  ax.set_title("Confusion matrix, summed over folds", fontsize=9)
  save(fig, "confusion")

  for kind in ("roc", "pr"):
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    for c, name in enumerate(classes):
      positives = labels == c
      if not 0 < positives.sum() < len(labels):
        continue
      if kind == "roc":
        x, y, _ = skm.roc_curve(positives, probs[:, c])
        area = metrics_lib.auroc_of(positives, probs[:, c])
      else:
        y, x, _ = skm.precision_recall_curve(positives, probs[:, c])
        area = metrics_lib.average_precision(positives, probs[:, c])
      ax.plot(x, y, label=f"{name} ({area:.3f})")
    if kind == "roc":
      ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate" if kind == "roc" else "recall")
    ax.set_ylabel("true positive rate" if kind == "roc" else "precision")
    ax.set_title(("ROC" if kind == "roc" else "Precision-recall") +
                 " (one vs rest, test predictions of all folds)", fontsize=8)
    ax.legend(fontsize=7)
    save(fig, kind)

  rel = results["pooled"]["reliability"]
  fig, ax = plt.subplots(figsize=(4.2, 3.6))
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.bar([(b["bin"][0] + b["bin"][1]) / 2 for b in rel], [b["accuracy"] for b in rel],
         width=[b["bin"][1] - b["bin"][0] for b in rel], alpha=0.6, edgecolor="k",
         label="accuracy per confidence bin")
  ax.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], "o-", ms=3)
  ax.set_xlabel("confidence (top class probability)")
  ax.set_ylabel("accuracy")
  ax.set_title(f"Reliability (ECE {results['pooled']['ece']:.3f})", fontsize=9)
  save(fig, "reliability")
  return out


def _table(header: list[str], rows: list[list]) -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
                 for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _pct(v) -> str:
  return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}%"


def _ci(results, key) -> str:
  ci = results.get("bootstrap_ci", {}).get(key)
  return f"{_pct(ci['low'])} – {_pct(ci['high'])}" if ci else "n/a"


def write(workdir: str, results: dict, predictions: list[dict], config: dict,
          name: str = "report") -> str:
  """Writes `{name}.html` and its figures (in plots/, or {name}_plots/ for other reports
  than the run's, so an evaluation never replaces the run's figures) into `workdir`;
  returns the path. `predictions`: the pooled test predictions, one row per image
  (metrics.per_image)."""
  figs = _figures(workdir, results, predictions, PLOTS if name == "report" else f"{name}_{PLOTS}")
  classes = results["classes"]
  agg = results["across_folds"]["metrics"]
  pooled = results["pooled"]
  metrics_flat = metrics_lib.flat(pooled)
  s = []
  s.append(f"<h1>xrayjax {html.escape(results['method'])}: {html.escape(results['model'])}, "
           f"protocol {html.escape(results['protocol'])}</h1>")
  s.append(f"<p>Data: {html.escape(results['data'])}; initialisation: "
           f"{html.escape(results['initialisation'])}; {results['num_images']} test images "
           f"of {results['num_patients']} patients; {results['across_folds']['folds']} folds; "
           f"{results['devices']} device(s); {results['seconds']:.0f} s.</p>")
  s += _verdict(results.get("shortcuts"))
  if results.get("notes"):
    s.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in results["notes"]) + "</ul>")
  s.append(_table(["stage", "what", "phases", "selected step", "of", "selected by"],
                  [[st["name"], st.get("description", ""), st.get("phases", 1),
                    st["selected_step"], st["total_steps"], st["select"]]
                   for st in results["stages"]]))
  for w in results.get("warnings", []):
    s.append(f"<p class='warn'>Warning: {html.escape(w)}</p>")

  s.append("<h2>Metrics</h2><p>Pooled: the test predictions of all folds (each image once). "
           "95% intervals: bootstrap over patients. Fold mean ± sd over the folds.</p>")
  s.append(_table(["metric", "pooled", "95% interval", "fold mean ± sd"],
                  [[k, _pct(metrics_flat[k]), _ci(results, k),
                    f"{_pct(agg[k]['mean'])} ± {_pct(agg[k]['sd'])}"]
                   for k in HEADLINE if k in metrics_flat]))
  s.append("<h3>Per class (one vs rest)</h3>")
  s.append(_table(["class", "support"] + list(PER_CLASS),
                  [[c, pooled["per_class"][c]["support"]] +
                   [f"{_pct(pooled['per_class'][c][m])} ({_ci(results, f'{c}/{m}')})"
                    for m in PER_CLASS] for c in classes]))
  if results.get("prevalences"):
    s.append("<h3>PPV and NPV at other prevalences</h3><p>From each class's pooled "
             "sensitivity and specificity (Bayes' rule), as a screening test would perform "
             "where the class is this common.</p>")
    prev = results["prevalences"]
    s.append(_table(["class"] + [f"PPV @ {p:g}" for p in prev] + [f"NPV @ {p:g}" for p in prev],
                    [[c] + [_pct(pooled["per_class"][c][f"ppv@{p:g}"]) for p in prev] +
                     [_pct(pooled["per_class"][c][f"npv@{p:g}"]) for p in prev]
                     for c in classes]))
  s.append("<h3>Per fold</h3>")
  s.append(_table(["fold", "images", "accuracy", "balanced accuracy", "macro AUROC"],
                  [[k, m["num_images"], _pct(m["accuracy"]), _pct(m["balanced_accuracy"]),
                    f"{m['macro_auroc']:.3f}"] for k, m in enumerate(results["fold_metrics"])]))
  for t in results.get("tables", []):  # the method's own (methods.tables)
    s.append(f"<h3>{html.escape(t['title'])}</h3>")
    s.append(_table(t["header"], t["rows"]))
  if results.get("per_source"):
    s.append("<h3>Per source</h3>")
    s.append(_table(["source", "images", "accuracy", "sensitivity per class"],
                    [[src, m["images"], _pct(m["accuracy"]),
                      ", ".join(f"{c} {_pct(v)}" for c, v in m["sensitivity"].items())]
                     for src, m in results["per_source"].items()]))
  s.append("<h2>Figures</h2><div class='row'>" + "".join(
      f"<img src='{figs[k]}' alt='{k}'>" for k in ("confusion", "roc", "pr", "reliability")) +
      "</div>")

  if results.get("gradcam"):
    g = results["gradcam"]
    s.append("<h2>Grad-CAM</h2>")
    first = results["gradcam_folds"][0]
    s.append(f"<p>Target map <code>{html.escape(first['target'])}</code>, method "
             f"{html.escape(first['method'])}. Localisation uses the map of the true class; "
             "the gallery shows the predicted class.</p>")
    labels = {"pointing_game": "pointing game (peak inside the lesion)",
              "energy_in_lesion": "share of the map inside the lesion",
              "energy_in_lungs": "share of the map inside the lungs",
              "randomisation_spearman": "rank correlation with the map after re-initialising "
                                        "the last conv block and head (lower is better)",
              "lesion_area": "chance level: the lesion's share of the image",
              "lung_area": "chance level: the lungs' share of the image"}
    s.append(_table(["score", "mean", "sd", "images", "all-zero maps (no score)"],
                    [[labels[k], f"{v['mean']:.3f}", f"{v['sd']:.3f}", v["images"],
                      v["undefined"]] for k, v in g.items()]))
    others = results.get("gradcam_targets") or {}
    if others:
      keys = [k for k in labels if k in g and k != "randomisation_spearman"]
      s.append("<p>The same network's other maps, scored the same way (true class):</p>")
      s.append(_table(["map"] + [labels[k] for k in keys],
                      [[html.escape(t)] + [f"{v[k]['mean']:.3f}" if k in v else "" for k in keys]
                       for t, v in {first["target"]: g, **others}.items()]))
    s.append("<div class='gallery'>")
    for r in results["gradcam_folds"]:
      for im in r["per_image"]:
        cls = "wrong" if im["misclassified"] else "right"
        s.append(f"<figure class='{cls}'><img src='gradcam/{html.escape(im['file'])}' "
                 f"alt='{html.escape(im['image'])}'><figcaption>fold {r['fold']}: "
                 f"{html.escape(im['label'])} → {html.escape(im['prediction'])} "
                 f"({100 * im['probability']:.0f}%)</figcaption></figure>")
    s.append("</div>")

  s += _audit(results.get("shortcuts"), classes)
  s.append("<h2>Data</h2>")
  ds = results["data_summary"]
  parts = ds["partitions"]
  s.append(_table(["partition"] + list(classes),
                  [[k] + [v.get(c, "") for c in classes] for k, v in parts.items()]))
  s.append("<h3>Evaluated images by source</h3>")
  s.append(_table(["source"] + list(classes),
                  [[src] + [n.get(c, 0) for c in classes]
                   for src, n in ds["evaluated_label_by_source"].items()]))
  if results.get("build_reports"):
    s.append("<h3>Build reports</h3>")
    s.append(_table(["source", "built", "skipped", "reasons", "report"],
                    [[k, r["built"], r["skipped"], ", ".join(
                        f"{a} {b}" for a, b in r["skipped_by_reason"].items()) or "none",
                      r["report"]] for k, r in results["build_reports"].items()]))
  if results.get("duplicates"):
    d = results["duplicates"]
    s.append(f"<p>Duplicates found before splitting: {d['exact_sets']} exact sets, "
             f"{d['perceptual_pairs']} perceptual pairs; "
             f"{html.escape(report.duplicate_handling(d))} (duplicates.json).</p>")
  s.append("<h2>Config</h2><pre>" + html.escape(_dump(config)) + "</pre>")
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xrayjax report</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; font-size: 14px; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border: 1px solid #bbb; padding: 2px 6px; text-align: left; font-size: 12px; }}
.warn {{ color: #a40; }} .row img {{ margin: 4px; }}
.verdict {{ border: 2px solid #888; padding: 4px 10px; margin: 0.5em 0; }}
.verdict.high {{ border-color: #b00; background: #fdecec; }}
.verdict.moderate {{ border-color: #c80; background: #fff6e0; }}
.verdict.low {{ border-color: #080; background: #eef8ee; }}
.gallery {{ display: flex; flex-wrap: wrap; }}
figure {{ margin: 4px; font-size: 11px; }} figure img {{ width: 300px; }}
figure.wrong figcaption {{ color: #b00; }}
pre {{ background: #f4f4f4; padding: 6px; font-size: 11px; }}
</style></head>
<body>
{chr(10).join(s)}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""
  path = os.path.join(workdir, f"{name}.html")
  files.write_text(path, page)
  return path


def _verdict(a: dict | None) -> list[str]:
  """The shortcut audit's verdict box (first on the page)."""
  if not a:
    return []
  v = a["verdict"]
  return [f"<div class='verdict {html.escape(v['risk'].replace(' ', '-'))}' id='shortcut-verdict'>"
          f"<b>Shortcut risk: {html.escape(v['risk'])}</b> (the highest level of the evidence "
          "below; the rule is in docs/shortcut-audit.md; details in "
          "<a href='#shortcut-audit'>Shortcut audit</a>)<ul>" +
          "".join(f"<li>[{html.escape(e['level'])}] {html.escape(e['evidence'])}: "
                  f"{html.escape(e['text'])}</li>" for e in v["evidence"]) + "</ul></div>"]


def _audit(a: dict | None, classes) -> list[str]:
  """The shortcut audit's tables: confounding, perturbations, probes, within-source metrics
  and the retrained variants."""
  if not a:
    return []
  s = ["<h2 id='shortcut-audit'>Shortcut audit</h2>"]
  conf = a["confounding"]
  fields = list(conf["evaluated"])
  s.append("<h3>Confounding: Cramér's V of label x field, per partition</h3><p>0: the field "
           "says nothing about the label; 1: it determines it. Chi-square p-values and the "
           "tables of every partition are in results.json.</p>")
  s.append(_table(["partition"] + fields,
                  [[name] + [_num(part[f]["cramers_v"]) for f in fields]
                   for name, part in conf.items()]))
  for f in fields:
    e = conf["evaluated"][f]
    if len(e["values"]) > 1:
      s.append(f"<p>Evaluated images, label x {html.escape(f)} (V {_num(e['cramers_v'])}, "
               f"p {e['p_value']:.2g}):</p>")
      s.append(_table(["label"] + e["values"],
                      [[c] + [e["table"][c][v] for v in e["values"]] for c in e["table"]]))
  if a.get("perturbations"):
    s.append("<h3>Perturbed test images</h3><p>Every test image scored again by its fold's "
             "model after each op (data/regions.py): top_crop cuts the top rows off, "
             "centre_only and border_only erase the border or the central box, no_corners the "
             "corner squares, lungs_only and no_lungs everything but the lungs or the lungs, "
             "mirror flips left-right. Drops are against the unperturbed images; flipped is "
             "the share of predictions that change.</p>")
    s.append(_table(["op", "accuracy", "macro AUROC", "accuracy drop", "AUROC drop", "flipped"] +
                    [f"{c} AUROC" for c in classes],
                    [[r["op"], _pct(r["accuracy"]), _num(r["macro_auroc"]),
                      _pct(r["accuracy_drop"]), _num(r["auroc_drop"]), _pct(r["flipped"])] +
                     [_num(r[f"{c}/auroc"]) for c in classes] for r in a["perturbations"]]))
  if (a.get("probes") or {}).get("label"):
    p = a["probes"]
    s.append("<h3>Pixel probes</h3><p>A logistic regression on the evaluated images at 32x32 "
             "pixels (patient-grouped 5-fold), from the whole image and from parts of it: a "
             "part that scores like the whole image carries the label without the lungs.</p>")
    s.append(_table(["input", "accuracy", "macro AUROC"] + [f"{c} AUROC" for c in classes],
                    [[k, _pct(m["accuracy"]), _num(m["macro_auroc"])] +
                     [_num(m["auroc"][c]) for c in classes] for k, m in p["label"].items()]))
    b = p["source_baseline"]
    if b:
      s.append(f"<p>{html.escape(b['field'].capitalize())} baseline: the same probe predicting "
               f"the {html.escape(b['field'])} reaches accuracy {_pct(b['accuracy'])} "
               f"(majority {_pct(b['chance'])}), balanced accuracy "
               f"{_pct(b['balanced_accuracy'])}; recall per {html.escape(b['field'])}: " +
               ", ".join(f"{html.escape(k)} {_pct(x)}" for k, x in b["recall"].items()) +
               ".</p>")
  s += [f"<p class='warn'>{html.escape(c)}.</p>" for c in a.get("caveats", [])]
  if a["within"]["groups"]:
    s.append(f"<h3>Within each {html.escape(a['within']['field'])}</h3>")
    s.append(_table([a["within"]["field"], "images", "classes", "accuracy", "macro AUROC"],
                    [[k, m["images"], " vs ".join(m["classes"]), _pct(m["accuracy"]),
                      _num(m["macro_auroc"])] for k, m in a["within"]["groups"].items()]))
  if a.get("variants"):
    s.append("<h3>Retrained (config.audit.retrain)</h3>")
    s.append(_table(["run", "accuracy", "macro AUROC"] + [f"{c} AUROC" for c in classes] +
                    ["images", "directory"],
                    [[f"this run ({a['input']})", _pct(a["accuracy"]), _num(a["macro_auroc"])] +
                     [_num(a["auroc"][c]) for c in classes] + ["", ""]] +
                    [[k, _pct(m["accuracy"]), _num(m["macro_auroc"])] +
                     [_num(m["auroc"].get(c, float("nan"))) for c in classes] +
                     [m["images"], m["workdir"]] for k, m in a["variants"].items()]))
  return s


def _num(v) -> str:
  return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _dump(config: dict, indent: int = 0) -> str:
  lines = []
  for k, v in config.items():
    if isinstance(v, dict):
      lines.append(" " * indent + f"{k}:")
      lines.append(_dump(v, indent + 2))
    else:
      lines.append(" " * indent + f"{k}: {v}")
  return "\n".join(lines)


def relative_files(report_path: str) -> list[str]:
  """The local files report.html refers to (for tests and packaging a run)."""
  import re
  with open(report_path) as f:
    return re.findall(r"src='([^']+)'", f.read())


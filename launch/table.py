"""The ranked table of a sweep: every trial's metric from its results, paired against rank 1
on their shared test images, written as sweep.json, sweep.csv and sweep.html."""

from __future__ import annotations

import html
import math
import os
import signal
import urllib.parse


from xrayjax import compare, files  # neither imports JAX nor TensorFlow

from launch.trials import (COMPARE, LOG, PROTOCOLS, RESULTS, TRIAL, Trial, duration, exit_note,
                           finished, read_if_present, short_labels)


SWEEP_JSON, TABLE_CSV, TABLE_HTML = "sweep.json", "sweep.csv", "sweep.html"


class MetricError(ValueError):
  pass


def read_metric(trial_dir: str, metric: str) -> tuple[float, dict, dict]:
  """(value, its results.json, extras) of `metric` (a dotted path) in a finished run.

  For protocol=both runs, a path starting with `paper.` or `corrected.` picks that
  protocol's results; otherwise the corrected protocol's. Extras: the bootstrap interval and
  fold mean and sd of pooled metrics, where results.json has them.
  """
  parts = metric.split(".")
  base = trial_dir
  if os.path.exists(os.path.join(trial_dir, COMPARE)):
    protocol = parts.pop(0) if parts[0] in PROTOCOLS else PROTOCOLS[0]
    base = os.path.join(trial_dir, protocol)
  path = os.path.join(base, RESULTS)
  results = files.read_json(path)
  node = results
  for i, part in enumerate(parts):
    if not isinstance(node, dict) or part not in node:
      where = ".".join(parts[:i]) or "the top level"
      keys = sorted(node) if isinstance(node, dict) else []
      raise MetricError(f"--metric={metric}: no {part!r} at {where} of {path}; there: "
                        f"{', '.join(keys[:30])}")
    node = node[part]
  if isinstance(node, bool) or not isinstance(node, (int, float)):
    raise MetricError(f"--metric={metric} is not a number in {path} (a {type(node).__name__})")
  extras = {}
  if parts[0] == "pooled" and len(parts) in (2, 4):  # pooled.X or pooled.per_class.C.X
    key = parts[1] if len(parts) == 2 else f"{parts[2]}/{parts[3]}"
    ci = (results.get("bootstrap_ci") or {}).get(key)
    if ci:
      extras.update(ci_low=ci["low"], ci_high=ci["high"])
    folds = (results.get("across_folds") or {}).get("metrics", {}).get(key)
    if folds:
      extras.update(fold_mean=folds["mean"], fold_sd=folds["sd"])
  return float(node), results, extras


def collect(trials: list[Trial], sweep_dir: str, metric: str, minimize: bool) -> list[dict]:
  """One row per trial: ranked finished trials first, then unranked, failed, unfinished."""
  labels = short_labels(list(dict.fromkeys(k for t in trials for k in t.overrides)))
  rows = []
  for t in trials:
    trial_dir = os.path.join(sweep_dir, t.name)
    record = read_if_present(os.path.join(trial_dir, TRIAL)) or {"attempts": []}
    attempts = record["attempts"]
    row = {"rank": None, "trial": t.name, "status": "", metric: None, "ci_low": None,
           "ci_high": None, "fold_mean": None, "fold_sd": None,
           **{label: t.overrides.get(k) for k, label in labels.items()},
           "seconds": round(sum(a["seconds"] or 0 for a in attempts), 1) or None,
           "exit_code": attempts[-1]["returncode"] if attempts else None,
           "report": None, "log": os.path.join(t.name, LOG), "note": ""}
    if finished(trial_dir):
      row["status"] = "finished"
      row["report"] = " ".join(
          os.path.join(t.name, *sub, "report.html") for sub in
          ([(p,) for p in PROTOCOLS] if os.path.exists(os.path.join(trial_dir, COMPARE))
           else [()]))
      try:
        value, results, extras = read_metric(trial_dir, metric)
        row[metric] = value
        row.update(extras)
        row["seconds"] = row["seconds"] or round(results.get("seconds", 0), 1) or None
      except MetricError as e:
        row["note"] = str(e)
    elif attempts and attempts[-1]["returncode"] != 0:
      code = attempts[-1]["returncode"]
      signals = (signal.SIGINT, signal.SIGTERM)  # killed by one (-n), or it checkpointed (128+n)
      stopped = code in [-s for s in signals] + [128 + s for s in signals]
      row["status"] = "stopped" if stopped else "failed"
      row["note"] = exit_note(code)
    elif attempts:  # exit 0 and no results: not a run that finished
      row["status"] = "failed"
      row["note"] = f"exited 0 without writing {RESULTS}"
    else:
      row["status"] = "unfinished" if os.path.exists(trial_dir) else "not started"
    rows.append(row)

  def order(row):
    value = row[metric]
    ranked = row["status"] == "finished" and value is not None and not math.isnan(value)
    group = 0 if ranked else {"finished": 1, "failed": 2}.get(row["status"], 3)
    return (group, (value if minimize else -value) if ranked else 0, row["trial"])
  rows.sort(key=order)
  for rank, row in enumerate((r for r in rows if order(r)[0] == 0), start=1):
    row["rank"] = rank
  paired_with_best(rows, sweep_dir, metric)
  return rows


def _run_dir(trial_dir: str, metric: str) -> str:
  """The run directory `metric` is read from (a protocol=both run's protocol)."""
  if not os.path.exists(os.path.join(trial_dir, COMPARE)):
    return trial_dir
  first = metric.split(".")[0]
  return os.path.join(trial_dir, first if first in PROTOCOLS else PROTOCOLS[0])


def paired_with_best(rows: list[dict], sweep_dir: str, metric: str, n_boot: int = 1000
                     ) -> None:
  """Each ranked trial's difference from the first, paired on the same test images
  (python -m xrayjax.compare's bootstrap), in `vs_best` and its interval; where the trials
  were scored on other images, or `metric` is none of compare's metrics, a note says so."""
  ranked = [r for r in rows if r["rank"] is not None]
  for r in rows:
    r.update(vs_best=None, vs_best_low=None, vs_best_high=None)
  parts = metric.split(".")
  if parts[0] in PROTOCOLS:
    parts = parts[1:]
  key = (parts[1] if parts[:1] == ["pooled"] and len(parts) == 2 else
         f"{parts[2]}/{parts[3]}" if parts[:2] == ["pooled", "per_class"] and len(parts) == 4
         else None)
  if len(ranked) < 2 or key is None:
    return
  try:
    best = compare.load(_run_dir(os.path.join(sweep_dir, ranked[0]["trial"]), metric))
  except compare.NotComparable:
    return
  for r in ranked[1:]:
    try:
      other = compare.load(_run_dir(os.path.join(sweep_dir, r["trial"]), metric))
      found = {x["metric"]: x for x in compare.paired(best, other, n_boot)["rows"]}.get(key)
    except compare.NotComparable as e:
      r["note"] = (r["note"] + " " if r["note"] else "") + f"not paired with rank 1: {e}"
      continue
    if found:
      r.update(vs_best=found["difference"], vs_best_low=found["ci_low"],
               vs_best_high=found["ci_high"])


def write_table(rows: list[dict], sweep_dir: str, metric: str, minimize: bool,
                info: dict) -> str:
  """sweep.csv and sweep.html in `sweep_dir`; returns the printed table."""
  files.write_csv(os.path.join(sweep_dir, TABLE_CSV), rows)
  files.write_text(os.path.join(sweep_dir, TABLE_HTML), _html(rows, metric, minimize, info))
  return _text(rows, metric, minimize, info, sweep_dir)


def _fmt(value, spec=".4f") -> str:
  if value is None:
    return "-"
  return format(value, spec) if isinstance(value, float) else str(value)


def _cells(row: dict, metric: str) -> tuple[str, str, str]:
  ci = (f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if row["ci_low"] is not None else "")
  folds = (f"{row['fold_mean']:.3f} ± {row['fold_sd']:.3f}" if row["fold_mean"] is not None
           else "")
  return _fmt(row[metric]), ci, folds


def _vs_best(row: dict) -> str:
  if row.get("vs_best") is None:
    return ""
  return (f"{row['vs_best']:+.4f} [{row['vs_best_low']:+.3f}, {row['vs_best_high']:+.3f}]")


def _summary(rows: list[dict], info: dict) -> str:
  counts = {}
  for r in rows:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  total = sum(r["seconds"] or 0 for r in rows)
  text = (f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
          f"; trial time {duration(total)} in all")
  if info.get("wall_seconds") is not None:
    text += f"; this invocation's wall time {duration(info['wall_seconds'])}"
  return text


def _text(rows, metric, minimize, info, sweep_dir) -> str:
  width = max(10, len(metric))
  lines = [f"ranked by {metric} ({'lower' if minimize else 'higher'} is better), "
           f"{os.path.join(sweep_dir, TABLE_CSV)}:",
           f"{'rank':>4}  {metric:>{width}}  {'95% CI':<16}  {'folds mean ± sd':<15}  "
           f"{'- rank 1, paired [95%]':<26}  {'seconds':>8}  trial"]
  for r in rows:
    if r["rank"] is not None:
      value, ci, folds = _cells(r, metric)
      lines.append(f"{r['rank']:>4}  {value:>{width}}  {ci:<16}  {folds:<15}  "
                   f"{_vs_best(r):<26}  {_fmt(r['seconds'], '.0f'):>8}  {r['trial']}")
  others = [r for r in rows if r["rank"] is None]
  if others:
    lines.append("not ranked:")
    for r in others:
      log = os.path.join(sweep_dir, r["log"])
      lines.append(f"  {r['trial']}: {r['status']}" + (f" ({r['note']})" if r["note"] else "")
                   + (f", log {log}" if os.path.exists(log) else ""))
  lines.append(_summary(rows, info))
  return "\n".join(lines)


def _link(path: str, text: str) -> str:
  # Relative links; "=" and "," (trial names) are legal in a URL path, so they stay readable.
  return f'<a href="{html.escape(urllib.parse.quote(path, safe="/=,+"))}">{html.escape(text)}</a>'


def _html(rows, metric, minimize, info) -> str:
  labels = [k for k in rows[0] if k not in ("rank", "trial", "status", metric, "ci_low",
                                              "ci_high", "fold_mean", "fold_sd", "seconds",
                                              "exit_code", "report", "log", "note", "vs_best",
                                              "vs_best_low", "vs_best_high")]
  head = ["rank", "trial", *labels, metric, "95% CI", "folds mean ± sd",
          "- rank 1, paired [95%]", "seconds", "status", "log"]
  body = []
  for r in rows:
    value, ci, folds = _cells(r, metric)
    reports = (r["report"] or "").split()
    if len(reports) == 1:
      trial = _link(reports[0], r["trial"])
    else:  # protocol=both: one report per protocol
      trial = html.escape(r["trial"]) + "".join(
          " " + _link(p, p.split("/")[-2]) for p in reports)
    status = r["status"] + (f": {r['note']}" if r["note"] else "")
    cells = [_fmt(r["rank"]), trial, *[html.escape(_fmt(r[k], "g")) for k in labels],
             value, ci, folds, _vs_best(r), _fmt(r["seconds"], ".0f"), html.escape(status),
             _link(r["log"], "log")]
    body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
  meta = "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>"
                 for k, v in info.items() if k != "wall_seconds")
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sweep {html.escape(info.get('sweep', ''))}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}th{{background:#eee}}</style>
</head><body>
<h1>Sweep ranked by {html.escape(metric)} ({'lower' if minimize else 'higher'} is better)</h1>
<p>{html.escape(_summary(rows, info))}</p>
<ul>{meta}</ul>
<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>
{chr(10).join(body)}
</table></body></html>
"""

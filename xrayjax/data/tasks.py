"""Label spaces and the rules that map every source's labels into them.

A task turns an image's source label, findings and source into a task class index (or
-1: not in the task) and a stratum (a sub-class with its own share of the class's quota,
e.g. the six findings that make up DETL's other_disease). Tasks can mix sources; every
example keeps its `source`. Splits and pipelines only ever see task indices.

Rules (label comparisons ignore case; "findings" are the common vocabulary below):
  normal (every task): label "normal" or "No Finding" (NIH, ieee8023, COVIDx, manifests) or
    RSNA's detailed class "Normal", with no finding.
  data_a (DETL stage A, paper §III-A): normal vs disease = any of NIH's 13 findings other
    than Pneumonia, on images without Pneumonia or COVID-19 (or a manifest's
    "other_disease").
  data_b (DETL stage B): normal; pneumonia = the Pneumonia finding without COVID-19 (NIH
    pneumonia images often carry other findings too; the paper used them); other_disease =
    exactly one of Atelectasis, Cardiomegaly, Infiltration, Effusion, Nodule, Mass, drawn
    equally from the six (paper: 50 each); covid = the COVID-19 finding. Manifest and
    synthetic labels name these classes directly.
  three_class (paper 2, the authors' mapping): RSNA "Normal" -> normal, RSNA Target 1
    ("Lung Opacity") -> pneumonia, ieee8023 COVID-19 -> covid, ieee8023 Pneumocystis /
    SARS / Streptococcus -> pneumonia; RSNA "No Lung Opacity / Not Normal" and other
    ieee8023 pneumonias are left out, as the authors did. Our additions, for the other
    sources: COVIDx and manifest labels by name, NIH No Finding / Pneumonia.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# NIH ChestX-ray14's fourteen findings plus COVID-19: the common vocabulary of
# the `findings` multi-hot feature in every source.
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion",
            "Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule",
            "Pleural_Thickening", "Pneumonia", "Pneumothorax", "COVID-19")
NIH_FINDINGS = FINDINGS[:14]
DETL_OTHER = ("Atelectasis", "Cardiomegaly", "Infiltration", "Effusion", "Nodule", "Mass")
AUTHORS_IEEE_PNEUMONIA = ("Pneumocystis", "SARS", "Streptococcus")
NORMAL_LABELS = ("normal", "no finding")

Rule = Callable[[str, frozenset, str], tuple[str | None, str]]


def _normal(label: str, found: frozenset) -> bool:
  return label.lower() in NORMAL_LABELS and not found


def _data_a(label: str, found: frozenset, source: str) -> tuple[str | None, str]:
  del source
  if _normal(label, found):
    return "normal", ""
  if label.lower() == "other_disease":
    return "disease", ""
  if found and not found & {"Pneumonia", "COVID-19"}:
    return "disease", ""
  return None, ""


def _data_b(label: str, found: frozenset, source: str) -> tuple[str | None, str]:
  del source
  lab = label.lower()
  if lab in ("normal", "pneumonia", "other_disease", "covid"):
    return lab, ""
  if _normal(label, found):
    return "normal", ""
  if "COVID-19" in found:
    return "covid", ""
  if "Pneumonia" in found:
    return "pneumonia", ""
  if len(found) == 1 and next(iter(found)) in DETL_OTHER:
    return "other_disease", next(iter(found))
  return None, ""


def _three_class(label: str, found: frozenset, source: str) -> tuple[str | None, str]:
  lab = label.lower()
  if _normal(label, found):
    return "normal", ""
  if source == "rsna_pneumonia":
    return ("pneumonia" if lab in ("lung opacity", "target 1") else None), ""
  if source == "ieee8023_covid":
    if "COVID-19" in found:
      return "covid", ""
    return ("pneumonia" if any(o.lower() in lab for o in AUTHORS_IEEE_PNEUMONIA) else None), ""
  if lab in ("covid", "covid-19", "positive"):
    return "covid", ""
  if lab == "pneumonia" or (source == "nih_cxr14" and "Pneumonia" in found):
    return "pneumonia", ""
  return None, ""


OTHER_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule")


def _other_findings(label: str, found: frozenset, source: str) -> tuple[str | None, str]:
  del label, source
  if len(found) == 1 and next(iter(found)) in OTHER_FINDINGS:
    return next(iter(found)), ""
  return None, ""


@dataclasses.dataclass(frozen=True)
class Task:
  """A label space and the rule that maps a source's labels into it."""
  name: str
  classes: tuple[str, ...]
  rule: Rule

  def assign(self, meta: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(task class index per image, -1 where not in the task; stratum per image)."""
    index = {c: i for i, c in enumerate(self.classes)}
    found = _finding_sets(meta)
    out = [self.rule(str(l), f, str(s)) for l, f, s in zip(meta["label"], found, meta["source"])]
    labels = np.array([index[c] if c is not None else -1 for c, _ in out], np.int32)
    return labels, np.array([s for _, s in out], dtype=object)

  def labels(self, meta: dict[str, np.ndarray]) -> np.ndarray:
    return self.assign(meta)[0]


def _finding_sets(meta) -> list[frozenset]:
  if "findings" not in meta:
    return [frozenset()] * len(meta["label"])
  names = np.array(FINDINGS)
  return [frozenset(names[row]) for row in np.asarray(meta["findings"], bool)]


TASKS = {
    "data_a": Task("data_a", ("normal", "disease"), _data_a),
    "data_b": Task("data_b", ("normal", "pneumonia", "other_disease", "covid"), _data_b),
    "three_class": Task("three_class", ("normal", "pneumonia", "covid"), _three_class),
    "other_findings": Task("other_findings", OTHER_FINDINGS, _other_findings),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
  return TASKS[name]


# --- where rows go: build reports and empty classes -------------------------------------------


def where_rows_went(built, skipped, examples: int = 5) -> dict:
  """Per task, the built rows it leaves out and the skipped rows of each of its classes.

  Args:
    built: (label, findings, source, place) of every built row; `place` is a JSON-ready
      dict naming the row (its metadata line and path).
    skipped: (label, findings, source, place, reason) of every row the build skipped.
    examples: places kept per label / class.

  Returns:
    {task: {"not_in_task": {label: {"rows": n, "examples": [place, ...]}},
            "skipped_by_class": {class: {"rows": n, "by_reason": {kind: n},
                                         "examples": [place + reason, ...]}}}}
  """
  out = {}
  for task in TASKS.values():
    left_out: dict[str, dict] = {}
    for label, found, source, place in built:
      if task.rule(label, frozenset(found), source)[0] is None:
        e = left_out.setdefault(label, {"rows": 0, "examples": []})
        e["rows"] += 1
        if len(e["examples"]) < examples:
          e["examples"].append(place)
    lost: dict[str, dict] = {}
    for label, found, source, place, reason in skipped:
      c = task.rule(label, frozenset(found), source)[0] if label else None
      if c is None:
        continue
      e = lost.setdefault(c, {"rows": 0, "by_reason": {}, "examples": []})
      e["rows"] += 1
      kind = reason_kind(reason)
      e["by_reason"][kind] = e["by_reason"].get(kind, 0) + 1
      if len(e["examples"]) < examples:
        e["examples"].append({**place, "reason": reason})
    out[task.name] = {"not_in_task": left_out, "skipped_by_class": lost}
  return out


def reason_kind(reason: str) -> str:
  """The kind of a skip reason ("missing file", "unreadable image", ...), for counting."""
  return reason.split(":")[0].split(" (")[0]


def _places(examples: list[dict], total: int, listed_in: str) -> str:
  """"manifest.csv lines 3, 7, ..." from build-report places."""
  lines = [e.get("line") for e in examples if e.get("line") not in (None, "")]
  more = ", ..." if total > len(lines) else ""
  if lines and all(isinstance(l, int) for l in lines):
    name = listed_in.replace("\\", "/").rsplit("/", 1)[-1] if listed_in else "metadata"
    word = "line" if len(lines) == 1 and not more else "lines"
    return f"{name} {word} {', '.join(map(str, lines))}{more}"
  if lines:
    return ", ".join(map(str, lines)) + more
  return ", ".join(str(e.get("path")) for e in examples) + more


def not_in_task_text(build: dict, task: str, labels: int = 4) -> str:
  """One line of a build report's rows that `task` leaves out, e.g. "12 rows: 'COVID-19' 12
  (manifest.csv lines 3, 7, 9, ...)"; "" when none."""
  left_out = build.get("tasks", {}).get(task, {}).get("not_in_task", {})
  if not left_out:
    return ""
  order = sorted(left_out, key=lambda l: -left_out[l]["rows"])
  listed_in = build.get("listed_in", "")
  parts = []
  for label in order[:labels]:
    e = left_out[label]
    parts.append(f"{label!r} {e['rows']} ({_places(e['examples'][:3], e['rows'], listed_in)})")
  if len(order) > labels:
    parts.append(f"{len(order) - labels} more labels")
  return f"{sum(e['rows'] for e in left_out.values())} rows: " + "; ".join(parts)


class EmptyClassError(ValueError):
  """A class of a task with no image: the message says where its rows went."""


def check_classes(task: Task, meta, scope: np.ndarray, what: str, advice: str = "") -> None:
  """Raises EmptyClassError unless every class of `task` has an image among the rows in
  `scope` (a boolean mask over `meta`'s rows).

  The message names each empty class and where rows went: rows of `scope` whose label the
  task leaves out (per label, with metadata lines from the build report; a label that
  resembles the class's name, e.g. 'COVID-19' for covid, is named under the class), rows
  the build skipped that would have been the class, and images dropped as duplicates. Build
  reports and duplicates come from `meta.builds` and `meta.dropped` (cohort.Metadata); a
  plain dict of arrays gives the counts without them. `advice` ends the message (what else
  the caller's method can do).
  """
  scope = np.asarray(scope, bool)
  labels = task.labels(meta)
  empty = [c for i, c in enumerate(task.classes) if not np.any(labels[scope] == i)]
  if not empty:
    return
  builds = getattr(meta, "builds", None) or []
  builder = np.asarray(meta["builder"]) if "builder" in meta else np.zeros(len(labels), int)
  in_scope = sorted(set(builder[scope].tolist()))
  left = _left_out(meta, scope, labels, builder, builds, task)
  named = set()
  lines = []
  for c in empty:
    why = []
    for item in left:
      if _resembles(item["label"], c):
        named.add(id(item))
        why.append(item["text"])
    why += _skipped_or_dropped(task, c, meta, scope, builds, in_scope)
    lines.append(f"class {c!r} of task {task.name!r} has no images in {what}: "
                 + ("; ".join(why) if why else "no row of the sources was of this class, and "
                    "the build skipped none and no duplicate was dropped"))
  rest = [item["text"] for item in left if id(item) not in named]
  if rest:
    lines.append("other rows the task leaves out (a class's rows may be among them under "
                 "another name): " + "; ".join(rest[:6])
                 + (f"; ... {len(rest) - 6} more labels" if len(rest) > 6 else ""))
  lines.append(f"Task {task.name!r} takes the classes {list(task.classes)} (its rules: "
               "xrayjax/data/tasks.py). Label those rows with one of them (a manifest: its "
               "label column, --config.data.manifest.label_column), add a source that has the "
               "class, or fix the files the build skipped (build_report.json lists each)."
               + (f" {advice}" if advice else ""))
  raise EmptyClassError("\n  ".join(lines))


def _rows(n: int) -> str:
  return f"{n} row" if n == 1 else f"{n} rows"


def _squash(text: str) -> str:
  return "".join(ch for ch in text.lower() if ch.isalnum())


def _resembles(label: str, cls: str) -> bool:
  """'COVID-19' ~ covid, 'Pneumonia/Viral' ~ pneumonia, 'Other disease' ~ other_disease."""
  a, b = _squash(label), _squash(cls)
  return bool(a) and (a.startswith(b) or b.startswith(a))


def _skipped_or_dropped(task, c, meta, scope, builds, in_scope) -> list[str]:
  """Where rows of class `c` went besides a label the task leaves out: skipped by the
  build, dropped as duplicates."""
  out = []
  for b in in_scope:
    build = builds[b] if b < len(builds) else None
    report = (build or {}).get("report") or {}
    lost = report.get("tasks", {}).get(task.name, {}).get("skipped_by_class", {})
    if c in lost:
      e = lost[c]
      kinds = sorted(e["by_reason"].items(), key=lambda kv: -kv[1])
      reasons = kinds[0][0] if len(kinds) == 1 else ", ".join(f"{n} {k}" for k, n in kinds)
      paths = ", ".join(str(x.get("path")) for x in e["examples"][:3])
      out.append(f"{_rows(e['rows'])} of {build['name']} {'was' if e['rows'] == 1 else 'were'} "
                 f"skipped while building: {reasons} at "
                 f"{_places(e['examples'], e['rows'], report.get('listed_in', ''))} ({paths}"
                 f"{', ...' if e['rows'] > 3 else ''}); every skipped row and its reason is in "
                 f"{build['file']}")
  dropped = getattr(meta, "dropped", None)
  if dropped is not None and len(dropped.get("label", ())):
    mask = np.isin(dropped["builder"], in_scope)
    if "role" in dropped and "role" in meta:
      mask &= np.isin(dropped["role"], list(set(np.asarray(meta["role"])[scope].tolist())))
    n = int(np.sum(task.labels(dropped)[mask] == task.classes.index(c)))
    if n:
      out.append(f"{_rows(n)} {'was' if n == 1 else 'were'} dropped as duplicates of other "
                 "images (the corrected protocol drops copies; a run's duplicates.json lists "
                 "them)")
  return out


def _left_out(meta, scope, labels, builder, builds, task, per_source: int = 20) -> list[dict]:
  """Rows of `scope` that `task` leaves out, per source and label (most rows first), each
  with a text naming its count and first metadata lines."""
  out = []
  rows = np.flatnonzero(scope & (labels < 0))
  for b in sorted(set(builder[rows].tolist())):
    mine = rows[builder[rows] == b]
    row_labels = np.asarray(meta["label"])[mine].astype(str)
    names, counts = np.unique(row_labels, return_counts=True)
    build = builds[b] if b < len(builds) else None
    report = (build or {}).get("report") or {}
    listed = report.get("tasks", {}).get(task.name, {}).get("not_in_task", {})
    source = f" in {build['name']}" if build else ""
    for k in np.argsort(-counts, kind="stable")[:per_source]:
      label, n = str(names[k]), int(counts[k])
      if label in listed:
        where = _places(listed[label]["examples"], n, report.get("listed_in", ""))
      else:
        ids = np.asarray(meta["image_id"])[mine][row_labels == label]
        where = ", ".join(map(str, ids[:3])) + (", ..." if n > 3 else "")
      out.append({"label": label, "text": f"{_rows(n)} labelled {label!r}{source} "
                                          f"{'was' if n == 1 else 'were'} dropped as not in "
                                          f"the task ({where})"})
  return out

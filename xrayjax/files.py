"""Run-directory files written atomically: a crash never leaves half a file."""

from __future__ import annotations

import csv
import json
import os


def write_with(path: str, save) -> None:
  """`save(tmp_path)` writes the file (e.g. matplotlib's savefig); it lands atomically at
  `path`. The temporary name keeps the suffix, so writers that infer the format work."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{ext}"
  save(tmp)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  def save(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  write_with(path, save)


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_csv(path: str, rows: list[dict]) -> None:
  """Rows of dicts; the header is the union of keys in first-seen order."""
  fields: list[str] = []
  for row in rows:
    fields.extend(k for k in row if k not in fields)

  def save(tmp):
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      writer.writerows(rows)
  write_with(path, save)

"""Run-directory files written atomically: a crash never leaves half a file, and a full disk
is one clear error (DiskFullError), not a traceback."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(RuntimeError):
  """No space left (or the quota reached) where a run writes: what was being written, where,
  how much is free there, and that the same command resumes once space is freed."""


def no_space(e: BaseException | None) -> bool:
  """Whether `e`, or an exception it was raised from, is a full disk or an exceeded quota
  (orbax re-raises its writers' errors from other threads, wrapped)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno in NO_SPACE) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def free_space(path: str) -> str:
  """Free space on the file system holding `path` (or its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  free = shutil.disk_usage(path).free
  if free < 1024:
    return f"{free} bytes"
  for unit in ("KB", "MB", "GB"):
    free /= 1024
    if free < 1024 or unit == "GB":
      break
  return f"{free:.1f} {unit}"


def disk_full(what: str, where: str, resumes: str = "where it stopped") -> DiskFullError:
  return DiskFullError(
      f"no space left on device while writing {what} to {where} ({free_space(where)} free "
      f"there). What was written before is intact. Free space (or give the run a --workdir "
      f"on a larger disk) and run the same command again: it resumes {resumes}.")


def write_with(path: str, save) -> None:
  """`save(tmp_path)` writes the file (e.g. matplotlib's savefig); it lands atomically at
  `path`. The temporary name keeps the suffix, so writers that infer the format work."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{ext}"
  try:
    save(tmp)
    os.replace(tmp, path)
  except OSError as e:
    if not no_space(e):
      raise
    if os.path.exists(tmp):
      os.remove(tmp)
    raise disk_full(os.path.basename(path), os.path.dirname(os.path.abspath(path))) from None


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

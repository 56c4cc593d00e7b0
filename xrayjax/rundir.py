"""The run directory is a contract: its models are only ever scored on the splits they were
trained for.

A run records, before it trains, what its splits were made from (`fingerprint.json`: the
split-determining config fields and, per data source, the builder and the files on disk
with their sizes and modification times, and the manifest's hash) beside `splits.json`
(the image keys and patient ids of every partition). Resuming, re-running or `--mode=eval`
recomputes both and refuses when anything differs, naming what changed: with other data
or splits, a "held-out" image may be one the model trained on. Neither file is ever
overwritten. Trained models can still be scored on new data as an *external* test set
(`--eval_data`), with images that were in their training data left out.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import hashlib
import json
import os
import socket
import sys
import tempfile
import time

import flax
import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from xrayjax import files, methods, sharding
from xrayjax.data import sources
from xrayjax.data.sources import manifest, native

# Every file the runner writes into a run directory by name.
CONFIG = "config.json"  # the run's config (a changed one is refused, or kept beside it)
PLAN = "plan.json"  # the plan as trained: stages, phases, evaluations (methods.Plan.describe)
DUPLICATES = "duplicates.json"  # near-duplicate pairs found and what the protocol did with them
FINGERPRINT = "fingerprint.json"
SPLITS = "splits.json"
LOCK = "run.lock"
# Config fields that decide which image lands in which partition, for every method (each
# method adds its own, methods.<m>.SPLIT_FIELDS).
SPLIT_FIELDS = ("method", "protocol", "seed", "folds", "data", "dedup")


class ChangedError(ValueError):
  """The data or the splits differ from those the run directory's models were trained on."""


class LockedError(RuntimeError):
  """Another live job holds the run directory."""


# --- what a run records -----------------------------------------------------------------------


def split_config(config, method_fields: tuple[str, ...]) -> dict:
  """The split-determining fields of `config`, flattened ("data.synthetic.seed": 0)."""
  flat = flax.traverse_util.flatten_dict(plain(config.to_dict()), sep=".")
  prefixes = SPLIT_FIELDS + tuple(method_fields)
  return {k: v for k, v in sorted(flat.items())
          if any(k == p or k.startswith(p + ".") for p in prefixes)}


def data_fingerprint(cohort) -> dict:
  """Per source of the cohort: its TFDS builder (name, config, version) and its inputs on
  disk (the manifest's SHA-256 and listed files, or every file under a native root, each
  with size and mtime). Synthetic sources have no inputs: the builder's config is their
  content."""
  out = {}
  for name, b in zip(cohort.names, cohort.builders):
    cfg = b.builder_config
    entry = {"builder": b.info.full_name, "version": str(b.version)}
    if getattr(cfg, "manifest", ""):
      with open(cfg.manifest, "rb") as f:
        entry["manifest"] = cfg.manifest
        entry["manifest_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
      entry["files"] = native.stats(cfg.root, manifest.listed_paths(cfg.manifest))
    elif getattr(cfg, "root", ""):
      entry["root"] = cfg.root
      entry["files"] = native.stats(cfg.root, native.walk(cfg.root))
    out[name] = entry
  return out


def records(config, cohort, plan) -> tuple[dict, dict]:
  """What a run directory records about its data and splits (check's arguments):
  ({"split_config", "data"}, the splits record)."""
  # What the model sees and which images it leaves out decide its data too (recorded only
  # when set, so run directories from before the audit existed still match).
  fields = methods.get(config.method).SPLIT_FIELDS
  if config.audit.input != "full" or config.audit.leave_out:
    fields += ("audit.input", "audit.leave_out", "audit.centre", "audit.lung_box")
  return ({"split_config": split_config(config, fields), "data": data_fingerprint(cohort)},
          splits_record(cohort, plan))


def splits_record(cohort, plan) -> dict:
  """Image keys and patient ids of every partition of the plan (what splits.json holds),
  and the content hashes of every image a stage trained on (to keep them out of an external
  test set)."""
  meta = cohort.meta

  def part(rows):
    return {"keys": cohort.keys(rows), "patients": sorted(set(map(str, meta["patient_id"][rows])))}

  trained = np.unique(np.concatenate([s.rows() for s in plan.stages]))
  return {
      "stages": {s.name: {"phases": [part(p.train) for p in s.phases], "val": part(s.val)}
                 for s in plan.stages},
      "evaluations": [{"fold": e.fold, "stage": e.stage, **part(e.test)}
                      for e in plan.evaluations],
      "trained_sha1": sorted(set(map(str, meta["file_sha1"][trained]))),
  }


# --- the check --------------------------------------------------------------------------------


def check_run(workdir: str, config, cohort, plan) -> bool:
  """`check` of `workdir` against what `config`, `cohort` and `plan` would train on."""
  return check(workdir, *records(config, cohort, plan), _eval_data_hint(config))


def _eval_data_hint(config) -> str:
  source = str(config.data.source)
  if "," in source or source not in sources.SOURCES or source == "synthetic":
    return ""
  return f" (e.g. {source}:<its new path>)"


def check(workdir: str, current: dict, splits: dict, eval_data_hint: str = "") -> bool:
  """Compares a run directory's records with `current` ({"split_config", "data"}) and
  `splits` (splits_record), recomputed now. Returns False for a new run directory (nothing
  recorded yet), True when everything matches; raises ChangedError naming every difference
  otherwise."""
  path = os.path.join(workdir, SPLITS)
  if not os.path.exists(path):
    return False
  saved_splits = files.read_json(path)
  fp_path = os.path.join(workdir, FINGERPRINT)
  problems = []
  if os.path.exists(fp_path):
    saved = files.read_json(fp_path)
    problems += [f"split-determining config field {d}"
                 for d in diff(saved["split_config"], current["split_config"])]
    problems += _data_changes(saved["data"], current["data"])
  problems += _split_changes(saved_splits, splits)
  if not problems:
    return True
  shown = problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else [])
  raise ChangedError(
      f"{workdir} was trained on other data or splits than this command would use, so its "
      "models could be scored on images they trained on. Nothing was run or written. What "
      "changed:\n  - " + "\n  - ".join(shown) +
      "\nTo train on the new data or config, use a new --workdir. To score this run's trained "
      f"models on new data as an external test set: python -m xrayjax.main --mode=eval "
      f"--workdir={workdir} --eval_data=SOURCE:PATH{eval_data_hint} (--allow_config_change "
      "cannot override a split-determining field).")


def plain(obj):
  """`obj` with tuples as lists (what a JSON round trip gives back)."""
  if isinstance(obj, dict):
    return {k: plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v) for v in obj]
  return obj


def diff(old: dict, new: dict) -> list[str]:
  """"field: old -> new" for every flat key whose value differs."""
  return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _some(names, n: int = 3) -> str:
  names = sorted(names)
  return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _paired(old: dict, new: dict, what: str, gone: str, out: list[str]):
  """(name, old entry, new entry) of names in both; names in one only are reported in `out`
  ("<what> <name> is new", "<what> <name> is no longer <gone>")."""
  for name in sorted(set(old) | set(new)):
    if name not in new:
      out.append(f"{what} {name} is no longer {gone}")
    elif name not in old:
      out.append(f"{what} {name} is new")
    else:
      yield name, old[name], new[name]


def _data_changes(old: dict, new: dict) -> list[str]:
  out = []
  for name, a, b in _paired(old, new, "data source", "used", out):
    # A source whose inputs are recorded file by file (below) is compared by those files: its
    # builder's config name also encodes their listing (older runs' names did not).
    by_files = "files" in a and "files" in b and a["version"] == b["version"]
    if a["builder"] != b["builder"] and not (
        by_files and a["builder"].split("/")[0] == b["builder"].split("/")[0]):
      out.append(f"data source {name}: builder {a['builder']} -> {b['builder']}")
    if a.get("manifest_sha256") != b.get("manifest_sha256"):
      out.append(f"data source {name}: the manifest {b.get('manifest')} changed (rows or labels)")
    fa, fb = a.get("files", {}), b.get("files", {})
    added = [f for f in fb if f not in fa or (fa[f] is None and fb[f] is not None)]
    removed = [f for f in fa if fa[f] is not None and fb.get(f) is None]
    changed = [f for f in fa if f in fb and fa[f] and fb[f] and fa[f] != fb[f]]
    where = b.get("root") or os.path.dirname(b.get("manifest", ""))
    for what, found in (("added", added), ("removed", removed),
                        ("changed (size or modification time)", changed)):
      if found:
        out.append(f"data source {name}: {len(found)} file(s) {what} under {where}: "
                   f"{_some(found)}")
  return out


def _parts(record) -> dict:
  """Every partition of a splits record by name (methods.partition_name), tests by fold."""
  out = {}
  for name, s in record["stages"].items():
    for j, p in enumerate(s["phases"]):
      out[methods.partition_name(name, j, len(s["phases"]))] = p
    out[f"{name}/val"] = s["val"]
  for e in record["evaluations"]:
    out[f"fold{e['fold']}/test ({e['stage']})"] = e
  return out


def _keys(part) -> set[str]:
  """A partition's image keys; splits.json of older runs held bare lists (test sets under
  "test"), without patients."""
  if isinstance(part, list):
    return set(part)
  return set(part["keys"] if "keys" in part else part["test"])


def _split_changes(old: dict, new: dict) -> list[str]:
  out = []
  for name, a, b in _paired(_parts(old), _parts(new), "partition", "planned", out):
    ka, kb = _keys(a), _keys(b)
    if ka != kb:
      moved = [f"{len(keys)} image(s) {what} ({_some(keys)})"
               for what, keys in (("added", kb - ka), ("removed", ka - kb)) if keys]
      out.append(f"partition {name}: {', '.join(moved)}")
  return out


# --- what the runner writes ---------------------------------------------------------------------


def eval_config(workdir: str, given):
  """The config `--mode=eval` scores `workdir`'s run with: its saved config, with `given`'s
  `eval` fields (what is scored and how: Grad-CAM target and method, bootstrap, ...) and
  `given`'s values of fields newer than the run (code that reads them finds them).
  Refuses a `given` that differs from the saved config anywhere else: that would be another
  run, not another look at this one."""
  saved = files.read_json(os.path.join(workdir, CONFIG))
  old = flax.traverse_util.flatten_dict(saved, sep=".")
  new = flax.traverse_util.flatten_dict(plain(given.to_dict()), sep=".")
  # Fields the run's code did not have yet are not a change.
  diffs = [d for d in diff(old, {k: v for k, v in new.items() if k in old})
           if not d.startswith("eval.")]
  if diffs:
    raise ValueError(
        f"--mode=eval: --config may change only eval.* fields (how the run is scored), but it "
        f"differs from {os.path.join(workdir, CONFIG)} in:\n  " + "\n  ".join(diffs)
        + "\nGive the config args the run was trained with (or no --config, to score it as "
          "it was).")
  flat = functools.partial(flax.traverse_util.flatten_dict, sep=".", keep_empty_nodes=True)
  merged = {**flat(plain(given.to_dict())),
            **{k: v for k, v in flat(saved).items() if not k.startswith("eval.")}}
  return config_dict.ConfigDict(flax.traverse_util.unflatten_dict(merged, sep="."))


def write_config(workdir: str, config, allow_change: bool) -> None:
  """Writes the run's config to `workdir`; refuses a workdir whose saved config differs
  (unless allowed: then the old one is kept beside it, time-stamped)."""
  path = os.path.join(workdir, CONFIG)
  current = config.to_dict()
  if os.path.exists(path):
    saved = files.read_json(path)
    diffs = diff(flax.traverse_util.flatten_dict(saved, sep="."),
                 flax.traverse_util.flatten_dict(plain(current), sep="."))
    if diffs and not allow_change:
      raise ValueError(
          f"{workdir} holds a run with a different config; differing fields:\n  "
          + "\n  ".join(diffs)
          + "\nUse a new --workdir, or pass --allow_config_change to resume with the new "
            "config (finished stages are kept as they are).")
    if diffs:
      logging.warning("config changed in %s: %s", workdir, "; ".join(diffs))
      if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, f"config.{int(time.time())}.json"), saved)
  if jax.process_index() == 0:
    files.write_json(path, plain(current))


def write_records(workdir: str, config, cohort, plan, recorded: bool) -> None:
  """A training run's records, before it trains: the splits and the data fingerprint (written
  once, never changed), the plan and the duplicates found. Process 0 writes."""
  if jax.process_index():
    return
  current, splits = records(config, cohort, plan)
  if not recorded:
    files.write_json(os.path.join(workdir, SPLITS), splits)
  if not os.path.exists(os.path.join(workdir, FINGERPRINT)):
    files.write_json(os.path.join(workdir, FINGERPRINT), current)
  files.write_json(os.path.join(workdir, PLAN), plan.describe())
  files.write_json(os.path.join(workdir, DUPLICATES), cohort.duplicates)


def set_aside(workdir: str, plan, names: tuple[str, ...]) -> list[str]:
  """Moves the directories of the stages `names` and of every stage started from them to
  `<dir>.replaced-<time>` (kept, not deleted), so they train again. Returns what moved."""
  if not names:
    return []
  known = [s.name for s in plan.stages]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"--retrain: no stage {unknown} in this run; its stages are {known}")
  chosen = set(names)
  for s in plan.stages:  # in training order, so dependents of dependents are found
    if s.init == "stage" and s.init_from in chosen:
      chosen.add(s.name)
  moved = []
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for s in plan.stages:
    path = os.path.join(workdir, s.name)
    if s.name in chosen and os.path.exists(path):
      if jax.process_index() == 0:
        os.replace(path, f"{path}.replaced-{stamp}")
      moved.append(s.name)
  sharding.barrier("retrain")
  logging.warning("--retrain: training %s again (old directories kept as *.replaced-%s)",
                  ", ".join(sorted(chosen)), stamp)
  return moved


# --- where an evaluation writes ---------------------------------------------------------------


def writable(path: str) -> bool:
  """Whether files can be created in `path` (tried, not guessed from permission bits)."""
  try:
    with tempfile.TemporaryFile(dir=path):
      return True
  except OSError:
    return False


def eval_dir(workdir: str, requested: str | None) -> tuple[str, str | None]:
  """(where `--mode=eval` writes, a note to print or None): `requested`, else the run
  directory when it is writable, else a new temporary directory."""
  if requested:
    os.makedirs(requested, exist_ok=True)
    return requested, None
  if writable(workdir):
    return workdir, None
  out = tempfile.mkdtemp(prefix="xrayjax-eval-")
  return out, (f"{workdir} is read-only: evaluation results are written to {out} "
               "(choose the place with --eval_dir)")


# --- one job per run directory ---------------------------------------------------------------


class RunLock:
  """An exclusive hold on a run directory for one job: `run.lock`, flock()ed for as long as
  the job runs (the kernel, or the NFSv4 server, drops the hold when the process dies,
  SIGKILL included), holding the holder's host, PID, start time and command.

  A second job that finds it held raises LockedError naming the holder. A lock file whose
  holder died without releasing it (killed) is taken over with a warning. A directory the
  lock created is removed again if nothing else was written to it.
  """

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK)
    self._fd, self._created, self.stale = None, False, None

  def acquire(self) -> "RunLock":
    self._created = not os.path.isdir(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace")
        os.close(fd)
        self._undo_created()
        raise LockedError(
            f"{self.workdir} is in use by another job ({_describe(holder)}), so this one "
            "stops before it touches it: two jobs on one run directory would train the same "
            "checkpoints at once. Wait for that job to end or stop it, use another "
            "--workdir, or score its checkpoints beside it with --mode=eval "
            "--eval_dir=OTHER_DIR.") from None
      try:  # the file may have been released (unlinked) between open and flock: retry
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = os.read(fd, 4096).decode(errors="replace").strip()
    if previous:
      self.stale = (f"{self.path}: taking over the lock of a job that ended without "
                    f"releasing it ({_describe(previous)})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)}).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    os.unlink(self.path)  # while still held: a job waiting on the old file retries
    os.close(self._fd)
    self._fd = None
    self._undo_created()

  def _undo_created(self) -> None:
    if self._created and not os.listdir(self.workdir):
      os.rmdir(self.workdir)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def hold(workdir: str) -> RunLock:
  """The run directory's lock, taken by process 0 for the whole job (every process raises
  LockedError when another job holds it)."""
  lock = RunLock(workdir)

  def acquire() -> str:
    try:
      lock.acquire()
    except LockedError as e:
      return str(e)
    return ""

  error = sharding.from_process_0(f"lock {workdir}", acquire)
  if error:
    raise LockedError(error)
  if lock.stale:
    logging.warning(lock.stale)
  return lock


def _describe(holder: str) -> str:
  try:
    h = json.loads(holder)
    return f"host {h['host']}, PID {h['pid']}, started {h['started']}: {h['command']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown: the lock file is empty or unreadable"

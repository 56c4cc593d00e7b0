r"""Runs a sweep: every trial is its own `python -m xrayjax.main` run in its own directory.

  python -m launch.sweep --config=configs/detl.py --sweep=configs/sweeps/demo_lr_init.py \
      --backend=local --parallel=2 [--workdir=checkpoints/sweeps/demo_lr_init-<time>] \
      [--metric=pooled.accuracy] [-- --config.data.tfds_dir=DIR ...]
  python -m launch.sweep ... --backend=ray [--address=HEAD:6379] [--cpus_per_trial=2] \
      [--gpus_per_trial=1] [--resources=TPU:4]
  python -m launch.sweep ... --list                  # index, name, status of every trial
  python -m launch.sweep ... --workdir=DIR --trial=K # trial K alone, in the foreground (SLURM)
  python -m launch.sweep ... --workdir=DIR --table   # the ranked table of what has finished

A sweep file (configs/sweeps/*.py) defines `get_sweep()`, a list of override dicts built
with launch/hyper.py: keys `config.<field>` become `--config.<field>=value`, keys
`config:<arg>` are merged into the config's argument string (`configs/detl.py:init=scratch`).
Arguments after `--` are passed to every trial. A trial's directory is
`<workdir>/<name>`, its name made of its overrides (`init=detl,lr=0.003`), so it is the same
each time the sweep file is read. The directory holds the run (results.json, report.html, ...),
`trial.log` (the run's stdout and stderr, appended per attempt) and `trial.json` (command,
attempts with exit code and seconds).

A trial is finished when its run wrote results.json (compare.json for protocol=both). Running
the same command with the same --workdir skips finished trials and re-runs the others in their
directories, where xrayjax.main resumes a killed run. A failed trial is reported with its exit
code and log and does not stop the others; the sweep then exits with 1. At the end the trials are
ranked by --metric, a dotted path into results.json (`pooled.accuracy`, `pooled.macro_auroc`,
`pooled.per_class.covid.auroc`; for protocol=both runs prefix `paper.` to rank by the paper
protocol's results, otherwise the corrected one's are read), in `<workdir>/sweep.csv` and
`sweep.html` (links to every trial's report.html) and on stdout.

The ray backend runs each trial as a Ray task holding --cpus_per_trial / --gpus_per_trial /
--resources, on the cluster at --address (after `ray start --head` and `ray start
--address=HEAD:6379` on the nodes; the project and the sweep directory must be at the same
paths on every node, e.g. a shared file system) or on a Ray instance started here.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import html
import importlib.util
import logging as pylogging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from absl import app, flags

from xrayjax import compare, files  # neither imports JAX nor TensorFlow

RESULTS, COMPARE = "results.json", "compare.json"  # what a finished run (protocol=both) wrote
PROTOCOLS = ("corrected", "paper")  # the sub-directories of a protocol=both run
LOG, TRIAL = "trial.log", "trial.json"
SWEEP_JSON, TABLE_CSV, TABLE_HTML = "sweep.json", "sweep.csv", "sweep.html"
RAY_MISSING = ("--backend=ray needs Ray, an optional extra: pip install -e '.[ray]' "
               "(from the project root)")
NAME_MAX = 120


@dataclass(frozen=True)
class Trial:
  """One point of a sweep: its overrides and the xrayjax.main arguments that run it."""
  index: int
  name: str
  overrides: dict
  config: str  # configs/<method>.py[:args], the sweep's config with this trial's args merged
  args: tuple[str, ...] = field(default=())  # --config.<field>=value ..., then the extra args

  def command(self, trial_dir: str) -> list[str]:
    """The arguments after `python`."""
    return ["-m", "xrayjax.main", f"--config={self.config}", f"--workdir={trial_dir}",
            *self.args]


# --- sweep file -> trials ---

def load_sweep(path: str) -> list[dict]:
  """Calls `get_sweep()` of the sweep file at `path`; checks it returns override dicts."""
  if not os.path.isfile(path):
    raise ValueError(f"sweep file {path} not found (sweep files live in configs/sweeps/)")
  spec = importlib.util.spec_from_file_location(
      "sweep_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep() (it returns a list of override dicts)")
  overrides = module.get_sweep()
  if not isinstance(overrides, (list, tuple)) or not overrides or not all(
      isinstance(o, dict) for o in overrides):
    raise ValueError(f"{path}: get_sweep() must return a non-empty list of dicts, got "
                     f"{type(overrides).__name__} {str(overrides)[:200]}")
  return list(overrides)


def make_trials(config: str, overrides: list[dict], extra_args=()) -> list[Trial]:
  """The trials of `overrides` on `config` (configs/x.py[:args]); names are unique."""
  keys: list[str] = []
  for o in overrides:
    for key in o:
      if not (key.startswith("config.") or key.startswith("config:")) or len(key) < 8:
        raise ValueError(f"override key {key!r} must be 'config.<field>' (a config field, as "
                         "--config.<field>=value) or 'config:<arg>' (a config argument, as "
                         "configs/detl.py:<arg>=value)")
      if key not in keys:
        keys.append(key)
  labels = _short_labels(keys)
  path, base_args = _split_config(config)
  trials, seen = [], {}
  for index, o in enumerate(overrides):
    name = _trial_name([(labels[k], v) for k, v in o.items()]) or "default"
    if name in seen:
      raise ValueError(f"trials {seen[name]} and {index} have the same name {name!r} "
                       f"(overrides {overrides[seen[name]]} and {o}); every trial needs its own")
    seen[name] = index
    args = dict(base_args)
    for key, value in o.items():
      if key.startswith("config:"):
        args[key[7:]] = value
    fields = tuple(f"--{k}={_flag_value(v)}" for k, v in o.items() if k.startswith("config."))
    trials.append(Trial(index, name, dict(o), _join_config(path, args),
                        fields + tuple(extra_args)))
  return trials


def check_fields(trials: list[Trial]) -> None:
  """Builds each trial's config (cheap: no JAX) and checks that every overridden field
  exists, so a typo stops the sweep before any trial runs. Values are checked by the run."""
  configs = {}
  for t in trials:
    if t.config not in configs:
      path, args = _split_config(t.config)
      spec = importlib.util.spec_from_file_location("sweep_config", path)
      if spec is None or not os.path.isfile(path):
        raise ValueError(f"config file {path} not found")
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      arg = t.config.partition(":")[2]
      try:
        configs[t.config] = module.get_config(arg or None)
      except ValueError as e:
        raise ValueError(f"trial {t.name}: {e}") from None
    for key in t.overrides:
      if key.startswith("config."):
        node = configs[t.config]
        for part in key[7:].split("."):
          if not hasattr(node, "keys") or part not in node.keys():
            there = sorted(node.keys()) if hasattr(node, "keys") else f"the value {node!r}"
            raise ValueError(f"trial {t.name}: {key!r} is not a field of {t.config} "
                             f"(no {part!r} among {there})")
          node = node[part]


def _split_config(config: str) -> tuple[str, dict]:
  path, _, arg = config.partition(":")
  args = {}
  for item in filter(None, arg.split(",")):
    key, eq, value = item.partition("=")
    args[key] = value if eq else True
  return path, args


def _join_config(path: str, args: dict) -> str:
  items = [k if v is True else f"{k}={v}" for k, v in args.items() if v is not False]
  return f"{path}:{','.join(items)}" if items else path


def _flag_value(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def _short_labels(keys: list[str]) -> dict[str, str]:
  """The shortest dotted suffix of each key that no other key shares:
  config.stage_b.optimizer.lr -> lr, or stage_b.optimizer.lr beside stage_a.optimizer.lr."""
  parts = {k: k[7:].split(".") if k.startswith("config.") else [k[7:]] for k in keys}
  depth = {k: 1 for k in keys}
  while True:
    labels = {k: ".".join(parts[k][-depth[k]:]) for k in keys}
    clashing = [k for k in keys if list(labels.values()).count(labels[k]) > 1]
    if not clashing:
      return labels
    grown = [k for k in clashing if depth[k] < len(parts[k])]
    if not grown:
      return {k: k for k in keys}  # e.g. config:seed beside config.seed: use the full keys
    for k in grown:
      depth[k] += 1


def _trial_name(items: list[tuple[str, object]]) -> str:
  def value(v):
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)
  name = ",".join(f"{label}={value(v)}" for label, v in items)
  if len(name) > NAME_MAX:  # file systems limit a name to 255 bytes
    name = name[:NAME_MAX - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


# --- one trial ---

def finished(trial_dir: str) -> bool:
  """Whether the run in `trial_dir` wrote its results (the last thing a run writes)."""
  return any(os.path.exists(os.path.join(trial_dir, f)) for f in (RESULTS, COMPARE))


_RUNNING: set = set()  # the trial processes this launcher (or Ray worker) has running
_LOCK = threading.Lock()
_STOP = threading.Event()  # set by SIGTERM / SIGINT: start no more trials


def stop_trials(signum, frame=None) -> None:  # pylint: disable=unused-argument
  """Signal handler: passes the signal to the running trials (xrayjax.main checkpoints and
  exits; the same sweep command resumes them) and starts no new ones."""
  _STOP.set()
  with _LOCK:
    running = [p for p in _RUNNING if p.poll() is None]
    for proc in running:
      proc.send_signal(signum)
  print(f"launch.sweep: {signal.Signals(signum).name}: stopping the running trials (each "
        "checkpoints first) and starting no more; the same command resumes",
        file=sys.stderr, flush=True)


def run_trial(trial: Trial, trial_dir: str, cwd: str, echo: bool = False) -> dict:
  """Runs `trial` to completion in `trial_dir`, its output appended to trial.log, the attempt
  recorded in trial.json. Runs in the launcher (local), a Ray worker or the foreground (echo:
  the output also goes to stdout). Returns the attempt (exit code, seconds, log path)."""
  log = os.path.join(trial_dir, LOG)
  if _STOP.is_set():
    return {"name": trial.name, "returncode": None, "seconds": None, "log": log,
            "error": "not started (the sweep was stopped)"}
  os.makedirs(trial_dir, exist_ok=True)
  argv = [sys.executable, *trial.command(trial_dir)]  # the worker's python, not the driver's
  env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log follows the run as it goes
  attempt = {"started": _now(), "host": socket.gethostname()}
  start, cancelled = time.time(), False
  with open(log, "a") as f:
    f.write(f"=== {attempt['started']} on {attempt['host']}: {shlex.join(argv)}\n")
    f.flush()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE if echo else f,
                            stderr=subprocess.STDOUT, text=True)
    with _LOCK:
      _RUNNING.add(proc)
      if _STOP.is_set():  # the signal came while this one was starting
        proc.send_signal(signal.SIGTERM)
    try:
      for line in proc.stdout if echo else ():
        f.write(line)
        sys.stdout.write(line)
      returncode = None
      while returncode is None:  # a timed wait runs Python, so ray.cancel can interrupt it
        try:
          returncode = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
          pass
    except KeyboardInterrupt:  # ray.cancel of this task: the run checkpoints, then stops
      cancelled = True
      proc.send_signal(signal.SIGTERM)
      returncode = proc.wait()
    finally:
      with _LOCK:
        _RUNNING.discard(proc)
  attempt.update(seconds=round(time.time() - start, 1), returncode=returncode)
  record_path = os.path.join(trial_dir, TRIAL)
  record = files.read_json(record_path) if os.path.exists(record_path) else {"attempts": []}
  record.update(name=trial.name, index=trial.index, overrides=trial.overrides,
                command=shlex.join(argv))
  record["attempts"].append(attempt)
  files.write_json(record_path, record)
  if cancelled:
    raise KeyboardInterrupt
  return {**attempt, "name": trial.name, "log": log}


# --- backends: run `pending` trials, report each as it ends ---

def run_local(pending: list[Trial], sweep_dir: str, cwd: str, parallel: int, report) -> None:
  """Up to `parallel` trials at once, each a subprocess."""
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel))
  futures = {pool.submit(run_trial, t, os.path.join(sweep_dir, t.name), cwd): t for t in pending}
  try:
    for future in concurrent.futures.as_completed(futures):
      report(futures[future], future.result())
  finally:  # after an error here: start nothing new, let the running trials end
    pool.shutdown(wait=True, cancel_futures=True)


def import_ray():
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit(RAY_MISSING) from None
  return ray


def parse_resources(text: str | None) -> dict[str, float]:
  """"TPU:4,accelerator_type:V100:1" -> {"TPU": 4.0, "accelerator_type:V100": 1.0}."""
  out = {}
  for item in filter(None, (text or "").split(",")):
    name, _, amount = item.rpartition(":")
    try:
      out[name] = float(amount)
    except ValueError:
      raise ValueError(f"--resources item {item!r} is not NAME:AMOUNT (e.g. TPU:4)") from None
    if not name:
      raise ValueError(f"--resources item {item!r} is not NAME:AMOUNT (e.g. TPU:4)")
  return out


def run_ray(pending: list[Trial], sweep_dir: str, cwd: str, report, address: str | None,
            num_cpus: float, num_gpus: float, resources: dict[str, float]) -> None:
  """Each trial a Ray task holding the given resources; Ray queues what does not fit."""
  ray = import_ray()
  handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  if address:
    ray.init(address=address, logging_level=pylogging.WARNING)
  else:
    ray.init(include_dashboard=False, logging_level=pylogging.WARNING)
  for sig, handler in handlers.items():  # ray.init installs its own, which exit at once
    if callable(handler):
      signal.signal(sig, handler)
  # By reference to this module (not __main__), so workers import it rather than unpickle it.
  from launch import sweep as module  # pylint: disable=import-outside-toplevel
  task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None)(
      module.run_trial)
  refs = {task.remote(t, os.path.join(sweep_dir, t.name), cwd): t for t in pending}
  cancelled = False
  try:
    while refs:
      done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
      if _STOP.is_set() and not cancelled:  # a running task stops its run (run_trial)
        cancelled = True
        for ref in refs:
          ray.cancel(ref)
      if not done:
        continue
      trial = refs.pop(done[0])
      try:
        result = ray.get(done[0])
      except Exception as e:  # pylint: disable=broad-except  # cancelled, or a lost node
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).splitlines() or [""])[0])
        result = {"returncode": None, "seconds": None,
                  "error": ("cancelled" if isinstance(e, ray.exceptions.TaskCancelledError)
                            else f"{type(e).__name__}: {first}"),
                  "log": os.path.join(sweep_dir, trial.name, LOG)}
      report(trial, result)
  finally:
    for ref in refs:
      ray.cancel(ref, force=True)
    ray.shutdown()


# --- results -> ranked table ---

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
  labels = _short_labels(list(dict.fromkeys(k for t in trials for k in t.overrides)))
  rows = []
  for t in trials:
    trial_dir = os.path.join(sweep_dir, t.name)
    record = _read(os.path.join(trial_dir, TRIAL)) or {"attempts": []}
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
      row["note"] = _exit_note(code)
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
          f"; trial time {_duration(total)} in all")
  if info.get("wall_seconds") is not None:
    text += f"; this invocation's wall time {_duration(info['wall_seconds'])}"
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


# --- orchestration ---

def run_sweep(trials: list[Trial], sweep_dir: str, backend: str, metric: str,
              minimize: bool = False, parallel: int = 1, cwd: str | None = None,
              ray_options: dict | None = None, info: dict | None = None) -> int:
  """Runs the unfinished trials, writes the table; returns 0, or 1 if a trial failed."""
  cwd = cwd or os.getcwd()
  start, started = time.time(), _now()
  os.makedirs(sweep_dir, exist_ok=True)
  pending = [t for t in trials if not finished(os.path.join(sweep_dir, t.name))]
  print(f"sweep {sweep_dir}: {len(trials)} trials, {len(trials) - len(pending)} finished "
        f"(skipped), {len(pending)} to run on {backend}", flush=True)
  failed = []

  def report(trial, result):
    ok = result["returncode"] == 0 and finished(os.path.join(sweep_dir, trial.name))
    if not ok and not _STOP.is_set():
      failed.append(trial.name)
    what = ("finished" if ok else result.get("error") or
            ("stopped" if _STOP.is_set() else "FAILED") + f" ({_exit_note(result['returncode'])})")
    seconds = f" in {_duration(result['seconds'])}" if result.get("seconds") else ""
    print(f"[{_now()}] trial {trial.index} {trial.name}: {what}{seconds}; log {result['log']}",
          flush=True)

  if pending and backend == "local":
    run_local(pending, sweep_dir, cwd, parallel, report)
  elif pending and backend == "ray":
    run_ray(pending, sweep_dir, cwd, report, **(ray_options or {}))
  elif pending:
    raise ValueError(f"unknown backend {backend!r}; valid: local, ray")
  wall = time.time() - start
  if _STOP.is_set():
    print("stopped by a signal: the same command resumes the unfinished trials", flush=True)
  record = _read(os.path.join(sweep_dir, SWEEP_JSON)) or {"invocations": []}
  record.update(info or {})
  record.update(metric=metric, trials=[
      {"index": t.index, "name": t.name, "overrides": t.overrides,
       "command": shlex.join(["python", *t.command(os.path.join(sweep_dir, t.name))])}
      for t in trials])
  record["invocations"].append({"started": started, "backend": backend,
                                "wall_seconds": round(wall, 1), "ran": len(pending),
                                "skipped": len(trials) - len(pending), "failed": failed})
  files.write_json(os.path.join(sweep_dir, SWEEP_JSON), record)
  rows = collect(trials, sweep_dir, metric, minimize)
  print(write_table(rows, sweep_dir, metric, minimize, {**(info or {}), "wall_seconds": wall}),
        flush=True)
  return 1 if any(r["status"] != "finished" for r in rows) else 0


def _exit_note(code: int | None) -> str:
  """"exit code 1"; "exit code 143: SIGTERM" (xrayjax.main checkpointed: the same command
  resumes); "killed by SIGKILL" (a negative code: the process got the signal)."""
  if code is None:
    return "no exit code"
  if code == 0:
    return f"exit code 0 but no {RESULTS}"
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  if code > 128 and code - 128 in signal.Signals.__members__.values():
    return f"exit code {code}: {signal.Signals(code - 128).name}"
  return f"exit code {code}"


def _read(path: str):
  return files.read_json(path) if os.path.exists(path) else None


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return (f"{seconds // 3600} h {seconds % 3600 // 60} min" if seconds >= 3600 else
          f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s")


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file and args, as for xrayjax.main "
                      "(configs/detl.py[:args]).", required=True)
  flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/<name>.py, defines "
                      "get_sweep()).", required=True)
  flags.DEFINE_enum("backend", "local", ["local", "ray"], "local: subprocesses on this "
                    "machine, --parallel at once; ray: Ray tasks (--address or a local Ray).")
  flags.DEFINE_integer("parallel", 1, "local backend: trials running at once.", lower_bound=1)
  flags.DEFINE_string("workdir", None, "Sweep directory (default checkpoints/sweeps/"
                      "<sweep>-<time>); the same one again skips finished trials.")
  flags.DEFINE_string("metric", "pooled.accuracy", "Dotted path into results.json that ranks "
                      "the trials (pooled.macro_auroc, pooled.per_class.covid.auroc, ...).")
  flags.DEFINE_bool("minimize", False, "Lower --metric is better (e.g. pooled.ece).")
  flags.DEFINE_string("address", None, "ray: address of a running cluster (HEAD:6379 or "
                      "auto); unset: start a local Ray instance.")
  flags.DEFINE_float("cpus_per_trial", 1, "ray: CPUs each trial holds.")
  flags.DEFINE_float("gpus_per_trial", 0, "ray: GPUs each trial holds.")
  flags.DEFINE_string("resources", None, "ray: custom resources per trial, NAME:AMOUNT[,...] "
                      "(e.g. TPU:4).")
  flags.DEFINE_integer("trial", None, "Run trial K (see --list) alone, in the foreground, "
                       "in --workdir (e.g. $SLURM_ARRAY_TASK_ID).", lower_bound=0)
  flags.DEFINE_bool("list", False, "Print index, name, status and overrides of every trial.")
  flags.DEFINE_bool("table", False, "Only write and print the ranked table of --workdir.")


def main(argv) -> int:
  extra = argv[1:]  # after `--`: passed to every trial
  bad = [a for a in extra if not a.startswith("--")]
  if bad:
    raise app.UsageError(f"arguments after -- are xrayjax.main flags (--config.x=y, ...), "
                         f"got {bad}")
  f = flags.FLAGS
  for sig in (signal.SIGTERM, signal.SIGINT):  # preemption, Ctrl-C: the runs checkpoint
    signal.signal(sig, stop_trials)
  try:
    trials = make_trials(f.config, load_sweep(f.sweep), extra)
    check_fields(trials)
    resources = parse_resources(f.resources)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  name = os.path.splitext(os.path.basename(f.sweep))[0]
  if (f.trial is not None or f.table) and not f.workdir:
    raise app.UsageError("--trial and --table need --workdir (the sweep directory every "
                         "trial writes to)")
  sweep_dir = os.path.abspath(f.workdir or os.path.join(
      "checkpoints", "sweeps", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
  info = {"config": f.config, "sweep": f.sweep, "extra_args": " ".join(extra)}

  if f.list:
    for t in trials:
      status = "finished" if finished(os.path.join(sweep_dir, t.name)) else "-"
      print(f"{t.index}\t{t.name}\t{status if f.workdir else '-'}\t"
            f"{shlex.join(['python', *t.command(os.path.join(sweep_dir, t.name))])}")
    return 0
  if f.table:
    print(write_table(collect(trials, sweep_dir, f.metric, f.minimize), sweep_dir, f.metric,
                      f.minimize, info))
    return 0
  if f.trial is not None:
    if f.trial >= len(trials):
      raise app.UsageError(f"--trial={f.trial}: the sweep has trials 0..{len(trials) - 1}")
    t = trials[f.trial]
    trial_dir = os.path.join(sweep_dir, t.name)
    if finished(trial_dir):
      print(f"trial {t.index} {t.name} is finished ({trial_dir}); nothing to run")
      return 0
    result = run_trial(t, trial_dir, os.getcwd(), echo=True)
    print(f"trial {t.index} {t.name}: exit code {result['returncode']} after "
          f"{_duration(result['seconds'])}; log {result['log']}")
    # Each array task refreshes the table (written atomically, so concurrent ones are safe).
    print(write_table(collect(trials, sweep_dir, f.metric, f.minimize), sweep_dir, f.metric,
                      f.minimize, info))
    return result["returncode"]
  ray_options = dict(address=f.address, num_cpus=f.cpus_per_trial, num_gpus=f.gpus_per_trial,
                     resources=resources)
  code = run_sweep(trials, sweep_dir, f.backend, f.metric, f.minimize, f.parallel,
                   ray_options=ray_options, info=info)
  print(f"same command with --workdir={sweep_dir} resumes this sweep (finished trials are "
        "skipped)")
  return code


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))

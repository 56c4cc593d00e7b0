"""Where trials run: one trial as an `xrayjax.main` process (its log and attempts), a local
process pool, or Ray tasks on a cluster; each reports a trial as it ends."""

from __future__ import annotations

import concurrent.futures
import logging as pylogging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


from xrayjax import files  # neither imports JAX nor TensorFlow

from launch.trials import LOG, TRIAL, Trial, now


RAY_MISSING = ("--backend=ray needs Ray, an optional extra: pip install -e '.[ray]' "
               "(from the project root)")


_RUNNING: set = set()  # the trial processes this launcher (or Ray worker) has running
_LOCK = threading.Lock()


STOP = threading.Event()  # set by SIGTERM / SIGINT: start no more trials


def stop_trials(signum, frame=None) -> None:  # pylint: disable=unused-argument
  """Signal handler: passes the signal to the running trials (xrayjax.main checkpoints and
  exits; the same sweep command resumes them) and starts no new ones."""
  STOP.set()
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
  if STOP.is_set():
    return {"name": trial.name, "returncode": None, "seconds": None, "log": log,
            "error": "not started (the sweep was stopped)"}
  os.makedirs(trial_dir, exist_ok=True)
  argv = [sys.executable, *trial.command(trial_dir)]  # the worker's python, not the driver's
  env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log follows the run as it goes
  attempt = {"started": now(), "host": socket.gethostname()}
  start, cancelled = time.time(), False
  with open(log, "a") as f:
    f.write(f"=== {attempt['started']} on {attempt['host']}: {shlex.join(argv)}\n")
    f.flush()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE if echo else f,
                            stderr=subprocess.STDOUT, text=True)
    with _LOCK:
      _RUNNING.add(proc)
      if STOP.is_set():  # the signal came while this one was starting
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
      if STOP.is_set() and not cancelled:  # a running task stops its run (run_trial)
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

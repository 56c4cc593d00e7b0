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

import datetime
import os
import shlex
import signal
import sys
import time

from absl import app, flags

from xrayjax import files  # neither imports JAX nor TensorFlow

from launch import backends
from launch.backends import parse_resources, run_local, run_ray, run_trial, stop_trials
from launch.table import SWEEP_JSON, collect, write_table
from launch.trials import (Trial, check_fields, duration, exit_note, finished, load_sweep,
                           make_trials, now, read_if_present)


def run_sweep(trials: list[Trial], sweep_dir: str, backend: str, metric: str,
              minimize: bool = False, parallel: int = 1, cwd: str | None = None,
              ray_options: dict | None = None, info: dict | None = None) -> int:
  """Runs the unfinished trials, writes the table; returns 0, or 1 if a trial failed."""
  cwd = cwd or os.getcwd()
  start, started = time.time(), now()
  os.makedirs(sweep_dir, exist_ok=True)
  pending = [t for t in trials if not finished(os.path.join(sweep_dir, t.name))]
  print(f"sweep {sweep_dir}: {len(trials)} trials, {len(trials) - len(pending)} finished "
        f"(skipped), {len(pending)} to run on {backend}", flush=True)
  failed = []

  def report(trial, result):
    ok = result["returncode"] == 0 and finished(os.path.join(sweep_dir, trial.name))
    if not ok and not backends.STOP.is_set():
      failed.append(trial.name)
    what = ("finished" if ok else result.get("error") or
            ("stopped" if backends.STOP.is_set() else "FAILED") + f" ({exit_note(result['returncode'])})")
    seconds = f" in {duration(result['seconds'])}" if result.get("seconds") else ""
    print(f"[{now()}] trial {trial.index} {trial.name}: {what}{seconds}; log {result['log']}",
          flush=True)

  if pending and backend == "local":
    run_local(pending, sweep_dir, cwd, parallel, report)
  elif pending and backend == "ray":
    run_ray(pending, sweep_dir, cwd, report, **(ray_options or {}))
  elif pending:
    raise ValueError(f"unknown backend {backend!r}; valid: local, ray")
  wall = time.time() - start
  if backends.STOP.is_set():
    print("stopped by a signal: the same command resumes the unfinished trials", flush=True)
  record = read_if_present(os.path.join(sweep_dir, SWEEP_JSON)) or {"invocations": []}
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
          f"{duration(result['seconds'])}; log {result['log']}")
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

"""launch/: sweep helpers, trial names, the ranked table, and real sweeps of tiny runs on the
local backend and on a local Ray instance (each trial a `python -m xrayjax.main` process)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from launch import hyper
from launch import backends, table
from launch import trials as trials_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "sweeps", "demo_lr_init.py")
LR = "config.stage_b.optimizer.lr"


# --- helpers, names, metrics: no training ---

def test_product_and_zipit():
  grid = hyper.product(hyper.sweep("config:init", ["detl", "scratch"]),
                       hyper.sweep(LR, [1e-3, 3e-3, 1e-2]))
  assert len(grid) == 6
  assert grid[0] == {"config:init": "detl", LR: 1e-3}
  assert grid[-1] == {"config:init": "scratch", LR: 1e-2}
  pairs = hyper.zipit(hyper.sweep(LR, [1e-3, 1e-2]), hyper.sweep("config.stage_b.epochs", [30, 10]))
  assert pairs == [{LR: 1e-3, "config.stage_b.epochs": 30}, {LR: 1e-2, "config.stage_b.epochs": 10}]
  with pytest.raises(ValueError, match="equal length"):
    hyper.zipit(hyper.sweep(LR, [1e-3]), hyper.sweep("config.seed", [0, 1]))
  with pytest.raises(ValueError, match="set twice"):
    hyper.product(hyper.fixed(LR, 1e-3), hyper.fixed(LR, 1e-2))


def test_demo_sweep_trials_are_named_from_their_overrides():
  trials = trials_lib.make_trials("configs/detl.py:runlocal", trials_lib.load_sweep(DEMO))
  assert [t.name for t in trials] == ["init=detl,lr=0.0003", "init=detl,lr=0.0001",
                                      "init=scratch,lr=0.0003", "init=scratch,lr=0.0001"]
  again = trials_lib.make_trials("configs/detl.py:runlocal", trials_lib.load_sweep(DEMO))
  assert again == trials  # stable: a re-run finds the same directories
  assert trials[2].config == "configs/detl.py:runlocal,init=scratch"
  assert trials[2].command("D") == ["-m", "xrayjax.main",
                                    "--config=configs/detl.py:runlocal,init=scratch",
                                    "--workdir=D", f"--{LR}=0.0003"]
  trials_lib.check_fields(trials)  # the demo's fields exist in configs/detl.py
  # Keys that share a last part are told apart; a flag argument can be switched off.
  two = trials_lib.make_trials("configs/detl.py:runlocal", hyper.product(
      hyper.sweep("config.stage_a.optimizer.lr", [1e-3]), hyper.sweep(LR, [1e-2]),
      hyper.fixed("config:runlocal", False)))
  assert two[0].name == "stage_a.optimizer.lr=0.001,stage_b.optimizer.lr=0.01,runlocal=False"
  assert two[0].config == "configs/detl.py"


def test_bad_sweeps_are_refused_before_anything_runs():
  with pytest.raises(ValueError, match="must be 'config.<field>'"):
    trials_lib.make_trials("configs/detl.py", [{"lr": 1e-3}])
  with pytest.raises(ValueError, match="the same name"):
    trials_lib.make_trials("configs/detl.py", [{LR: 1e-3}, {LR: 1e-3}])
  with pytest.raises(ValueError, match="'config.stage_b.optimizer.lrr' is not a field"):
    trials_lib.check_fields(trials_lib.make_trials("configs/detl.py", [{LR + "r": 1e-3}]))
  with pytest.raises(ValueError, match="init='transfer' is not valid"):
    trials_lib.check_fields(trials_lib.make_trials("configs/detl.py",
                                                 [{"config:init": "transfer"}]))
  with pytest.raises(ValueError, match="not NAME:AMOUNT"):
    backends.parse_resources("TPU")
  assert backends.parse_resources("TPU:4,accelerator_type:V100:1") == {
      "TPU": 4.0, "accelerator_type:V100": 1.0}


def test_missing_ray_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
  with pytest.raises(SystemExit, match=re.escape("pip install -e '.[ray]'")):
    backends.import_ray()


def _fake_run(trial_dir, accuracy, auroc, protocol_both=False):
  """A finished run's files, as xrayjax.experiment.run writes them."""
  results = {"pooled": {"accuracy": accuracy, "macro_auroc": auroc, "ece": 1 - accuracy,
                        "per_class": {"covid": {"auroc": auroc}}},
             "bootstrap_ci": {"accuracy": {"low": accuracy - 0.1, "high": accuracy + 0.1}},
             "across_folds": {"metrics": {"accuracy": {"mean": accuracy, "sd": 0.01}}},
             "seconds": 12.0}
  dirs = [os.path.join(trial_dir, p) for p in ("paper", "corrected")] if protocol_both else [
      trial_dir]
  for i, d in enumerate(dirs):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "results.json"), "w") as f:
      json.dump({**results, "pooled": {**results["pooled"],
                                       "accuracy": accuracy + 0.2 * (i == 0 and protocol_both)}},
                f)
  if protocol_both:
    with open(os.path.join(trial_dir, "compare.json"), "w") as f:
      json.dump({"rows": []}, f)


def test_table_ranks_by_any_metric_and_lists_failures_last(tmp_path):
  trials = trials_lib.make_trials("configs/detl.py", hyper.sweep(LR, [1e-3, 3e-3, 1e-2, 3e-2]))
  _fake_run(tmp_path / trials[0].name, 0.5, 0.9)
  _fake_run(tmp_path / trials[1].name, 0.7, 0.6)
  _fake_run(tmp_path / trials[3].name, 0.6, 0.7, protocol_both=True)  # corrected: 0.6
  os.makedirs(tmp_path / trials[2].name)
  with open(tmp_path / trials[2].name / "trial.json", "w") as f:
    json.dump({"attempts": [{"returncode": 3, "seconds": 1.5}]}, f)

  rows = table.collect(trials, str(tmp_path), "pooled.accuracy", minimize=False)
  assert [(r["rank"], r["trial"], r["status"]) for r in rows] == [
      (1, "lr=0.003", "finished"), (2, "lr=0.03", "finished"), (3, "lr=0.001", "finished"),
      (None, "lr=0.01", "failed")]
  assert rows[0]["ci_low"] == pytest.approx(0.6) and rows[0]["fold_sd"] == 0.01
  assert rows[1]["report"] == "lr=0.03/corrected/report.html lr=0.03/paper/report.html"
  assert rows[3]["note"] == "exit code 3" and rows[3]["log"] == "lr=0.01/trial.log"
  text = table.write_table(rows, str(tmp_path), "pooled.accuracy", False, {})
  assert "lr=0.01: failed (exit code 3)" in text
  with open(tmp_path / "sweep.html") as f:
    page = f.read()
  assert '<a href="lr=0.003/report.html">lr=0.003</a>' in page
  assert '<a href="lr=0.03/paper/report.html">paper</a>' in page

  by = lambda metric, minimize=False: [r["trial"] for r in table.collect(
      trials, str(tmp_path), metric, minimize) if r["rank"]]
  assert by("pooled.macro_auroc") == ["lr=0.001", "lr=0.03", "lr=0.003"]
  assert by("pooled.ece", minimize=True) == ["lr=0.003", "lr=0.03", "lr=0.001"]
  assert by("paper.pooled.accuracy") == ["lr=0.03"]  # only a protocol=both run has paper/
  assert by("pooled.per_class.covid.auroc") == ["lr=0.001", "lr=0.03", "lr=0.003"]
  bad = table.collect(trials, str(tmp_path), "pooled.acc", False)
  assert all(r["rank"] is None for r in bad)
  assert "no 'acc' at pooled" in bad[0]["note"] and "accuracy" in bad[0]["note"]


class _Sleeper(trials_lib.Trial):
  """A trial whose process trains forever and, as xrayjax.main, checkpoints on SIGTERM. (The
  words it prints are split in its source, which trial.log's header line repeats.)"""

  def command(self, trial_dir):
    return ["-c", "import signal, sys, time\n"
                  "def stop(signum, frame):\n"
                  "  print('checkp' + 'ointed', flush=True)\n"
                  "  sys.exit(128 + signum)\n"
                  "signal.signal(signal.SIGTERM, stop)\n"
                  "print('tr' + 'aining', flush=True)\n"
                  "time.sleep(120)\n"]


def test_a_signal_stops_the_running_trials_and_starts_no_more(tmp_path, monkeypatch):
  monkeypatch.setattr(backends, "STOP", threading.Event())
  trials = [_Sleeper(i, f"t{i}", {}, "configs/detl.py") for i in range(3)]
  ended = []
  thread = threading.Thread(target=backends.run_local, args=(
      trials, str(tmp_path), ROOT, 2, lambda trial, result: ended.append((trial.name, result))))
  thread.start()
  logs = [tmp_path / t.name / "trial.log" for t in trials[:2]]
  deadline = time.time() + 60
  while not all(p.exists() and "training" in p.read_text() for p in logs):
    assert time.time() < deadline, "the trials did not start"
    time.sleep(0.1)
  backends.stop_trials(signal.SIGTERM)  # what SIGTERM to the launcher calls
  thread.join(60)
  assert sorted((name, r["returncode"]) for name, r in ended) == [
      ("t0", 128 + signal.SIGTERM), ("t1", 128 + signal.SIGTERM), ("t2", None)]
  assert all("checkpointed" in p.read_text() for p in logs)
  rows = table.collect(trials, str(tmp_path), "pooled.accuracy", False)
  assert [(r["trial"], r["status"], r["note"]) for r in rows] == [
      ("t0", "stopped", "exit code 143: SIGTERM"), ("t1", "stopped", "exit code 143: SIGTERM"),
      ("t2", "not started", "")]


# --- real sweeps: every trial a tiny xrayjax.main run ---

TINY = ("--config.eval.gradcam.enabled=False", "--config.eval.bootstrap=0",
        "--config.audit.perturb=False", "--config.audit.probes=False")


@pytest.fixture
def built_tfds(tiny_config):
  """The tiny synthetic data, built before trials that run at once would each build it."""
  from xrayjax.data import sources
  sources.builder(tiny_config.data)
  return tiny_config.data.tfds_dir


def _launch(*args, tfds_dir, env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", "launch.sweep", *args, "--",
                         f"--config.data.tfds_dir={tfds_dir}", *TINY],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _stamps(sweep_dir, names):
  return {n: [os.stat(os.path.join(sweep_dir, n, f)).st_mtime_ns
              for f in ("trial.log", "trial.json")] for n in names}


def _check_ranked(sweep_dir, finished_names, metric="pooled.accuracy"):
  rows = _read_csv(os.path.join(sweep_dir, "sweep.csv"))
  ranked = [r for r in rows if r["rank"]]
  assert sorted(r["trial"] for r in ranked) == sorted(finished_names)
  values = [float(r[metric]) for r in ranked]
  assert values == sorted(values, reverse=True)
  for r in ranked:  # the table holds each run's own number
    with open(os.path.join(sweep_dir, r["trial"], "results.json")) as f:
      assert float(r[metric]) == pytest.approx(json.load(f)["pooled"]["accuracy"])
    assert float(r["seconds"]) > 0
  # Trials of one data set and seed test the same images: each is paired with rank 1.
  for r in ranked[1:]:
    assert float(r["vs_best"]) == pytest.approx(float(r[metric]) - float(ranked[0][metric]))
    assert float(r["vs_best_low"]) <= float(r["vs_best"]) <= float(r["vs_best_high"])
  with open(os.path.join(sweep_dir, "sweep.html")) as f:
    page = f.read()
  for name in finished_names:
    assert f'<a href="{name}/report.html">{name}</a>' in page
    assert os.path.exists(os.path.join(sweep_dir, name, "report.html"))
  return rows


@pytest.mark.slow
def test_local_sweep_ranks_skips_finished_and_reports_a_failure(built_tfds, tmp_path):
  sweep_file = tmp_path / "lr_and_bad.py"
  # Three trials: two real ones (about 20 s each on 2 cores; the demo sweep file runs in the
  # Ray test) and one whose value the run refuses.
  sweep_file.write_text(
      "from launch import hyper\n"
      "def get_sweep():\n"
      "  return (hyper.product(hyper.fixed('config:init', 'scratch'),\n"
      "                        hyper.sweep('config.stage_b.optimizer.lr', [3e-4, 3e-2]))\n"
      "          + hyper.fixed('config.stage_b.epochs', 'many'))\n")
  sweep_dir = str(tmp_path / "sweep")
  args = ("--config=configs/detl.py:runlocal", f"--sweep={sweep_file}", "--backend=local",
          "--parallel=2", f"--workdir={sweep_dir}")
  good = ["init=scratch,lr=0.0003", "init=scratch,lr=0.03"]
  proc = _launch(*args, tfds_dir=built_tfds)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  bad_log = os.path.join(sweep_dir, "epochs=many", "trial.log")
  assert "trial 2 epochs=many: FAILED (exit code 1)" in proc.stdout
  assert f"epochs=many: failed (exit code 1), log {bad_log}" in proc.stdout
  with open(bad_log) as f:
    assert "--config.stage_b.epochs=many" in f.read()
  rows = _check_ranked(sweep_dir, good)
  assert rows[-1]["trial"] == "epochs=many" and rows[-1]["status"] == "failed"
  assert rows[-1]["exit_code"] == "1" and rows[-1]["log"] == "epochs=many/trial.log"
  for name in good:  # each trial ran in its own directory with the sweep's arguments
    with open(os.path.join(sweep_dir, name, "config.json")) as f:
      config = json.load(f)
    assert config["stage_b"]["optimizer"]["lr"] == float(name.split("lr=")[1])
    assert config["stage_a"]["enabled"] is False and config["eval"]["bootstrap"] == 0
  with open(os.path.join(sweep_dir, "sweep.json")) as f:
    assert json.load(f)["invocations"][-1]["ran"] == 3

  # Again: the finished trial is skipped (no process touched it), the failed one re-runs, and
  # one whose results are gone is unfinished: it resumes in its directory (its stages are
  # finished, so it only evaluates).
  before = _stamps(sweep_dir, good[1:])
  os.remove(os.path.join(sweep_dir, good[0], "results.json"))
  proc = _launch(*args, tfds_dir=built_tfds)
  assert proc.returncode == 1
  assert "3 trials, 1 finished (skipped), 2 to run" in proc.stdout
  assert _stamps(sweep_dir, good[1:]) == before
  with open(os.path.join(sweep_dir, "sweep.json")) as f:
    last = json.load(f)["invocations"][-1]
  assert (last["ran"], last["skipped"], last["failed"]) == (2, 1, ["epochs=many"])
  with open(bad_log) as f:
    assert f.read().count("=== ") == 2  # appended, same directory
  with open(os.path.join(sweep_dir, good[0], "trial.log")) as f:
    second = f.read().split("=== ")[-1]
  assert "finished earlier" in second and "resuming" not in second
  _check_ranked(sweep_dir, good)
  before = _stamps(sweep_dir, good)

  # One trial in the foreground (a SLURM array task), and the list of trials.
  proc = _launch(*args, "--trial=2", tfds_dir=built_tfds)
  assert proc.returncode == 1 and "Flags parsing error" in proc.stdout  # echoed
  proc = _launch(*args, "--trial=0", tfds_dir=built_tfds)
  assert proc.returncode == 0 and "is finished" in proc.stdout
  assert _stamps(sweep_dir, good) == before
  proc = _launch(*args, "--list", tfds_dir=built_tfds)
  lines = [line.split("\t") for line in proc.stdout.splitlines()]
  assert [(i, n, s) for i, n, s, _ in lines] == [
      ("0", good[0], "finished"), ("1", good[1], "finished"), ("2", "epochs=many", "-")]


@pytest.mark.slow
def test_ray_sweep_runs_each_trial_as_a_task(built_tfds, tmp_path):
  """Two trials of the tiny config (DETL transfer and scratch), each a task of a local Ray;
  the local sweep above checks skipping, resuming and failures, which do not depend on the
  backend."""
  pytest.importorskip("ray", reason="the test extra installs ray: pip install -e '.[test]'")
  sweep_file = tmp_path / "inits.py"
  sweep_file.write_text("from launch import hyper\n"
                        "def get_sweep():\n"
                        "  return hyper.sweep('config:init', ['detl', 'scratch'])\n")
  sweep_dir = str(tmp_path / "sweep")
  args = ("--config=configs/detl.py:runlocal", f"--sweep={sweep_file}", "--backend=ray",
          "--cpus_per_trial=1", f"--workdir={sweep_dir}")
  names = ["init=detl", "init=scratch"]
  proc = _launch(*args, tfds_dir=built_tfds)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "2 trials, 0 finished (skipped), 2 to run on ray" in proc.stdout
  _check_ranked(sweep_dir, names)
  for name, stage_a in zip(names, (True, False)):  # init reached each trial's config
    with open(os.path.join(sweep_dir, name, "config.json")) as f:
      assert json.load(f)["stage_a"]["enabled"] is stage_a

"""The run directory's contract: changed data or splits are refused, checkpoints are checked,
training survives kills and SIGTERM bit for bit, and config errors stop before any write."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import run_files
import tiny
from xrayjax import checkpoint, checks, experiment, external, files, rundir, train
from xrayjax.data.sources import phantom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _predictions(workdir, name="results"):
  with open(os.path.join(workdir, f"{name}_predictions.csv")) as f:
    return list(csv.DictReader(f))


def _same_predictions(a, b):
  assert [(r["fold"], r["image_id"]) for r in a] == [(r["fold"], r["image_id"]) for r in b]
  for ra, rb in zip(a, b):
    assert {k: v for k, v in ra.items() if k.startswith("p_")} == \
        {k: v for k, v in rb.items() if k.startswith("p_")}, ra["image_id"]


# --- the leakage guard, on a manifest ---------------------------------------------------------


def _write(root, rows):
  with open(os.path.join(root, "manifest.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=("path", "label", "patient_id", "source"))
    writer.writeheader()
    writer.writerows(rows)


def _image(root, name, label, seed):
  rng = np.random.default_rng(seed)
  out = phantom.render(rng, size=48, label=label, anatomy=phantom.sample_anatomy(rng),
                       site=phantom.SITES[0], view="PA", severity=0.8,
                       finding="Mass" if label == "other_disease" else None)
  Image.fromarray(out["image"]).save(os.path.join(root, name))


def test_changed_data_or_split_fields_are_refused_and_scored_only_as_external(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  rows = []
  for k, label in enumerate(("normal", "pneumonia", "other_disease", "covid")):
    for p in range(12):
      name = f"{label}-{p}.png"
      _image(data, name, label, 100 * k + p)
      rows.append({"path": name, "label": label, "patient_id": f"{label}-{p}",
                   "source": "hospital"})
  _write(data, rows)
  c = tiny.detl_config(str(tmp_path / "tfds"), "data=manifest,runlocal,init=scratch")
  c.data.manifest.update(path=str(data / "manifest.csv"), label_column="label", image_size=32)
  workdir = str(tmp_path / "run")
  experiment.run(c, workdir)
  before = run_files.snapshot(workdir)

  def refused(match, config=c, **kwargs):
    for mode in ("train", "eval"):
      with pytest.raises(rundir.ChangedError, match=match) as e:
        experiment.run(config, workdir, mode, **kwargs)
      assert run_files.snapshot(workdir) == before  # nothing written, splits.json untouched
    return str(e.value)

  # A file added (a new manifest row and its image).
  _image(data, "covid-new.png", "covid", 999)
  _write(data, rows + [{"path": "covid-new.png", "label": "covid", "patient_id": "covid-new",
                        "source": "hospital"}])
  message = refused("manifest")
  assert "1 file(s) added" in message and "covid-new.png" in message
  assert "--eval_data=SOURCE:PATH" in message and "new --workdir" in message
  print(message)
  # Scored as an external test set: only the new image is unseen by the models.
  ext = external.evaluate(c, workdir, f"manifest:{data / 'manifest.csv'}")
  assert ext["protocol"] == "external" and ext["num_images"] == 1
  assert any("same image id" in n for n in ext["notes"])
  assert os.path.exists(os.path.join(workdir, "external_summary.txt"))
  os.remove(os.path.join(workdir, "external_summary.txt"))
  for name in os.listdir(workdir):
    if name.startswith("external"):
      path = os.path.join(workdir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  assert run_files.snapshot(workdir) == before
  os.remove(data / "covid-new.png")

  # A label changed.
  changed = [dict(r) for r in rows]
  changed[0]["label"] = "pneumonia"
  _write(data, changed)
  message = refused("the manifest .* changed")
  assert "partition" in message  # the image moved between classes, so partitions differ
  _write(data, rows)

  # A split-determining field: --allow_config_change cannot override it.
  other = c.copy_and_resolve_references()
  other.seed = 1
  message = refused("seed: 0 -> 1", config=other, allow_config_change=True)
  # The restored data is accepted again, and eval re-scores the same predictions.
  experiment.run(c, workdir, "eval", eval_dir=str(tmp_path / "eval"))
  assert run_files.snapshot(workdir) == before
  _same_predictions(_predictions(workdir), _predictions(str(tmp_path / "eval"), "eval"))


def test_eval_of_a_read_only_run_writes_to_a_temporary_directory(tiny_config, tiny_run_copy,
                                                                 monkeypatch, capsys):
  workdir = tiny_run_copy
  before = run_files.snapshot(workdir)
  # Permission bits do not stop root (CI), so the probe is what is faked.
  monkeypatch.setattr(rundir, "writable", lambda path: path != workdir)
  experiment.run(tiny_config, workdir, "eval")
  printed = capsys.readouterr().out
  assert "is read-only: evaluation results are written to" in printed
  out = printed.split("written to ")[1].split(" ")[0]
  assert os.path.exists(os.path.join(out, "eval.json"))
  assert run_files.snapshot(workdir) == before
  _same_predictions(_predictions(workdir), _predictions(out, "eval"))

  # --- a damaged checkpoint byte is detected; --retrain recovers the stage ---
  stage = os.path.join(workdir, "fold1", "stage_b")
  step = files.read_json(os.path.join(stage, checkpoint.SUMMARY))["selected_step"]
  damaged = max((os.path.join(d, n) for d, _, ns in os.walk(os.path.join(stage, str(step)))
                 for n in ns), key=os.path.getsize)
  with open(damaged, "r+b") as f:
    f.seek(os.path.getsize(damaged) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  monkeypatch.undo()
  for mode in ("eval", "train"):
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"step \d+ of stage fold1/stage_b .* is damaged.*"
                             r"--retrain=fold1/stage_b"):
      experiment.run(tiny_config, workdir, mode)
  with pytest.raises(ValueError, match=r"--retrain: no stage \['fold9/stage_b'\]"):
    experiment.run(tiny_config, workdir, retrain=("fold9/stage_b",))
  experiment.run(tiny_config, workdir, retrain=("fold1/stage_b",))
  assert [n for n in os.listdir(os.path.join(workdir, "fold1")) if ".replaced-" in n]
  _same_predictions(_predictions(workdir), _predictions(out, "eval"))  # deterministic retrain

  # --- a half-deleted stage is not mistaken for a finished one: it trains again ---
  stage = os.path.join(workdir, "fold0", "stage_b")
  step = files.read_json(os.path.join(stage, checkpoint.SUMMARY))["selected_step"]
  shutil.rmtree(os.path.join(stage, str(step)))
  experiment.run(tiny_config, workdir)
  assert files.read_json(os.path.join(stage, checkpoint.SUMMARY))["selected_step"] == step
  _same_predictions(_predictions(workdir), _predictions(out, "eval"))


def test_one_job_per_run_directory_lock(tiny_config, tiny_run_copy, tmp_path):
  """A live job's lock refuses training and evaluation into the run directory (which stays
  untouched), --mode=eval into another directory works beside it, and a lock whose holder
  died is taken over with a warning."""
  workdir = tiny_run_copy
  before = run_files.snapshot(workdir)
  held = rundir.RunLock(workdir).acquire()
  try:
    for mode in ("train", "eval"):
      with pytest.raises(rundir.LockedError, match=rf"{workdir} is in use by another job "
                         rf"\(host .+, PID {os.getpid()}, started .+\).*--eval_dir="):
        experiment.run(tiny_config, workdir, mode)
    out = str(tmp_path / "beside")
    experiment.run(tiny_config, workdir, "eval", eval_dir=out)
    _same_predictions(_predictions(workdir), _predictions(out, "eval"))
  finally:
    held.release()
  assert run_files.snapshot(workdir) == before
  # A holder killed with SIGKILL leaves its record (the kernel dropped its flock).
  with open(os.path.join(workdir, rundir.LOCK), "w") as f:
    json.dump({"host": "node7", "pid": 4242, "started": "2026-12-01T10:00:00+00:00",
               "command": "python -m xrayjax.main"}, f)
  lock = rundir.RunLock(workdir).acquire()
  assert "ended without releasing it (host node7, PID 4242" in lock.stale
  lock.release()
  assert not os.path.exists(os.path.join(workdir, rundir.LOCK))
  # A new directory the lock made is removed when the job stops before writing to it.
  new = str(tmp_path / "new")
  rundir.RunLock(new).acquire().release()
  assert not os.path.exists(new)


# --- preemption: kills and SIGTERM resume bit for bit -----------------------------------------


def _latest_state(stage_dir):
  ckpts = checkpoint.StageCheckpoints(stage_dir)
  try:
    return ckpts._manager.restore(ckpts.latest_step())
  finally:
    ckpts.close()


def _same_states(a, b):
  for stage in ("stage_a", "fold0/stage_b", "fold1/stage_b"):
    x, y = _latest_state(os.path.join(a, stage)), _latest_state(os.path.join(b, stage))
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_array_equal(u, v)


class _Killed(Exception):
  pass


# Stage B: two epochs of batches of 4 (a few steps each) and a checkpoint every 2 steps, so
# some saves fall inside an epoch; the command's flags (below) say the same.
KILL_SETTINGS = {"stage_b.epochs": 2, "stage_b.batch_size": 4, "checkpoint_every_steps": 2}


def _kill_config(tfds_dir):
  c = tiny.detl_config(tfds_dir)
  c.update_from_flattened_dict(KILL_SETTINGS)
  return c


@pytest.fixture(scope="module")
def straight(tfds_dir, tmp_path_factory):
  """The run the killed ones must end as: the kill settings, never interrupted."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  experiment.run(_kill_config(tfds_dir), workdir)
  return workdir


def test_kills_inside_and_between_epochs_and_sigterm_resume_bit_identically(
    tfds_dir, straight, tmp_path, monkeypatch):
  tiny_config = _kill_config(tfds_dir)
  resumed = str(tmp_path / "resumed")
  real_save, saves, kills = checkpoint.StageCheckpoints.save, [], []

  def save_then_die(kill_at):
    def save(self, state, step, metrics):
      real_save(self, state, step, metrics)
      saves.append((self.name, step, metrics["select_metric"]))
      if len(saves) == kill_at:
        kills.append(saves[-1])
        raise _Killed()
    return save

  # Killed (without warning) right after a save, four times over (cumulative save counts):
  # inside stage A's epoch, inside fold 0's first epoch, at its end (the next run starts
  # epoch 2 of the stage) and inside its second epoch.
  for kill_at in (2, 6, 7, 9):
    monkeypatch.setattr(checkpoint.StageCheckpoints, "save", save_then_die(kill_at))
    with pytest.raises(_Killed):
      experiment.run(tiny_config, resumed)
    assert not os.path.exists(os.path.join(resumed, "results.json"))
  monkeypatch.setattr(checkpoint.StageCheckpoints, "save", real_save)
  print("killed after saving", kills)
  assert [k[:2] for k in kills] == [("stage_a", 4), ("fold0/stage_b", 4), ("fold0/stage_b", 5),
                                    ("fold0/stage_b", 8)]
  # Inside an epoch but for the third: the end of fold 0's first (5 steps of 4 images).
  assert [k[2] == train.MIDDLE for k in kills] == [True, True, False, True], kills

  # SIGTERM arrives during a step: the step finishes, a checkpoint is written, the run stops.
  real_step, calls = train._compiled_step, []

  def compiled_step(*args, **kwargs):
    create_fn, step_fn = real_step(*args, **kwargs)

    def step_and_signal(state, batch, key):
      calls.append(1)
      if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(state, batch, key)
    return create_fn, step_and_signal

  monkeypatch.setattr(train, "_compiled_step", compiled_step)
  with pytest.raises(train.Interrupted, match="stopped by SIGTERM after step") as e:
    experiment.run(tiny_config, resumed)
  assert e.value.code == 128 + signal.SIGTERM
  monkeypatch.setattr(train, "_compiled_step", real_step)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
  experiment.run(tiny_config, resumed)
  _same_states(straight, resumed)
  _same_predictions(_predictions(straight), _predictions(resumed))


@pytest.mark.slow
def test_sigkill_of_the_real_command_inside_an_epoch_resumes_bit_identically(tfds_dir, straight,
                                                                           tmp_path):
  """The real entry point, killed with SIGKILL once fold 0's stage B has a checkpoint inside
  an epoch, then run again, ends with the parameters and predictions of the unkilled run
  (trained in this process: the command computes as the library does). Before the kill, held
  stopped (SIGSTOP) with its lock, it makes a second command on the directory exit 2 naming
  its PID; the run that resumes takes the dead job's lock over and releases it at its end."""
  killed = str(tmp_path / "killed")
  command = [sys.executable, "-m", "xrayjax.main", "--config=configs/detl.py:runlocal",
             f"--workdir={killed}", f"--config.data.tfds_dir={tfds_dir}",
             "--config.eval.gradcam.enabled=False", "--config.eval.bootstrap=0",
             "--config.audit.perturb=False", "--config.audit.probes=False",
             *(f"--config.{k}={v}" for k, v in KILL_SETTINGS.items())]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  stage = os.path.join(killed, "fold0", "stage_b")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    sums = os.path.join(stage, checkpoint.CHECKSUMS)
    if os.path.exists(sums) and any(int(s) % _steps(stage) for s in files.read_json(sums)):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGSTOP)  # alive, holding the directory, computing nothing
  try:
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert second.returncode == 2, second.stderr[-2000:]
  assert f"in use by another job (host {socket.gethostname()}, PID {proc.pid}" in second.stderr
  assert not os.path.exists(os.path.join(killed, "results.json"))
  resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "taking over the lock of a job that ended without releasing it" in resumed.stderr
  assert not os.path.exists(os.path.join(killed, rundir.LOCK))
  _same_states(straight, killed)
  _same_predictions(_predictions(straight), _predictions(killed))


def _steps(stage_dir):
  """Steps per epoch of the killed run's fold-0 stage B (batch 4), from plan.json."""
  plan = files.read_json(os.path.join(os.path.dirname(os.path.dirname(stage_dir)), "plan.json"))
  s = next(s for s in plan["stages"] if s["name"] == "fold0/stage_b")
  return sum(s["phases"][0][c] for c in s["classes"]) // 4


# --- config errors stop before anything is written --------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("stage_b.batch_size", 1000, "fewer than one batch of 1000"),
    ("stage_b.epochs", 0, "epochs"),
    ("data.image_size", 8, "below the minimum input of model"),
    ("model.init_from", "/nonexistent/vgg16.h5", "does not exist"),
    ("checkpoint_every_steps", -1, "checkpoint_every_steps"),
    ("cache_budget_mb", -1, "cache_budget_mb=-1 must be >= 0"),
])
def test_config_errors_stop_before_the_run_directory_is_written(tiny_config, tmp_path, field,
                                                                value, match):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  node = tiny_config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    experiment.run(tiny_config, str(workdir))
  assert os.listdir(workdir) == ["notes.txt"]


def test_batch_sizes_must_divide_over_the_devices(tiny_config):
  mesh = type("Mesh", (), {"devices": np.empty(8)})()
  tiny_config.stage_b.batch_size = 12
  _, plan = experiment.prepare(tiny_config)
  with pytest.raises(ValueError, match=r"\[fold0/stage_b\] batch_size=12 must be a multiple of "
                                       "the 8 devices"):
    checks.plan_sizes(tiny_config, plan, mesh)


def test_run_directories_of_older_versions_are_compared_by_their_image_keys(tmp_path):
  """splits.json before fingerprints held bare key lists: a match passes, a moved image is
  named; a directory without splits.json is a new run."""
  legacy = {"stages": {"fold0/stage_b": {"phases": [["a", "b"]], "val": ["c"]}},
            "evaluations": [{"fold": 0, "stage": "fold0/stage_b", "test": ["d"]}]}
  part = lambda keys: {"keys": keys, "patients": keys}  # noqa: E731
  now = {"stages": {"fold0/stage_b": {"phases": [part(["a", "b"])], "val": part(["c"])}},
         "evaluations": [{"fold": 0, "stage": "fold0/stage_b", **part(["d"])}],
         "trained_sha1": []}
  current = {"split_config": {}, "data": {}}
  assert rundir.check(str(tmp_path), current, now) is False
  files.write_json(str(tmp_path / rundir.SPLITS), legacy)
  assert rundir.check(str(tmp_path), current, now) is True
  now["stages"]["fold0/stage_b"]["phases"] = [part(["a", "d"])]
  now["evaluations"][0].update(part(["b"]))
  with pytest.raises(rundir.ChangedError) as e:
    rundir.check(str(tmp_path), current, now)
  message = str(e.value)
  assert "partition fold0/stage_b/train: 1 image(s) added (d), 1 image(s) removed (b)" in message
  assert "fold0/test (fold0/stage_b): 1 image(s) added (b), 1 image(s) removed (d)" in message

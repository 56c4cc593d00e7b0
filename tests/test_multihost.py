"""Multi-host: two processes with 4 CPU devices each train as one process with 8 devices.

The end-to-end test launches the real entry point (`python -m xrayjax.main --distributed`)
as two local processes that find each other through JAX_COORDINATOR_ADDRESS and
XRAYJAX_NUM_PROCESSES / XRAYJAX_PROCESS_ID (sharding.initialize_distributed), and compares
them with the same command in one 8-device process: per-step losses, epoch metrics, every
stage's selected parameters and the test metrics, and that the run directory is written once.
The one-process run is also the command line's end-to-end check: its summary and progress
lines, `--mode=eval` of it, and `xrayjax.predict` of its models in a 1-device process.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from xrayjax import sharding
from xrayjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- each process feeds its own share of every batch -------------------------------------------


def _indexed_images(n: int):
  """A dataset whose image k is filled with k, so batches show which examples they hold."""
  images = np.repeat(np.arange(n, dtype=np.uint8), 4).reshape(n, 2, 2, 1)
  return pipeline.from_arrays(images, label=np.arange(n) % 4)


def _ids(batch) -> list[int]:
  return [int(round((x + 1) * 127.5)) for x in batch["image"][:, 0, 0, 0]]


def test_train_batches_split_each_global_batch_between_processes():
  ds, n, batch = _indexed_images(37), 37, 8
  one = [_ids(b) for b in pipeline.train_batches(ds, n, batch, seed=3, epoch=1)]
  parts = [[_ids(b) for b in pipeline.train_batches(ds, n, batch, 3, 1, (), p, 2)]
           for p in range(2)]
  assert len(one) == len(parts[0]) == len(parts[1]) == n // batch
  for step, global_batch in enumerate(one):
    mine, theirs = parts[0][step], parts[1][step]
    assert len(mine) == len(theirs) == batch // 2
    assert not set(mine) & set(theirs)  # no example is read by both processes
    assert sorted(mine + theirs) == sorted(global_batch)  # together: the 1-process batch


def test_eval_batches_cover_every_example_once_across_processes():
  ds, n, batch = _indexed_images(21), 21, 8
  seen = []
  for p in range(2):
    batches = list(pipeline.eval_batches(ds, n, batch, p, 2))
    assert len(batches) == 3 and all(len(b["mask"]) == batch // 2 for b in batches)
    seen += [i for b in batches for i, m in zip(b["index"], b["mask"]) if m]
  assert sorted(seen) == list(range(n))


def test_initialize_distributed_reads_process_count_and_id(monkeypatch):
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  sharding.initialize_distributed(False)
  assert not calls
  monkeypatch.setenv(sharding.NUM_PROCESSES_ENV, "2")
  monkeypatch.setenv(sharding.PROCESS_ID_ENV, "1")
  sharding.initialize_distributed(True)
  assert calls == [{"num_processes": 2, "process_id": 1}]
  monkeypatch.setenv(sharding.PROCESS_ID_ENV, "one")
  with pytest.raises(ValueError, match="XRAYJAX_PROCESS_ID='one' is not an integer"):
    sharding.initialize_distributed(True)
  monkeypatch.delenv(sharding.PROCESS_ID_ENV)
  with pytest.raises(ValueError, match="set both"):
    sharding.initialize_distributed(True)
  monkeypatch.delenv(sharding.NUM_PROCESSES_ENV)
  sharding.initialize_distributed(True)  # a cluster JAX detects: nothing passed
  assert calls[-1] == {}


# --- the entry point on two processes ---------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(args, envs, logs, timeout):
  """Runs one `python -m xrayjax.main` per env; if one fails, stops the others (a process
  whose peer died would wait minutes for the coordination service to give up)."""
  procs = []
  for env, log in zip(envs, logs):
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
      procs.append(subprocess.Popen([sys.executable, "-m", "xrayjax.main", *args], env=env,
                                    stdout=out, stderr=err, cwd=ROOT))
  deadline = time.time() + timeout
  while any(p.poll() is None for p in procs):
    failed = any(p.poll() not in (None, 0) for p in procs)
    if failed or time.time() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  for p, log in zip(procs, logs):
    p.wait()
    with open(log + ".err") as f:
      assert p.returncode == 0, f"{log}: exit {p.returncode}\n{f.read()[-4000:]}"


def _scalars(workdir: str) -> dict:
  """{(stage, tag, step): value} of the run's TensorBoard events."""
  import tensorflow as tf
  out = {}
  events = os.path.join(workdir, "tensorboard")
  for path in glob.glob(os.path.join(events, "**", "events.*"), recursive=True):
    stage = os.path.relpath(os.path.dirname(path), events)
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out[stage, value.tag, event.step] = float(tf.make_ndarray(value.tensor))
  return out


def _files(workdir: str) -> list[str]:
  """The run directory's files, event files by directory (their names hold pid and time),
  without orbax's step directories (a multi-process checkpoint has per-process files)."""
  out = []
  for dirpath, dirs, names in os.walk(workdir):
    dirs[:] = [d for d in dirs if not d.isdigit()]
    for n in names:
      rel = os.path.relpath(os.path.join(dirpath, n), workdir)
      out.append(os.path.join(os.path.dirname(rel), "events") if n.startswith("events.")
                 else rel)
  return sorted(out)


@pytest.mark.slow
def test_cli_on_eight_devices_and_two_processes_that_train_as_one(tfds_dir, tmp_path):
  base = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  for k in ("JAX_COORDINATOR_ADDRESS", sharding.NUM_PROCESSES_ENV, sharding.PROCESS_ID_ENV):
    base.pop(k, None)
  flags = ["--config=configs/detl.py:runlocal", f"--config.data.tfds_dir={tfds_dir}",
           "--config.eval.bootstrap=0"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  # One process with 8 devices (it also builds the data both runs read).
  xla = base.get("XLA_FLAGS", "")
  eight = dict(base, XLA_FLAGS=f"{xla} --xla_force_host_platform_device_count=8")
  _launch(flags + [f"--workdir={one}"], [eight], [one], timeout=600)
  # Two processes with 4 devices each.
  address = f"localhost:{_free_port()}"
  envs = [dict(base, XLA_FLAGS=f"{xla} --xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=address, **{sharding.NUM_PROCESSES_ENV: "2",
                                                    sharding.PROCESS_ID_ENV: str(i)})
          for i in range(2)]
  _launch(flags + [f"--workdir={two}", "--distributed"], envs,
          [str(tmp_path / f"two{i}") for i in range(2)], timeout=600)
  with open(tmp_path / "two0.err") as f:
    assert "jax.distributed: process 0 of 2, 8 global devices (4 local)" in f.read()

  # Per-step losses and epoch metrics (TensorBoard, written by process 0 alone).
  a, b = _scalars(one), _scalars(two)
  assert a.keys() == b.keys() and any(k[1] == "train/loss_step" for k in a)
  print("\nstage            step  loss (1 process x 8 devices)  loss (2 processes x 4 devices)")
  for key in sorted(a, key=lambda k: (k[0] != "stage_a", k)):  # in training order
    if key[1] == "train/loss_step":
      print(f"{key[0]:<16} {key[2]:>4}  {a[key]:.7f}{'':<21}{b[key]:.7f}")
  # The two layouts order each batch's examples differently over the devices (process p
  # holds every 2nd example of the shuffled epoch), so sums differ by round-off.
  np.testing.assert_allclose([b[k] for k in sorted(a)], [a[k] for k in sorted(a)], rtol=1e-5)

  # Every stage's selected parameters and BatchNorm statistics.
  from xrayjax import infer
  import jax
  stages = sorted(os.path.dirname(p)[len(one) + 1:]
                  for p in glob.glob(os.path.join(one, "**", "summary.json"), recursive=True))
  assert len(stages) == 3, stages  # stage_a, fold0/stage_b, fold1/stage_b
  for stage in stages:
    (va, sa), (vb, sb) = infer.restore(os.path.join(one, stage)), infer.restore(
        os.path.join(two, stage))
    assert sa["selected_step"] == sb["selected_step"]
    leaves_a, leaves_b = jax.tree.leaves(va), jax.tree.leaves(vb)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6,
                                 err_msg=stage)

  # Results: the same test metrics, on 8 devices, written once (no temporary files left).
  results = [json.load(open(os.path.join(d, "results.json"))) for d in (one, two)]
  assert results[0]["devices"] == results[1]["devices"] == 8
  for fa, fb in zip(results[0]["fold_metrics"], results[1]["fold_metrics"]):
    assert fa["confusion"] == fb["confusion"]
    assert fa["macro_auroc"] == pytest.approx(fb["macro_auroc"], abs=1e-6)
  # Grad-CAM: process 0 draws the maps on its own devices; the same scores as one process.
  ga, gb = results[0]["gradcam"], results[1]["gradcam"]
  assert gb is not None and ga.keys() == gb.keys()
  for k in ga:  # (the two runs' weights differ by round-off: a map's peak may move in 1 image)
    assert gb[k]["images"] == ga[k]["images"], k
    assert gb[k]["mean"] == pytest.approx(ga[k]["mean"], abs=1.01 / max(ga[k]["images"], 1),
                                          nan_ok=True), k
  assert _files(one) == _files(two)
  assert not [f for f in _files(two) if ".tmp" in f]
  assert _files(two).count("results.json") == 1
  assert sum(f.endswith("events") for f in _files(two)) == len(stages)
  # (after the comparison of the two directories: evaluating writes eval.json into `one`)
  _check_the_command_line(one, flags, eight, tmp_path)


def _check_the_command_line(workdir, flags, env, tmp_path):
  """The one-process run's output, `--mode=eval` of it (its metrics again, Grad-CAM off as
  another eval.* setting), and its models predicting in a 1-device process."""
  with open(workdir + ".out") as f:
    out = f.read()
  assert "2-fold evaluation" in out and "confusion matrix summed over folds" in out
  with open(workdir + ".err") as f:
    assert "steps/s, ETA" in f.read()  # progress lines
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)

  proc = subprocess.run([sys.executable, "-m", "xrayjax.main", "--mode=eval",
                         f"--workdir={workdir}", *flags, "--config.eval.gradcam.enabled=False"],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f)["across_folds"] == results["across_folds"]

  from PIL import Image
  from xrayjax.data.sources import phantom
  rng = np.random.default_rng(0)
  image = phantom.render(rng, size=64, label="covid", anatomy=phantom.sample_anatomy(rng),
                         site=phantom.SITES[0], view="PA", severity=0.8, finding=None)["image"]
  Image.fromarray(image).save(tmp_path / "x.png")
  one_device = dict(env, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
  proc = subprocess.run([sys.executable, "-m", "xrayjax.predict", f"--workdir={workdir}",
                         "--format=json", "--overlays=none", str(tmp_path / "x.png")],
                        env=one_device, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(json.loads(proc.stdout)["predictions"]) == 1

"""The command line, end to end, on 8 simulated CPU devices: train, then --mode=eval."""

import json
import os
import subprocess
import sys

import pytest


def _main(*args, env):
  return subprocess.run([sys.executable, "-m", "xrayjax.main", *args], env=env,
                        capture_output=True, text=True, timeout=900,
                        cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.slow
def test_cli_trains_then_evaluates_on_eight_devices(tfds_dir, tmp_path):
  # Tiny models: compile time dominates, so XLA skips most optimisations (as in the tests).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  workdir = str(tmp_path / "run")
  proc = _main("--config=configs/detl.py:runlocal", f"--workdir={workdir}",
               f"--config.data.tfds_dir={tfds_dir}", "--config.eval.gradcam.enabled=False",
               "--config.audit.perturb=False", "--config.audit.probes=False", env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2-fold evaluation" in proc.stdout
  assert "confusion matrix summed over folds" in proc.stdout
  assert "steps/s, ETA" in proc.stderr  # progress lines
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["devices"] == 8

  proc = _main("--mode=eval", f"--workdir={workdir}", env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    evaluated = json.load(f)
  assert evaluated["across_folds"] == results["across_folds"]

  proc = _main("--mode=eval", f"--workdir={tmp_path / 'nothing'}", env=env)
  assert proc.returncode != 0 and "not an xrayjax run directory" in proc.stderr

  # The models trained on 8 devices predict in a 1-device process (another machine's shape).
  import numpy as np
  from PIL import Image
  from xrayjax.data.sources import phantom
  rng = np.random.default_rng(0)
  image = phantom.render(rng, size=64, label="covid", anatomy=phantom.sample_anatomy(rng),
                         site=phantom.SITES[0], view="PA", severity=0.8, finding=None)["image"]
  Image.fromarray(image).save(tmp_path / "x.png")
  one_device = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "xrayjax.predict", f"--workdir={workdir}",
                         "--format=json", "--overlays=none", str(tmp_path / "x.png")],
                        env=one_device, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(json.loads(proc.stdout)["predictions"]) == 1

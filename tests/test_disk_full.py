"""A full disk is a normal event on shared scratch: one clear error (what was being saved,
where, how much is free, that the same command resumes), exit status 2, nothing lost."""

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest

from xrayjax import experiment, files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _full_after(monkeypatch, saves: int):
  """orbax's save fails with ENOSPC from its `saves`-th call on, as on a full file system."""
  real, calls = ocp.CheckpointManager.save, []

  def save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) >= saves:
      raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  return calls


def test_disk_full_during_a_save_is_one_clear_error_and_the_same_command_resumes(
    tiny_config, tiny_run, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  calls = _full_after(monkeypatch, 3)
  with pytest.raises(files.DiskFullError) as e:
    experiment.run(tiny_config, workdir)
  message = str(e.value)
  assert f"the checkpoint of step {calls[-1]} of stage " in message
  assert workdir in message and " free there)" in message
  assert "run the same command again: it resumes" in message
  monkeypatch.undo()  # space freed
  again = experiment.run(tiny_config, workdir)
  np.testing.assert_equal(again["fold_metrics"], tiny_run[1]["fold_metrics"])


def test_disk_full_writing_a_results_file_is_one_clear_error(tmp_path, monkeypatch):
  def full(tmp):
    with open(tmp, "w") as f:
      f.write("x")
    raise OSError(errno.ENOSPC, "No space left on device")
  with pytest.raises(files.DiskFullError, match="results.json to .* free there"):
    files.write_with(str(tmp_path / "results.json"), full)
  assert os.listdir(tmp_path) == []  # the temporary file is removed


def test_disk_full_exits_2_with_one_line(tfds_dir, tmp_path):
  script = textwrap.dedent(f"""
      import errno, runpy, sys
      import orbax.checkpoint as ocp

      def save(self, step, *args, **kwargs):  # the file system is full
        raise OSError(errno.ENOSPC, "No space left on device")

      ocp.CheckpointManager.save = save
      sys.argv = ["main", "--config=configs/detl.py:runlocal", "--workdir={tmp_path / 'run'}",
                  "--config.data.tfds_dir={tfds_dir}", "--config.eval.gradcam.enabled=False"]
      runpy.run_module("xrayjax.main", run_name="__main__")
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "XRAYJAX_HOSTMEM": "0"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "no space left on device while writing the checkpoint" in errors[0]
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("free, shown", [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.0 KB"),
                                         (5 * 2**20, "5.0 MB"), (5000 * 2**30, "5000.0 GB")])
def test_free_space_reads_in_the_largest_unit_below_1024(monkeypatch, tmp_path, free, shown):
  usage = files.shutil.disk_usage(tmp_path)._replace(free=free)
  monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage)
  assert files.free_space(str(tmp_path / "not" / "there")) == shown

"""Paired comparison of runs (xrayjax/compare.py) on run directories written here, whose
predictions are known, and on the session's tiny run."""

import csv
import json
import os

import numpy as np
import pytest

from xrayjax import compare

CLASSES = ["normal", "pneumonia", "covid"]


def _run(directory, right, patients=40, per_patient=2, seed=0, shift=0):
  """A run directory whose image i (label i % 3) is predicted right where right[i]."""
  os.makedirs(directory)
  rng = np.random.default_rng(seed)
  rows, n = [], patients * per_patient
  for i in range(n):
    label = i % 3
    guess = label if right[i] else (label + 1) % 3
    p = np.full(3, 0.1) + rng.uniform(0, 0.05, 3)
    p[guess] = 0.8
    p /= p.sum()
    rows.append({"fold": i % 2, "image_id": f"img{i + shift}",
                 "patient_id": f"pat{i // per_patient}", "source": "synthetic_cxr", "site": "site0", "label": CLASSES[label],
                 "prediction": CLASSES[guess], **{f"p_{c}": p[k] for k, c in enumerate(CLASSES)}})
  with open(os.path.join(directory, "results_predictions.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump({"classes": CLASSES, "protocol": "corrected", "model": "concat",
               "prevalences": [0.01]}, f)
  with open(os.path.join(directory, "splits.json"), "w") as f:
    json.dump({"evaluations": [{"fold": k, "patients": sorted({r["patient_id"] for r in rows
                                                                if r["fold"] == k})}
                               for k in (0, 1)]}, f)
  return str(directory)


def test_paired_difference_its_interval_and_mcnemar(tmp_path):
  n = 80
  right_a = np.zeros(n, bool)
  right_a[:40] = True  # 50%
  right_b = right_a.copy()
  right_b[40:70] = True  # 30 more right, none fewer: 87.5%
  a, b = _run(tmp_path / "a", right_a), _run(tmp_path / "b", right_b)
  [c] = compare.compare([a, b], n_boot=300)
  acc = next(r for r in c["rows"] if r["metric"] == "accuracy")
  assert acc["reference"] == pytest.approx(0.5) and acc["other"] == pytest.approx(0.875)
  assert acc["difference"] == pytest.approx(0.375)
  assert 0 < acc["ci_low"] < 0.375 < acc["ci_high"] < 0.6
  t = c["mcnemar_accuracy"]
  assert (t["reference_only_right"], t["other_only_right"]) == (0, 30)
  assert t["p_value"] == pytest.approx(2 * 0.5 ** 30)
  assert {r["metric"] for r in c["rows"]} >= {"balanced_accuracy", "macro_auroc",
                                               "covid/sensitivity", "covid/ppv"}
  # The reverse comparison is the mirror image.
  [back] = compare.compare([b, a], n_boot=300)
  assert next(r for r in back["rows"] if r["metric"] == "accuracy")["difference"] == \
      pytest.approx(-0.375)


def test_identical_runs_differ_by_nothing(tmp_path):
  right = np.arange(80) % 4 != 0
  a, b = _run(tmp_path / "a", right), _run(tmp_path / "b", right)
  [c] = compare.compare([a, b], n_boot=100)
  assert all(r["difference"] == 0 and r["ci_low"] == r["ci_high"] == 0 for r in c["rows"])
  assert c["mcnemar_accuracy"]["p_value"] == 1.0


def test_runs_on_other_images_are_refused_before_anything_is_written(tmp_path, capsys):
  right = np.ones(80, bool)
  a = _run(tmp_path / "a", right)
  b = _run(tmp_path / "b", right, shift=1)  # the same patients, other images
  c = _run(tmp_path / "c", right, patients=30)  # fewer patients
  with pytest.raises(compare.NotComparable, match="only in a"):
    compare.compare([a, b])
  out = str(tmp_path / "out")
  assert compare.main([a, c, "--out", out]) == 2
  assert "not scored on the same test images" in capsys.readouterr().err
  assert not os.path.exists(out)
  assert compare.main([str(tmp_path), a]) == 2  # not a run directory
  assert "not a finished run directory" in capsys.readouterr().err


def test_command_writes_json_html_and_prints_the_table(tmp_path, capsys):
  a = _run(tmp_path / "a", np.arange(80) % 2 == 0)
  b = _run(tmp_path / "b", np.arange(80) % 3 != 0, seed=1)
  assert compare.main([a, b, "--bootstrap", "50"]) == 0
  out = os.path.join(str(tmp_path), "compare_a_vs_b")
  saved = json.load(open(os.path.join(out, "compare.json")))
  assert saved["comparisons"][0]["images"] == 80
  assert "McNemar" in open(os.path.join(out, "compare.html")).read()
  printed = capsys.readouterr().out
  assert "accuracy" in printed and "95% interval" in printed


def test_a_real_run_against_itself(tiny_run):
  workdir, _ = tiny_run
  [c] = compare.compare([workdir, workdir], n_boot=20)
  assert c["images"] > 0
  for r in c["rows"]:  # (a class the tiny model never predicts has no PPV in either run)
    assert r["difference"] == 0 or np.isnan(r["reference"]) and np.isnan(r["other"])

"""Bad input gets a message that says what, where and what to do, and loses nothing: labels a
task leaves out, empty classes, duplicate and undecodable manifest rows, predict's arguments.

Every test writes its own tiny files (PNGs with PIL, manifests with csv)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

import run_files
from configs import concat, detl
from xrayjax import experiment, files, predict
from xrayjax.data import sources, tasks

COLUMNS = ("path", "label", "patient_id", "source", "view")


def _png(path, seed, size=24):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4)).astype(np.uint8)
  image = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
  Image.fromarray(image).save(path)


def _manifest(root, labels, missing=()):
  """A manifest of one PNG per label (patient per row) in `root`; paths in `missing` are
  listed but not written. CSV line k + 2 is labels[k]."""
  rows = []
  for k, label in enumerate(labels):
    name = f"img{k:02d}.png"
    if name not in missing:
      _png(os.path.join(root, name), k)
    rows.append({"path": name, "label": label, "patient_id": f"p{k}", "source": "site",
                 "view": "PA"})
  path = os.path.join(root, "manifest.csv")
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
  return path


def _data_config(path, tfds_dir, args="data=manifest", method=detl):
  """`method`'s config (configs/detl.py or concat.py with `args`) reading the manifest."""
  c = method.get_config(args)
  c.data.tfds_dir = str(tfds_dir)
  c.data.manifest.update(path=path, label_column="label", image_size=16)
  return c


# --- labels a task leaves out, empty classes --------------------------------------------------

FOUR = ["normal"] * 4 + ["pneumonia"] * 4 + ["other_disease"] * 4 + ["COVID-19"] * 3 + \
    ["covid", "Bronchitis"]


def test_build_report_lists_labels_each_task_leaves_out_with_their_lines(tmp_path, caplog):
  path = _manifest(str(tmp_path), FOUR, missing=("img15.png",))
  c = _data_config(path, tmp_path / "tfds")
  with caplog.at_level("INFO"):
    b = sources.builder(c.data)
  report = sources.build_report(b)
  assert report["listed_in"] == path
  data_b = report["tasks"]["data_b"]
  # Lines 14-16 are 'COVID-19' (row k is on line k + 2); they are built but not in data_b.
  assert data_b["not_in_task"]["COVID-19"]["rows"] == 3
  assert [e["line"] for e in data_b["not_in_task"]["COVID-19"]["examples"]] == [14, 15, 16]
  assert data_b["not_in_task"]["COVID-19"]["examples"][0]["path"] == "img12.png"
  assert data_b["not_in_task"]["Bronchitis"]["rows"] == 1
  # The one 'covid' row's file is missing: counted as a skipped row of class covid.
  assert data_b["skipped_by_class"]["covid"]["rows"] == 1
  assert data_b["skipped_by_class"]["covid"]["by_reason"] == {"missing file": 1}
  assert report["skipped_rows"][0]["label"] == "covid"
  # three_class knows 'COVID-19' but not other_disease.
  assert "COVID-19" not in report["tasks"]["three_class"]["not_in_task"]
  assert report["tasks"]["three_class"]["not_in_task"]["other_disease"]["rows"] == 4
  logged = caplog.text
  assert "skipped manifest.csv line 17 (img15.png): missing file" in logged
  assert ("not in task data_b: 4 rows: 'COVID-19' 3 (manifest.csv lines 14, 15, 16); "
          "'Bronchitis' 1 (manifest.csv line 18)") in logged


def test_an_empty_class_stops_the_run_before_it_writes_and_says_where_its_rows_went(tmp_path):
  path = _manifest(str(tmp_path), FOUR, missing=("img15.png",))
  c = _data_config(path, tmp_path / "tfds", "data=manifest,runlocal")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("an earlier run's notes\n")
  before = run_files.snapshot(workdir)
  with pytest.raises(tasks.EmptyClassError) as err:
    experiment.run(c, str(workdir))
  message = str(err.value)
  print(message)
  assert "class 'covid' of task 'data_b' has no images in Data-B" in message
  assert ("3 rows labelled 'COVID-19' in manifest were dropped as not in the task "
          "(manifest.csv lines 14, 15, 16)") in message
  assert ("1 row of manifest was skipped while building: missing file at manifest.csv line 17 "
          "(img15.png); every skipped row and its reason is in ") in message
  assert os.path.join(str(tmp_path / "tfds"), "manifest") in message  # the build report's path
  assert ("other rows the task leaves out (a class's rows may be among them under another "
          "name): 1 row labelled 'Bronchitis' in manifest was dropped as not in the task "
          "(manifest.csv line 18)") in message
  assert "['normal', 'pneumonia', 'other_disease', 'covid']" in message  # what is valid
  assert run_files.snapshot(workdir) == before  # nothing written, nothing touched


def test_concat_names_the_empty_class_from_the_cohort(tmp_path):
  labels = ["normal"] * 4 + ["viral pneumonia"] * 3 + ["covid"] * 4
  path = _manifest(str(tmp_path), labels)
  c = _data_config(path, tmp_path / "tfds", "data=manifest,runlocal", concat)
  with pytest.raises(tasks.EmptyClassError) as err:
    experiment.prepare(c)
  message = str(err.value)
  assert "class 'pneumonia' of task 'three_class' has no images" in message
  assert ("3 rows labelled 'viral pneumonia' in manifest were dropped as not in the task "
          "(manifest.csv lines 6, 7, 8)") in message


def test_a_gradcam_reference_that_is_no_class_of_the_model_stops_the_run_before_training(
    tmp_path):
  labels = ["normal"] * 10 + ["pneumonia"] * 10 + ["covid"] * 10
  c = _data_config(_manifest(str(tmp_path), labels), tmp_path / "tfds", "data=manifest,runlocal",
                   concat)
  c.phases.fresh = {"normal": 2, "pneumonia": 1}
  c.eval.gradcam.reference = "healthy"
  with pytest.raises(ValueError, match=r"config.eval.gradcam.reference='healthy' is not a class "
                     r"of stage fold0/concat \(classes \['normal', 'pneumonia', 'covid'\]\)"):
    experiment.prepare(c)
  c.eval.gradcam.reference = "covid"
  experiment.prepare(c)


def test_plain_metadata_still_gets_the_class_and_the_labels_left_out():
  meta = {"label": np.array(["normal", "pneumonia", "other_disease", "COVID-19"], object),
          "source": np.array(["s"] * 4, object),
          "image_id": np.array(["a", "b", "c", "d"], object)}
  with pytest.raises(tasks.EmptyClassError, match=r"class 'covid' .*: 1 row labelled "
                                                  r"'COVID-19' was dropped as not in the task "
                                                  r"\(d\)"):
    tasks.check_classes(tasks.get("data_b"), meta, np.ones(4, bool), "the test data")
  meta["label"][3] = "covid"
  tasks.check_classes(tasks.get("data_b"), meta, np.ones(4, bool), "the test data")


# --- duplicate and undecodable rows -----------------------------------------------------------


def test_duplicate_rows_are_skipped_with_their_lines_and_conflicts_drop_every_copy(tmp_path):
  for k in range(4):
    _png(tmp_path / f"x{k}.png", k)
  lines = ["path,label,patient_id,source",
           "x0.png,normal,p0,s",
           "x1.png,covid,p1,s",
           "x0.png,normal,p0,s",        # line 4: the same row again
           "x2.png,normal,p2,s",
           "x2.png,pneumonia,p2,s",     # line 6: the same path with another label
           "x3.png,normal,p3,s"]
  path = tmp_path / "manifest.csv"
  path.write_text("\n".join(lines) + "\n")
  b = sources.builder(_data_config(str(path), tmp_path / "tfds").data)
  report = sources.build_report(b)
  assert report["built"] == 3  # x0 (once), x1, x3
  by_line = {r["line"]: r["reason"] for r in report["skipped_rows"]}
  assert by_line[4] == "duplicate row: 'x0.png' is already listed at line 2"
  assert by_line[5].startswith("duplicate row with conflicting labels or patients: 'x2.png' "
                               "is listed at lines 5, 6")
  assert "line 6: label 'pneumonia'" in by_line[6] and "fix the metadata" in by_line[6]
  assert report["skipped_by_reason"] == {"duplicate row": 1,
                                         "duplicate row with conflicting labels or patients": 2}


def test_undecodable_and_short_rows_are_skipped_with_their_line(tmp_path):
  _png(tmp_path / "ok.png", 0)
  _png(tmp_path / "ok2.png", 1)
  _png(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"), 2)  # a Latin-1 name on disk
  data = (b"path,label,patient_id,source\n"
          b"ok.png,normal,p0,s\n"
          b"caf\xe9.png,normal,p1,s\n"       # line 3: not UTF-8
          b"ok2.png,norm\xe4l,p2,s\n"        # line 4: a label that is not UTF-8
          b"ok2.png,normal,p2,s\n"
          b"\n"
          b"ok.png,normal\n")                 # line 7 (after a blank line): too few fields
  path = tmp_path / "manifest.csv"
  path.write_bytes(data)
  b = sources.builder(_data_config(str(path), tmp_path / "tfds").data)
  report = sources.build_report(b)
  assert report["built"] == 2
  by_line = {r["line"]: r for r in report["skipped_rows"]}
  assert by_line[3]["reason"].startswith("undecodable path: b'caf\\xe9.png' is not UTF-8")
  assert by_line[3]["path"] == "caf\\xe9.png"  # shown, not lost, in the JSON report
  assert by_line[4]["reason"].startswith("undecodable label: b'norm\\xe4l' is not UTF-8")
  assert by_line[7]["reason"] == ("short row: no value for columns ['patient_id', 'source'] "
                                  "(2 of the header's 4 fields)")
  json.dumps(report)  # the report is plain JSON


# --- predict ----------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tiny_config, tmp_path):
  """A run directory as predict reads it (config.json and plan.json of a 2-fold run). Its
  checkpoints are absent: bad input must be refused before any model is restored."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  files.write_json(str(workdir / "config.json"), tiny_config.to_dict())
  files.write_json(str(workdir / "plan.json"), {
      "classes": ["normal", "pneumonia", "other_disease", "covid"],
      "evaluations": [{"fold": k, "stage": f"fold{k}/stage_b"} for k in range(2)]})
  return str(workdir)


def _cli_error(workdir, *args):
  """The message of predict's command line for `args`, run in this process."""
  flags.FLAGS.mark_as_parsed()
  options = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
  paths = [a for a in args if not a.startswith("--")]
  with flagsaver.flagsaver(workdir=workdir, **options):
    with pytest.raises(SystemExit) as exit_:
      predict.main(["predict", *paths])
  return str(exit_.value.code)


def test_predict_refuses_bad_arguments_with_one_line_each(run_dir, tmp_path):
  before = run_files.snapshot(run_dir)
  good = str(tmp_path / "a.png")
  _png(good, 0)
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  (empty / "sub" / "readme.txt").write_text("no images here")
  notes = tmp_path / "notes.txt"
  notes.write_text("not an image")

  message = _cli_error(run_dir, "--fold=5", good)
  assert message == ("xrayjax.predict: --fold=5 is not a fold of this run: valid values are "
                     "0, 1 or `all` (the ensemble of every fold's model)")
  message = _cli_error(run_dir, str(tmp_path / "nope.png"))
  assert message == (f"xrayjax.predict: {tmp_path / 'nope.png'}: no such file or folder; give "
                     "PNG, JPEG or DICOM files or folders holding them")
  message = _cli_error(run_dir, str(empty))
  assert message.startswith(f"xrayjax.predict: folder {empty} holds no image file (.png, .jpg")
  assert "it holds only 1 other files" in message
  message = _cli_error(run_dir, str(notes))
  assert message.startswith(f"xrayjax.predict: no image could be read: {notes}: not a PNG, "
                            "JPEG or DICOM image (UnidentifiedImageError)")
  assert "\n" not in message
  message = _cli_error(str(tmp_path / "elsewhere"), good)
  assert "not an xrayjax run directory" in message
  # The library raises the same errors; a non-image among images is skipped, not fatal.
  with pytest.raises(predict.InputError, match="--fold=x is not a fold"):
    predict.predict(run_dir, [good], fold="x")
  rows, skipped, _ = predict.predict(run_dir, [str(notes)])
  assert rows == [] and skipped[0]["reason"].startswith("not a PNG, JPEG or DICOM image")
  assert run_files.snapshot(run_dir) == before  # no overlay folder, nothing written


def test_predict_command_prints_one_line_and_no_traceback(run_dir, tmp_path):
  _png(str(tmp_path / "a.png"), 0)
  proc = subprocess.run([sys.executable, "-m", "xrayjax.predict", f"--workdir={run_dir}",
                         "--fold=3", str(tmp_path / "a.png")], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)),
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "xrayjax.predict: --fold=3 is not a fold of this run: valid values are 0, 1 or `all` "
      "(the ensemble of every fold's model)")

"""report.html and the evaluation outputs of a tiny run; the page rendered in Chromium."""

import csv
import os
import re
import shutil
import subprocess

import pytest

from configs import detl
from xrayjax import experiment
from xrayjax.evaluate import html

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


@pytest.fixture(scope="module")
def run(tfds_dir, tmp_path_factory):
  c = detl.get_config("runlocal")
  c.data.tfds_dir = tfds_dir
  workdir = str(tmp_path_factory.mktemp("report_run"))
  return workdir, experiment.run(c, workdir)


def test_the_run_writes_metrics_with_intervals_and_a_gradcam_audit(run):
  workdir, results = run
  pooled = results["pooled"]
  assert {"macro_auprc", "ece", "reliability"} <= set(pooled)
  assert {"ppv@0.01", "npv@0.2", "auprc"} <= set(pooled["per_class"]["covid"])
  ci = results["bootstrap_ci"]["accuracy"]
  assert ci["low"] <= pooled["accuracy"] <= ci["high"]
  with open(os.path.join(workdir, "results_metrics.csv")) as f:
    rows = {r["metric"]: r for r in csv.DictReader(f)}
  assert rows["covid/ppv@0.05"]["ci_low"] != "" and rows["accuracy"]["fold_sd"] != ""
  # The summary sets the run beside the pixel probe on the same images.
  audit = results["shortcuts"]
  text = open(os.path.join(workdir, "results_summary.txt")).read()
  assert (f"macro {audit['macro_auroc']:.3f} vs "
          f"{audit['probes']['label']['full']['macro_auroc']:.3f}") in text
  g = results["gradcam"]
  rows = list(csv.DictReader(open(os.path.join(workdir, "results_predictions.csv"))))
  # Synthetic data have lung masks for every image and lesion masks for every diseased one;
  # the randomisation check runs on the first fold (sanity_folds=1). Every score counts each
  # of its images once, as defined or as undefined (an all-zero map).
  diseased = sum(r["label"] != "normal" for r in rows)
  first_fold = sum(r["fold"] == "0" for r in rows)
  for key, images in (("energy_in_lungs", results["num_images"]),
                      ("lung_area", results["num_images"]), ("pointing_game", diseased),
                      ("energy_in_lesion", diseased), ("lesion_area", diseased),
                      ("randomisation_spearman", first_fold)):
    assert g[key]["images"] + g[key]["undefined"] == images, key
  assert g["energy_in_lungs"]["images"] > 0 and g["randomisation_spearman"]["images"] > 0
  # The chance levels are the masks' shares of the image: the lungs cover more than the
  # lesions, and neither the whole film.
  assert 0 < g["lesion_area"]["mean"] < g["lung_area"]["mean"] < 1
  shown = [im for r in results["gradcam_folds"] for im in r["per_image"]]
  wrong = sum(r["label"] != r["prediction"] for r in rows)
  assert sum(im["misclassified"] for im in shown) == wrong  # every misclassified image
  # ... and, per fold, a right prediction of every class the fold's model got right once.
  for r in results["gradcam_folds"]:
    got_right = {p["label"] for p in rows if p["fold"] == str(r["fold"])
                 and p["label"] == p["prediction"]}
    assert got_right and got_right == {im["label"] for im in r["per_image"]
                                       if not im["misclassified"]}
  for im in shown:
    assert os.path.exists(os.path.join(workdir, "gradcam", im["file"]))


def test_report_html_refers_only_to_files_that_exist(run):
  workdir, _ = run
  path = os.path.join(workdir, "report.html")
  refs = html.relative_files(path)
  assert {"plots/roc.png", "plots/pr.png", "plots/reliability.png", "plots/confusion.png"} <= \
      set(refs)
  assert any(r.startswith("gradcam/") for r in refs)
  assert all(os.path.exists(os.path.join(workdir, r)) for r in refs)


def _render(path):
  """(data-images-loaded attribute, console lines) of `path` in headless Chromium."""
  proc = subprocess.run(
      [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
       "--v=0", "--virtual-time-budget=5000", "--dump-dom", f"file://{path}"],
      capture_output=True, text=True, timeout=120)
  loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', proc.stdout)
  console = [l for l in proc.stderr.splitlines() if ":CONSOLE" in l]
  return (loaded.groups() if loaded else None), console, proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get "
                                              "install chromium; .ci/run installs it)")
def test_report_renders_in_chromium_with_every_image_and_no_console_error(run, tmp_path):
  workdir, _ = run
  loaded, console, dom = _render(os.path.join(workdir, "report.html"))
  assert loaded is not None and loaded[0] == loaded[1] and int(loaded[1]) > 4
  assert console == []
  # The shortcut audit: its verdict first (before the metrics), its tables further down.
  verdict = dom.index('id="shortcut-verdict"')
  assert re.search(r"Shortcut risk: (high|moderate|low)</b>", dom)
  assert verdict < dom.index("<h2>Metrics</h2>") < dom.index('id="shortcut-audit"')
  for heading in ("Confounding", "Perturbed test images", "Pixel probes"):
    assert f"<h3>{heading}" in dom
  # The same check catches a broken page: a missing image and a script error.
  bad = tmp_path / "bad.html"
  text = open(os.path.join(workdir, "report.html")).read()
  bad.write_text(text.replace("plots/roc.png", "plots/missing.png").replace(
      "</body>", "<script>undefinedFunction();</script></body>"))
  loaded, console, _ = _render(str(bad))
  assert loaded[0] != loaded[1] and any("undefinedFunction" in l for l in console)


def test_predict_png_jpeg_and_dicom_and_skip_what_cannot_be_read(run, tmp_path):
  import json

  import numpy as np
  from PIL import Image

  import dicom_files
  from xrayjax import predict
  from xrayjax.data.sources import phantom
  workdir, results = run
  rng = np.random.default_rng(0)
  image = phantom.render(rng, size=64, label="covid", anatomy=phantom.sample_anatomy(rng),
                         site=phantom.SITES[0], view="PA", severity=0.8, finding=None)["image"]
  folder = tmp_path / "scans"
  (folder / "sub").mkdir(parents=True)
  Image.fromarray(image).save(folder / "a.png")
  Image.fromarray(image).save(folder / "b.jpg", quality=98)
  dicom_files.write(folder / "sub" / "c.dcm", image.astype(np.uint16) * 16, "MONOCHROME2", 12)
  dicom_files.write(folder / "sub" / "d.dcm", 4095 - image.astype(np.uint16) * 16,
                    "MONOCHROME1", 12)
  (folder / "broken.png").write_bytes(b"not a png")
  overlays = tmp_path / "overlays"
  rows, skipped, classes = predict.predict(workdir, [str(folder)], overlays=str(overlays))
  assert [os.path.basename(r["file"]) for r in rows] == ["a.png", "b.jpg", "c.dcm", "d.dcm"]
  assert [os.path.basename(s["file"]) for s in skipped] == ["broken.png"]
  assert skipped[0]["reason"].startswith("unreadable image")
  p = np.array([[r[f"p_{c}"] for c in classes] for r in rows])
  np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)
  np.testing.assert_allclose(p[2], p[0], atol=1e-4)  # the DICOM holds the PNG's picture
  np.testing.assert_allclose(p[3], p[0], atol=1e-4)  # MONOCHROME1 is inverted back
  assert all(os.path.exists(r["overlay"]) for r in rows)
  # One fold's model alone differs from the ensemble; the formats carry the same rows.
  one, _, _ = predict.predict(workdir, [str(folder / "a.png")], fold="0", overlays="none")
  assert "overlay" not in one[0]
  # Bad input to the trained run: a fold it lacks is refused; a file given by name that is
  # not an image is skipped with why, and the images beside it are still predicted.
  with pytest.raises(predict.InputError, match=r"--fold=7 is not a fold of this run: valid "
                                               r"values are 0, 1 or `all`"):
    predict.predict(workdir, [str(folder / "a.png")], fold="7")
  (tmp_path / "notes.txt").write_text("not an image")
  two, notes, _ = predict.predict(workdir, [str(tmp_path / "notes.txt"), str(folder / "a.png")],
                                  fold="0", overlays="none")
  assert [r["file"] for r in two] == [str(folder / "a.png")] and two[0] == one[0]
  assert notes[0]["reason"].startswith("not a PNG, JPEG or DICOM image")
  as_json = json.loads(predict.table(rows, classes, skipped, "json"))
  assert as_json["predictions"][0]["prediction"] == rows[0]["prediction"]
  assert predict.table(rows, classes, skipped, "csv").splitlines()[0].startswith(
      "file,prediction,p_normal")
  assert "skipped" in predict.table(rows, classes, skipped, "table")
  with pytest.raises(FileNotFoundError, match="not an xrayjax run directory"):
    predict.predict(str(tmp_path), [str(folder)])


GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "detl_runlocal_predictions.csv")


def test_the_runner_reproduces_the_detl_run_made_before_it(run):
  """tests/golden holds runlocal DETL predictions: first those of the DETL-shaped
  experiment.py that the method-agnostic runner replaced (commit f11f2e2, same test
  settings), which this runner matched; regenerated with the same settings when synthetic
  data 2.0.0 redrew the images. Same images, folds and classes; the same probabilities up to
  the float noise of another CPU.

  On this machine they agree to 1e-6. XLA's CPU kernels sum in a different order on other
  instruction sets and core counts, and training amplifies it: CI's machine differed by up
  to 1.8e-3, so the bound is 0.02 (another seed changes the folds, which the first assertion
  catches), and a predicted class is compared only where the golden run's top two classes
  are further apart than twice that bound."""
  workdir, _ = run
  with open(GOLDEN) as f:
    golden = list(csv.DictReader(f))
  with open(os.path.join(workdir, "results_predictions.csv")) as f:
    now = list(csv.DictReader(f))
  assert [(r["fold"], r["image_id"], r["label"]) for r in now] == \
      [(r["fold"], r["image_id"], r["label"]) for r in golden]
  tol = 0.02
  for a, b in zip(now, golden):
    probs = sorted((float(v) for k, v in b.items() if k.startswith("p_")), reverse=True)
    if probs[0] - probs[1] > 2 * tol:
      assert a["prediction"] == b["prediction"], (a["image_id"], a["prediction"], b["prediction"])
    for k in b:
      if k.startswith("p_"):
        assert abs(float(a[k]) - float(b[k])) < tol, (a["image_id"], k, a[k], b[k])


def test_predict_feeds_the_model_what_training_fed_it(run, tmp_path):
  """The images of fold 0's test set, written as the PNGs the builder stored, come out of
  predict.load exactly as the training pipeline gave them to the model, and predict scores
  them as the run did."""
  import numpy as np
  from PIL import Image

  from ml_collections import config_dict
  from xrayjax import files, predict
  from xrayjax.data.sources import decode
  workdir, _ = run
  config = config_dict.ConfigDict(files.read_json(os.path.join(workdir, "config.json")))
  cohort, plan = experiment.prepare(config)
  test = plan.evaluations[0].test
  fed = {ex["index"]: ex["image"] for ex in cohort.dataset(test, plan.labels,
                                                          config.data.image_size)
         .as_numpy_iterator()}
  fed = np.stack([fed[k] for k in range(len(test))])
  builder = cohort.builders[0]
  stored = {ex["image_id"].decode(): ex["image"] for ex in
            builder.as_dataset(split="train").as_numpy_iterator()}
  paths = []
  for k, image_id in enumerate(cohort.meta["image_id"][test]):
    paths.append(str(tmp_path / f"{k:03d}_{image_id}.png"))
    Image.fromarray(stored[image_id][..., 0]).save(paths[-1])
  size = config.data.synthetic.image_size
  loaded, ok, skipped = predict.load(paths, size, config.data.image_size)
  assert ok == paths and not skipped
  np.testing.assert_array_equal(loaded, fed)
  # A single PIL resize (what predict used to do) gives the model other inputs.
  once = np.stack([decode.resize(stored[i][..., 0], config.data.image_size)
                   for i in cohort.meta["image_id"][test]])
  assert np.abs(once.astype(int) - fed[..., 0].astype(int)).max() > 0
  rows, _, classes = predict.predict(workdir, paths, fold="0", overlays="none")
  with open(os.path.join(workdir, "results_predictions.csv")) as f:
    scored = {r["image_id"]: r for r in csv.DictReader(f) if r["fold"] == "0"}
  for path, row in zip(paths, rows):
    image_id = os.path.basename(path)[4:-4]
    for c in classes:
      assert abs(row[f"p_{c}"] - float(scored[image_id][f"p_{c}"])) < 1e-5

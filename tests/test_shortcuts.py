"""The shortcut audit: region ops on hand-made images, Cramér's V by hand, the verdict rule on
constructed audits, plan transformations, and tiny runs whose truth we know."""

import csv
import os

import ml_collections
import numpy as np
import pytest

from xrayjax import checks, experiment, files, methods, rundir
from xrayjax.data import pipeline, regions
from xrayjax.evaluate import shortcuts

GEOMETRY = ml_collections.ConfigDict(dict(centre=0.6, corner=0.2, top_crop=0.08,
                                          lung_box=(0.2, 0.8, 0.1, 0.9)))
SIZE = 20


def _apply(op, images, lung=None, has_lung=None):
  ds = pipeline.from_arrays(images[..., None])
  masks = None if lung is None else {"lung": lung, "has_lung": has_lung}
  out = regions.apply(ds, op, GEOMETRY, masks)
  return np.stack([ex["image"][..., 0] for ex in out.as_numpy_iterator()])


def _images(n=2):
  """Distinct nonzero pixels, so an erased (0) pixel and a moved one are both visible."""
  return (np.arange(n * SIZE * SIZE).reshape(n, SIZE, SIZE) % 250 + 1).astype(np.uint8)


def test_box_ops_erase_exactly_their_pixels():
  images = _images()
  centre = np.zeros((SIZE, SIZE), bool)
  centre[4:16, 4:16] = True  # 0.6 of 20 px, centred: rows and columns 4..15
  corners = np.zeros((SIZE, SIZE), bool)
  for r in (slice(0, 4), slice(16, 20)):
    for c in (slice(0, 4), slice(16, 20)):
      corners[r, c] = True  # 0.2 of the side in each corner
  for op, erased in (("centre_only", ~centre), ("border_only", centre),
                     ("no_corners", corners)):
    out = _apply(op, images)
    np.testing.assert_array_equal(out[:, erased], 0, err_msg=op)
    np.testing.assert_array_equal(out[:, ~erased], images[:, ~erased], err_msg=op)


def test_lung_ops_use_the_mask_and_the_fixed_box_without_one():
  images = _images()
  lung = np.zeros((2, SIZE, SIZE), bool)
  lung[0, 5:12, 3:9] = True  # image 0 has a mask; image 1 has none (box stands in)
  has = np.array([True, False])
  box = np.zeros((SIZE, SIZE), bool)
  box[4:16, 2:18] = True  # lung_box (0.2, 0.8, 0.1, 0.9) of 20 px
  kept = {"lungs_only": [lung[0], box], "no_lungs": [~lung[0], ~box]}
  for op, keep in kept.items():
    out = _apply(op, images, lung, has)
    for i in range(2):
      np.testing.assert_array_equal(out[i][~keep[i]], 0, err_msg=op)
      np.testing.assert_array_equal(out[i][keep[i]], images[i][keep[i]], err_msg=op)
  with pytest.raises(ValueError, match="needs the images' lung masks"):
    _apply("no_lungs", images)


def test_mirror_and_top_crop():
  images = _images()
  np.testing.assert_array_equal(_apply("mirror", images), images[:, :, ::-1])
  marked = np.full((1, 25, 25), 100, np.uint8)
  marked[0, :2] = 255  # a text marker in the top 8% (2 of 25 rows)
  ds = pipeline.from_arrays(marked[..., None])
  out = next(regions.apply(ds, "top_crop", GEOMETRY).as_numpy_iterator())["image"]
  assert out.shape == (25, 25, 1)
  np.testing.assert_array_equal(out, 100)  # the marker is gone, the rest stretched to fit
  with pytest.raises(ValueError, match="unknown region op"):
    regions.apply(ds, "blur", GEOMETRY)


def test_cramers_v_against_a_hand_computation():
  # Rows sum to 40 and 40, columns to 25, 25, 30 (n = 80): expected counts 12.5, 12.5, 15
  # per row; chi2 = 2 * (7.5^2 / 12.5 + 2.5^2 / 12.5 + 5^2 / 15) = 13.333;
  # V = sqrt(chi2 / (n * (min(2, 3) - 1))) = sqrt(13.333 / 80).
  v, p = shortcuts.cramers_v([[20, 10, 10], [5, 15, 20]])
  assert v == pytest.approx(np.sqrt(13.3333333 / 80), rel=1e-6)
  assert p == pytest.approx(np.exp(-13.3333333 / 2), rel=1e-6)  # chi2 with 2 dof
  assert shortcuts.cramers_v([[10, 0], [0, 10]])[0] == pytest.approx(1.0)
  assert np.isnan(shortcuts.cramers_v([[3, 4, 0]])[0])  # one row: undefined
  # Zero rows and columns are dropped, not counted.
  assert shortcuts.cramers_v([[20, 10, 10, 0], [5, 15, 20, 0], [0, 0, 0, 0]])[0] == \
      pytest.approx(v)


def test_confounding_tables_per_partition():
  meta = {"source": np.array(["a", "a", "b", "b", "b"], object),
          "site": np.array(["x"] * 5, object), "age": np.array(["34", "", "71", "75", "x"])}
  labels = np.array([0, 0, 1, 1, -1])
  out = shortcuts.confounding(meta, {"all": np.arange(5), "first": np.array([0, 2])}, labels,
                              ["n", "c"])
  assert out["all"]["source"]["table"] == {"n": {"a": 2, "b": 0}, "c": {"a": 0, "b": 2}}
  assert out["all"]["source"]["cramers_v"] == pytest.approx(1.0)
  assert np.isnan(out["all"]["site"]["cramers_v"])  # one site
  assert out["all"]["age_band"]["values"] == ["30-39", "70-79"]  # unknown ages left out
  assert out["first"]["source"]["table"] == {"n": {"a": 1, "b": 0}, "c": {"a": 0, "b": 1}}


def test_perturbation_table_drops_and_flips():
  labels = np.array([0, 0, 1, 1])
  base = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])
  flipped = base[:, ::-1]
  rows = {r["op"]: r for r in shortcuts.perturbation_table(
      labels, base, {"mirror": base, "no_lungs": flipped}, ["n", "c"])}
  assert rows["none"]["accuracy"] == 1 and rows["none"]["flipped"] == 0
  assert rows["mirror"]["auroc_drop"] == 0 and rows["mirror"]["flipped"] == 0
  assert rows["no_lungs"]["accuracy"] == 0 and rows["no_lungs"]["flipped"] == 1
  assert rows["no_lungs"]["auroc_drop"] == pytest.approx(1.0)


def test_within_groups_scores_each_source_on_its_own_classes():
  rows = [{"source": s, "label": l, "p_n": p, "p_c": 1 - p}
          for s, l, p in (("a", "n", 0.9), ("a", "c", 0.2), ("a", "n", 0.6), ("b", "c", 0.3))]
  out = shortcuts.within_groups(rows, "source", ["n", "c"])
  assert list(out) == ["a"]  # b holds one class only
  assert out["a"]["classes"] == ["n", "c"] and out["a"]["macro_auroc"] == 1.0


def _audit(**parts):
  base = {"auroc": {"n": 0.9, "c": 0.9},
          "probes": {"lung_stand_in": 0, "source_baseline": None,
                     "label": {"full": {"auroc": {"n": 0.9, "c": 0.9}},
                               "no_lungs": {"auroc": {"n": 0.55, "c": 0.52}},
                               "border_only": {"auroc": {"n": 0.88, "c": 0.6}}}},
          "perturbations": [{"op": "none", "accuracy": 0.8, "n/auroc": 0.9, "c/auroc": 0.9},
                            {"op": "no_lungs", "flipped": 0.5, "n/auroc": 0.5, "c/auroc": 0.52},
                            {"op": "no_corners", "flipped": 0.4, "accuracy": 0.79,
                             "accuracy_drop": 0.01, "auroc_drop": 0.0}],
          "lung_masks": {"images": 10, "stand_in": 0}, "confounding": {}}
  base.update(parts)
  return base


def test_verdict_rule_on_constructed_audits():
  v = shortcuts.verdict(_audit())
  assert v["risk"] == "low"
  assert {e["evidence"] for e in v["evidence"]} == {"outside_lungs", "no_lungs", "corners"}
  # A border-trained model keeping 95% of the signal above chance: high.
  v = shortcuts.verdict(_audit(variants={"input_border": {"auroc": {"n": 0.88, "c": 0.7}}}))
  assert v["risk"] == "high" and "95% of the signal" in v["evidence"][0]["text"]
  # Erasing the corners: flips alone (a weak model's) are not evidence; lost accuracy is.
  for drop, risk in ((0.07, "moderate"), (0.12, "high")):
    a = _audit()
    a["perturbations"][2]["accuracy_drop"] = drop
    assert shortcuts.verdict(a)["risk"] == risk
  # Without lung masks for every image the probe falls back to the border (0.88 of 0.9).
  a = _audit(lung_masks={"images": 10, "stand_in": 4})
  a["probes"]["lung_stand_in"] = 4
  v = shortcuts.verdict(a)
  assert v["risk"] == "high"
  assert "left out of the verdict" in next(e["text"] for e in v["evidence"]
                                           if e["evidence"] == "no_lungs")
  notes = shortcuts.caveats(a)  # printed by the summary and report.html
  assert len(notes) == 2 and notes[0].startswith("4 of 10 test images have no lung mask")
  # Confounding counts only with a recognisable source and a significant association.
  conf = {"evaluated": {"source": {"cramers_v": 0.7, "p_value": 1e-9}}}
  baseline = {"field": "source", "values": ["a", "b"], "balanced_accuracy": 0.9}
  a = _audit(confounding=conf)
  a["probes"]["source_baseline"] = baseline
  assert shortcuts.verdict(a)["risk"] == "high"
  conf["evaluated"]["source"]["p_value"] = 0.2
  assert shortcuts.verdict(a)["risk"] == "low"
  # A model at chance keeps nothing: not assessable, low; no evidence: not assessed.
  a = _audit(auroc={"n": 0.4, "c": 0.5}, variants={"input_border": {"auroc": {"n": 0.9,
                                                                               "c": 0.9}}})
  assert "not assessable" in shortcuts.verdict(a)["evidence"][0]["text"]
  assert shortcuts.verdict({})["risk"] == "not assessed"


def _plan():
  labels = np.array([0, 1, 0, 1, 0, 1, 1, 0])
  stage = methods.Stage(
      name="fold0/stage_b", classes=("n", "c"), labels=labels,
      phases=[methods.Phase(np.array([0, 1, 2, 3, 6]), 1)], optimizer={}, param_rules=(),
      batch_size=1, eval_batch_size=1, select="best", init_seed=0, seed=0, augment=(),
      val=np.array([4, 7]))
  return methods.Plan(method="m", protocol="corrected", task="t", classes=("n", "c"),
                      labels=labels, stages=[stage],
                      evaluations=[methods.Evaluation(0, "fold0/stage_b", np.array([5]),
                                                      "corrected")])


def test_leave_out_trains_without_a_source_and_tests_on_it():
  meta = {"source": np.array(["a", "a", "b", "b", "a", "b", "b", "a"], object)}
  plan = methods.leave_out(_plan(), meta, "source", "b")
  s = plan.stages[0]
  np.testing.assert_array_equal(s.phases[0].train, [0, 1])
  np.testing.assert_array_equal(s.val, [4, 7])
  np.testing.assert_array_equal(plan.evaluations[0].test, [2, 3, 5, 6])  # all of b
  assert "leave-one-source-out" in plan.notes[-1]
  with pytest.raises(ValueError, match="no image has source 'z'"):
    methods.leave_out(_plan(), meta, "source", "z")
  # Leaving out the only source leaves the stage nothing to train on.
  with pytest.raises(ValueError, match="stage fold0/stage_b has no training or validation "
                                       "image left without source a"):
    methods.leave_out(_plan(), {"source": np.array(["a"] * 8, object)}, "source", "a")


def test_retrain_names_the_variants():
  from configs import detl
  c = detl.get_config("runlocal")
  c.audit.retrain = "border, loso"
  meta = {"source": np.array(["s"] * 8, object),
          "site": np.array(["x", "x", "y", "y", "x", "y", "z", "z"], object)}
  subs = shortcuts.audit_variants(c, meta, _plan())
  # One source: sites instead; z holds class 1 and class 0 (rows 6, 7), as x and y do.
  assert list(subs) == ["input_border", "loso_site_x", "loso_site_y", "loso_site_z"]
  assert subs["input_border"].audit.input == "border"
  assert subs["loso_site_y"].audit.leave_out == "site:y"
  assert not subs["loso_site_y"].eval.gradcam.enabled and subs["loso_site_y"].audit.retrain == ""
  c.audit.retrain = "border,blur"
  with pytest.raises(ValueError, match=r"config.audit.retrain: unknown \['blur'\]"):
    checks.config_fields(c)


# --- tiny runs whose truth we know --------------------------------------------------------------


def _tiny(tfds_dir, confounding):
  """runlocal, init=scratch, 40 patients per class at 64 px, every Data-B image (about 330
  evaluated). Measured at these sizes: confounded (0.8) label x site V 0.75, site baseline
  balanced accuracy 0.98, verdict high from both the confounding and the outside-the-lungs
  probe; clean V 0.23 and verdict moderate (the probe outside the lungs keeps about half
  the signal of 64 px phantoms). Smaller data made the clean V and probe noisy."""
  from configs import detl
  c = detl.get_config("runlocal")
  c.data.tfds_dir = tfds_dir
  c.data.synthetic.patients = (40, 40, 40, 40)
  c.data.synthetic.site_confounding = confounding
  c.data_b.images_per_class = {"normal": 0, "pneumonia": 0, "other_disease": 0, "covid": 0}
  c.stage_a.enabled = False  # init=scratch: a single stage per fold
  c.stage_b.optimizer = c.stage_a.optimizer.to_dict()
  c.stage_b.param_rules = ((".*", "train"),)
  c.eval.gradcam.enabled = False
  c.eval.bootstrap = 0
  return c


@pytest.fixture(scope="module")
def confounded(tfds_dir, tmp_path_factory):
  c = _tiny(tfds_dir, 0.8)
  c.audit.retrain = "border"
  workdir = str(tmp_path_factory.mktemp("confounded"))
  return c, workdir, experiment.run(c, workdir)


def test_a_confounded_tiny_run_gets_a_high_verdict(confounded):
  c, workdir, results = confounded
  a = results["shortcuts"]
  assert a["verdict"]["risk"] == "high"
  evidence = {e["evidence"]: e for e in a["verdict"]["evidence"]}
  assert evidence["confounding"]["level"] == "high"
  assert a["confounding"]["evaluated"]["site"]["cramers_v"] > 0.6
  assert a["probes"]["source_baseline"]["field"] == "site"
  assert {r["op"] for r in a["perturbations"]} == {"none", *regions.OPS}
  # The border variant trained in its own run directory on border-only images.
  variant = a["variants"]["input_border"]
  assert variant["workdir"] == os.path.join(workdir, "audit", "input_border")
  assert "border" in evidence
  saved = files.read_json(os.path.join(variant["workdir"], rundir.FINGERPRINT))
  assert saved["split_config"]["audit.input"] == "border"
  summary = open(os.path.join(workdir, "results_summary.txt")).read()
  assert summary.startswith("shortcut risk: HIGH")
  assert "input_border" in summary


def test_an_audit_input_cannot_change_under_a_run(confounded):
  c, workdir, _ = confounded
  cohort, plan = experiment.prepare(c)
  border = shortcuts.audit_variants(c, cohort.meta, plan)["input_border"]
  with border.unlocked():
    border.audit.input = "lungs"
  with pytest.raises(rundir.ChangedError, match="audit.input"):
    experiment.run(border, os.path.join(workdir, "audit", "input_border"))


def test_a_clean_tiny_run_does_not_get_a_high_verdict(tfds_dir, tmp_path):
  results = experiment.run(_tiny(tfds_dir, 0.0), str(tmp_path))
  a = results["shortcuts"]
  assert a["verdict"]["risk"] != "high", a["verdict"]
  assert a["confounding"]["evaluated"]["site"]["cramers_v"] < 0.3


def test_a_masked_input_model_is_refused_by_predict(confounded):
  from xrayjax import predict
  _, workdir, results = confounded
  with pytest.raises(predict.InputError, match="trained its models on border inputs"):
    predict.predict(results["shortcuts"]["variants"]["input_border"]["workdir"], [workdir])


def test_leave_one_site_out_trains_without_it_and_tests_only_on_it(tiny_config, tmp_path):
  c = tiny_config  # lean: no perturbations or probes (the confounded run has them)
  c.audit.leave_out = "site:site2"
  results = experiment.run(c, str(tmp_path))
  rows = list(csv.DictReader(open(tmp_path / "results_predictions.csv")))
  assert rows and {r["site"] for r in rows} == {"site2"}
  cohort, plan = experiment.prepare(c)
  trained = np.concatenate([np.concatenate([p.train for p in s.phases] + [s.val])
                            for s in plan.stages])
  assert not np.any(cohort.meta["site"][trained] == "site2")
  assert any(n.startswith("leave-one-site-out") for n in results["notes"])


@pytest.mark.parametrize("field,value,message", [
    ("input", "blah", r"config.audit.input='blah'; valid: \['full', 'border'"),
    ("leave_out", "ieee8023", "expected FIELD:VALUE with FIELD source or site"),
    ("leave_out", "view:AP", "expected FIELD:VALUE with FIELD source or site"),
    ("centre", 1.2, r"config.audit.centre=1.2 must be a fraction of the image side"),
])
def test_bad_audit_config_is_named(field, value, message):
  from configs import detl
  c = detl.get_config("runlocal")
  c.audit[field] = value
  with pytest.raises(ValueError, match=message):
    checks.config_fields(c)


def test_pixel_probe_is_the_same_whatever_the_blas_thread_count():
  """The probe fits with one BLAS thread whatever the caller allows (threaded sums moved its
  round-off, and ran slower)."""
  import threadpoolctl
  rng = np.random.default_rng(0)
  n = 1584  # the concat demo's test images: OpenBLAS keeps much smaller products on one thread
  labels = rng.integers(0, 3, n)
  x = (rng.random((n, 32, 32)) * 0.3 + labels[:, None, None] * 0.05).astype(np.float32)
  groups = np.arange(n) // 2
  out = []
  for threads in (1, 2):
    with threadpoolctl.threadpool_limits(threads, user_api="blas"):
      out.append(shortcuts.probe(x, labels, groups, seed=0))
  np.testing.assert_array_equal(out[0], out[1])

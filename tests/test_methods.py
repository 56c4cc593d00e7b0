"""Methods as plans (no JAX): paper 2's folds and phases under both protocols, the authors'
lists, the samplers, and paper 2's Tables 3 and 4."""

import csv
import os

import numpy as np
import pytest

from configs import concat as concat_config
from xrayjax import methods
from xrayjax.evaluate import metrics
from xrayjax.methods import concat


def _meta(normal=60, pneumonia=50, covid=20, per_patient=2):
  """A 3-class cohort table: `per_patient` images per patient."""
  rows = []
  for label, patients in (("normal", normal), ("pneumonia", pneumonia), ("covid", covid)):
    for p in range(patients):
      for k in range(per_patient):
        rows.append((f"{label}-{p}-{k}", label, f"{label}-{p}"))
  image_id, label, patient = (np.array(c, dtype=object) for c in zip(*rows))
  n = len(rows)
  return {"image_id": image_id, "label": label, "patient_id": patient, "group": patient,
          "source": np.full(n, "manifest", dtype=object), "role": np.full(n, "", dtype=object)}


def _config(arg="runlocal", **phases):
  """The tiny config with 3 phases of 2 epochs; from random weights unless `arg` says."""
  c = concat_config.get_config(arg + ("" if "init=" in arg else ",init=random"))
  c.folds = 3
  c.phases.update(count=3, epochs=2, fresh={"normal": 8, "pneumonia": 6},
                  shared={"covid": -1, "pneumonia": 4}, **phases)
  return c


def _sets(rows, meta, label):
  return set(rows[meta["label"][rows] == label])


def test_corrected_plan_partitions_patients_and_draws_disjoint_phases():
  meta = _meta()
  c = _config()
  plan = concat.plan(meta, c)
  plan.check()
  tests = [e.test for e in plan.evaluations]
  assert sorted(np.concatenate(tests).tolist()) == list(range(len(meta["image_id"])))
  for e in plan.evaluations:
    stage = plan.stage(e.stage)
    assert stage.select == "best" and len(stage.phases) == 3
    assert all(p.epochs == 2 for p in stage.phases)
    train = np.concatenate([p.train for p in stage.phases])
    patients = lambda rows: set(meta["patient_id"][rows])  # noqa: E731
    assert not patients(e.test) & (patients(train) | patients(stage.val))
    assert not patients(stage.val) & patients(train)
    covid = [_sets(p.train, meta, "covid") for p in stage.phases]
    assert covid[0] == covid[1] == covid[2] and len(covid[0]) > 0  # every covid image, each time
    normal = [_sets(p.train, meta, "normal") for p in stage.phases]
    assert all(len(s) == 8 for s in normal)
    assert not (normal[0] & normal[1] or normal[1] & normal[2] or normal[0] & normal[2])
    pneu = [_sets(p.train, meta, "pneumonia") for p in stage.phases]
    shared = pneu[0] & pneu[1] & pneu[2]
    assert len(shared) == 4 and all(len(s) == 10 for s in pneu)  # 4 shared + 6 fresh
    fresh = [s - shared for s in pneu]
    assert not (fresh[0] & fresh[1] or fresh[1] & fresh[2])


def test_pretrain_stage_starts_every_fold_from_other_patients_and_other_findings():
  from xrayjax.data import tasks
  meta = _meta()
  findings = tasks.OTHER_FINDINGS
  extra = [(f"other-{p}-{k}", f"other-{p}", findings[p % len(findings)])
           for p in range(30) for k in range(2)]
  n, m = len(meta["image_id"]), len(extra)
  hot = np.zeros((n + m, len(tasks.FINDINGS)), bool)
  for i, (_, _, f) in enumerate(extra):
    hot[n + i, tasks.FINDINGS.index(f)] = True
  hot[:n, tasks.FINDINGS.index("COVID-19")] = meta["label"] == "covid"
  hot[:n, tasks.FINDINGS.index("Pneumonia")] = meta["label"] == "pneumonia"
  meta = {"image_id": np.concatenate([meta["image_id"], [e[0] for e in extra]]),
          "label": np.concatenate([meta["label"], ["other_disease"] * m]),
          "patient_id": np.concatenate([meta["patient_id"], [e[1] for e in extra]]),
          "source": np.full(n + m, "synthetic_cxr", dtype=object),
          "role": np.full(n + m, "", dtype=object), "findings": hot}
  meta["group"] = meta["patient_id"].copy()
  meta["group"][n:n + 2] = meta["patient_id"][0]  # a duplicate joins other-0 to a fold patient
  plan = concat.plan(meta, _config("runlocal,init=pretrain"))
  plan.check()
  pre = plan.stages[0]
  assert pre.name == "pretrain" and pre.classes == findings and pre.select == "best"
  rows = pre.rows()
  assert set(meta["label"][rows]) == {"other_disease"}
  assert not {n, n + 1} & set(rows.tolist())  # the duplicate's patient is left out
  assert not set(meta["patient_id"][pre.phases[0].train]) & set(meta["patient_id"][pre.val])
  for s in plan.stages[1:]:
    assert (s.init, s.init_from, s.keras_init) == ("stage", "pretrain", False)
  assert any("stand-in for ImageNet" in n for n in plan.notes)
  # Keras files replace the stand-in: no pretraining stage, the files start every fold.
  c = _config("runlocal,init=pretrain")
  c.model.init_from = "x.h5,r.h5"
  keras = concat.plan(meta, c)
  assert len(keras.stages) == len(keras.evaluations) and all(
      s.init == "random" and s.keras_init for s in keras.stages)
  # Without films of the pretraining task the plan says what to do.
  plain = _meta()
  with pytest.raises(ValueError, match="other_disease patients"):
    concat.plan(plain, _config("runlocal,init=pretrain"))
  with pytest.raises(ValueError, match="init=random with config.model.init_from"):
    concat.check(_with_files())


def _with_files():
  c = _config()
  c.model.init_from = "x.h5"
  return c


def test_sampler_all_trains_one_phase_on_every_training_image_for_the_same_images_shown():
  meta = _meta()
  phased = concat.plan(meta, _config())
  every = concat.plan(meta, _config(sampler="all"))
  for a, b in zip(phased.stages, every.stages):
    assert len(b.phases) == 1
    train = np.setdiff1d(np.arange(len(meta["image_id"])), np.concatenate(
        [phased.evaluations[int(a.name[4])].test, a.val]))
    np.testing.assert_array_equal(b.phases[0].train, train)
    shown = sum(len(p.train) * p.epochs for p in a.phases)
    assert abs(len(b.phases[0].train) * b.phases[0].epochs - shown) <= len(train) / 2
  assert any("sampler all" in n for n in every.notes)


def test_paper_plan_is_built_as_the_authors_built_theirs():
  meta = _meta()
  plan = concat.plan(meta, _config("runlocal,protocol=paper"))
  covid = np.flatnonzero(meta["label"] == "covid")
  held = []
  for e in plan.evaluations:
    stage = plan.stage(e.stage)
    assert stage.select == "last" and not len(stage.val)
    used = stage.rows()
    # Every image no phase used is tested; the fold's covid training images are all shared.
    np.testing.assert_array_equal(e.test, np.setdiff1d(np.arange(len(meta["image_id"])), used))
    held.append(np.intersect1d(e.test, covid))
  # The covid images are split into folds image by image (a partition) ...
  assert sorted(np.concatenate(held).tolist()) == covid.tolist()
  # ... and images are drawn one at a time, so a patient can train and test the same model,
  # and one fold's test images train another fold's model: the folds overlap.
  a, b = plan.evaluations[0], plan.evaluations[1]
  assert np.intersect1d(a.test, plan.stage(b.stage).rows()).size > 0
  assert "last weights" in " ".join(plan.notes)


def test_paper_plan_from_the_authors_lists(tmp_path):
  meta = _meta()
  ids = meta["image_id"]
  rng = np.random.default_rng(0)
  all_rows = [{"filename": f"{i}.png", "class": l} for i, l in zip(ids, meta["label"])]

  def write(path, rows):
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=["filename", "class"])
      w.writeheader()
      w.writerows(rows)

  write(tmp_path / "All.csv", all_rows + [{"filename": "not-here.png", "class": "normal"}])
  listed = []
  for k in (1, 2):
    os.makedirs(tmp_path / f"fold{k}")
    phases = []
    for j in (1, 2):
      chosen = sorted(rng.choice(len(ids), 30, replace=False).tolist())
      write(tmp_path / f"fold{k}" / f"train{j}.csv", [all_rows[i] for i in chosen])
      phases.append(chosen)
    listed.append(phases)
  c = _config("runlocal,protocol=paper")
  c.folds = 2
  c.data.mr7495_dir = str(tmp_path)
  plan = concat.plan(meta, c)
  for e, phases in zip(plan.evaluations, listed):
    stage = plan.stage(e.stage)
    assert [p.train.tolist() for p in stage.phases] == phases
    used = set(phases[0]) | set(phases[1])
    assert e.test.tolist() == [i for i in range(len(ids)) if i not in used]
  assert "authors' lists (260 of 261 listed images found)" in plan.notes[0]
  c.data.mr7495_dir = str(tmp_path / "fold1")
  with pytest.raises(FileNotFoundError, match="does not look like the mr7495 split files"):
    concat.plan(meta, c)


def test_bad_concat_configs_are_refused_before_anything_runs():
  c = _config()
  c.phases.sampler = "random"
  with pytest.raises(ValueError, match="phases.sampler"):
    concat.check(c)
  c = _config()
  c.phases.fresh = {"normal": 8, "pneumonias": 6}
  with pytest.raises(ValueError, match=r"phases.fresh names 'pneumonias'.*normal"):
    concat.check(c)
  c = _config("runlocal,protocol=paper")
  c.phases.shared = {"pneumonia": 4}
  with pytest.raises(ValueError, match="shared = -1"):
    concat.check(c)
  meta = _meta()
  meta["label"][meta["label"] == "covid"] = "other_disease"
  with pytest.raises(ValueError, match="class 'covid' of task 'three_class' has no images"):
    concat.plan(meta, _config())
  with pytest.raises(ValueError, match="unknown method"):
    methods.get("chexnet")


def test_a_plan_refuses_a_stage_started_from_one_not_trained_before_it():
  one = [methods.Phase(np.arange(1), 1)]
  s = methods.Stage(name="b", classes=("x",), labels=np.zeros(1), phases=one, optimizer={},
                    param_rules=(), batch_size=1, eval_batch_size=1, select="last", init_seed=0,
                    seed=0, augment=(), init="stage", init_from="a")
  with pytest.raises(ValueError, match="not planned before it"):
    methods.Plan(method="m", protocol="p", task="t", classes=("x",), labels=np.zeros(1),
                 stages=[s], evaluations=[]).check()
  with pytest.raises(ValueError, match="needs a validation split"):
    methods.Stage(name="c", classes=("x",), labels=np.zeros(1), phases=one, optimizer={},
                  param_rules=(), batch_size=1, eval_batch_size=1, select="best", init_seed=0,
                  seed=0, augment=())
  with pytest.raises(ValueError, match="at least one epoch"):
    methods.Stage(name="d", classes=("x",), labels=np.zeros(1),
                  phases=[methods.Phase(np.arange(1), 0)], optimizer={}, param_rules=(),
                  batch_size=1, eval_batch_size=1, select="last", init_seed=0, seed=0,
                  augment=())


def test_tables_3_and_4_against_a_hand_computed_confusion_matrix():
  classes = ("normal", "pneumonia", "covid")
  # rows = truth, columns = prediction
  cm = np.array([[50, 8, 2], [5, 30, 5], [1, 2, 7]])
  labels = np.repeat(np.arange(3), cm.sum(1))
  pred = np.concatenate([np.repeat(np.arange(3), row) for row in cm])
  probs = np.eye(3)[pred] * 0.9 + 0.1 / 3
  m = metrics.classification(labels, probs, classes)
  assert concat.detection_counts(m["confusion"], classes) == {
      "normal": {"correct": 50, "not_detected": 10, "wrongly_detected": 6},
      "pneumonia": {"correct": 30, "not_detected": 10, "wrongly_detected": 10},
      "covid": {"correct": 7, "not_detected": 3, "wrongly_detected": 7}}
  covid = m["per_class"]["covid"]
  n = cm.sum()
  assert covid["sensitivity"] == pytest.approx(7 / 10)  # recall
  assert covid["specificity"] == pytest.approx((n - 10 - 7) / (n - 10))
  assert covid["ppv"] == pytest.approx(7 / 14)  # precision
  assert covid["accuracy"] == pytest.approx((n - 3 - 7) / n)  # one vs rest
  assert m["accuracy"] == pytest.approx(87 / n)
  results = {"classes": list(classes), "fold_metrics": [m, m],
             "across_folds": metrics.across_folds([m, m])}
  t3, t4 = concat.table3(results), concat.table4(results)
  assert t3[-1]["fold"] == "sum" and t3[-1]["covid"] == {"correct": 14, "not_detected": 6,
                                                         "wrongly_detected": 14}
  assert t4[-1]["fold"] == "mean" and t4[-1]["covid/precision"] == pytest.approx(0.5)
  assert t4[0]["pneumonia/recall"] == pytest.approx(0.75)


def test_transfer_swaps_the_head_and_moves_everything_else():
  """DETL's stage A -> stage B initialisation: every layer but the head (params and
  BatchNorm statistics) from the earlier stage; the head from the new model's."""
  from xrayjax import train
  source = {"params": {"conv1": {"kernel": np.ones((3, 3, 1, 4))}, "bn": {"scale": np.ones(4)},
                       "head": {"kernel": np.ones((4, 2))}},
            "batch_stats": {"bn": {"mean": np.full(4, 7.0)}}}
  head = {"params": {"head": {"kernel": np.full((4, 4), 5.0)}}, "batch_stats": {}}
  out = train.transfer(source, head, "head")
  assert {col: sorted(layers) for col, layers in out.items()} == {
      "params": ["bn", "conv1", "head"], "batch_stats": ["bn"]}
  np.testing.assert_array_equal(out["params"]["conv1"]["kernel"], 1)
  np.testing.assert_array_equal(out["params"]["bn"]["scale"], 1)
  np.testing.assert_array_equal(out["batch_stats"]["bn"]["mean"], 7)
  assert out["params"]["head"]["kernel"].shape == (4, 4)
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], 5)

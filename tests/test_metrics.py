"""Metrics against hand-computed cases and scikit-learn; bootstrap interval coverage."""

import numpy as np
import pytest
from sklearn import metrics as skm

from xrayjax.evaluate import metrics

CLASSES = ("normal", "pneumonia", "covid")


def test_hand_computed_three_class_case():
  labels = np.array([0, 0, 0, 1, 1, 2])
  pred = np.array([0, 0, 1, 1, 2, 2])
  probs = np.full((6, 3), 0.1)
  probs[np.arange(6), pred] = 0.8
  m = metrics.classification(labels, probs, CLASSES, prevalences=(0.01,))
  assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
  assert m["accuracy"] == pytest.approx(4 / 6)
  pn = m["per_class"]["pneumonia"]  # tp 1, fn 1, fp 1, tn 3
  assert (pn["sensitivity"], pn["specificity"], pn["ppv"], pn["npv"], pn["f1"]) == \
      pytest.approx((1 / 2, 3 / 4, 1 / 2, 3 / 4, 1 / 2))
  # At 1% prevalence: PPV = .5 * .01 / (.5 * .01 + .25 * .99).
  assert pn["ppv@0.01"] == pytest.approx(0.005 / (0.005 + 0.2475))
  assert pn["npv@0.01"] == pytest.approx(0.75 * 0.99 / (0.75 * 0.99 + 0.5 * 0.01))
  assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
  assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
  for c, name in enumerate(CLASSES):
    assert m["per_class"][name]["auroc"] == pytest.approx(skm.roc_auc_score(labels == c,
                                                                            probs[:, c]))
    assert m["per_class"][name]["auprc"] == pytest.approx(
        skm.average_precision_score(labels == c, probs[:, c]))
  # Every image has confidence 0.8 (one bin), 4/6 correct: ECE = |4/6 - 0.8|.
  assert m["ece"] == pytest.approx(0.8 - 4 / 6)
  assert m["reliability"] == [{"bin": [12 / 15, 13 / 15], "confidence": pytest.approx(0.8),
                               "accuracy": pytest.approx(4 / 6), "count": 6}]


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_average_precision_equal_sklearns(ties):
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(2, 60))
    positives = rng.random(n) < rng.uniform(0.1, 0.9)
    if positives.all() or not positives.any():
      continue
    # Tied scores (a few distinct values) exercise the thresholds' handling of ties.
    scores = rng.integers(0, 4, n) / 3 if ties else rng.random(n)
    assert metrics.auroc_of(positives, scores) == pytest.approx(
        skm.roc_auc_score(positives, scores), abs=1e-12)
    assert metrics.average_precision(positives, scores) == pytest.approx(
        skm.average_precision_score(positives, scores), abs=1e-12)
  labels, probs = rng.integers(0, 3, 40), rng.dirichlet(np.ones(3), 40)
  assert metrics.classification(labels, probs, "abc")["confusion"] == skm.confusion_matrix(
      labels, probs.argmax(-1), labels=[0, 1, 2]).tolist()


def test_calibration_error_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(3), 500)
  labels = rng.integers(3, size=500)
  conf, correct = probs.max(-1), probs.argmax(-1) == labels
  edges = np.linspace(0, 1, 11)
  ece = sum(np.mean((conf >= a) & (conf < b)) * abs(correct[(conf >= a) & (conf < b)].mean()
                                                    - conf[(conf >= a) & (conf < b)].mean())
            for a, b in zip(edges[:-1], edges[1:]) if np.any((conf >= a) & (conf < b)))
  m = metrics.classification(labels, probs, CLASSES, bins=10)
  assert m["ece"] == pytest.approx(ece)
  assert sum(b["count"] for b in m["reliability"]) == 500


def _clustered_sample(rng, n_patients=80):
  """Patients with 1-4 images; whether the model is right depends strongly on the patient."""
  q = rng.beta(2, 1, n_patients)  # the patient's chance of a correct call; mean 2/3
  sizes = rng.integers(1, 5, n_patients)
  groups = np.repeat(np.arange(n_patients), sizes)
  correct = rng.random(len(groups)) < q[groups]
  return correct.astype(float), groups


def test_patient_clustered_intervals_cover_the_truth_at_about_the_nominal_rate():
  rng = np.random.default_rng(0)
  truth = 2 / 3  # images per patient do not depend on q, so image accuracy's mean is E[q]
  hits = naive_hits = 0
  trials = 150
  for t in range(trials):
    correct, groups = _clustered_sample(rng)
    stat = lambda idx: {"accuracy": float(correct[idx].mean())}  # noqa: E731
    ci = metrics.cluster_bootstrap(stat, groups, n_boot=300, seed=t)["accuracy"]
    hits += ci["low"] <= truth <= ci["high"]
    naive = metrics.cluster_bootstrap(stat, np.arange(len(groups)), n_boot=300, seed=t)
    naive_hits += naive["accuracy"]["low"] <= truth <= naive["accuracy"]["high"]
  assert 0.88 <= hits / trials <= 0.99
  assert naive_hits < hits  # resampling images ignores the clustering: too narrow


def test_bootstrap_intervals_bracket_the_point_estimates():
  rng = np.random.default_rng(1)
  labels = rng.integers(3, size=120)
  probs = rng.dirichlet(np.ones(3), 120)
  probs[np.arange(120), labels] += 0.5
  probs /= probs.sum(-1, keepdims=True)
  patients = np.repeat(np.arange(60), 2)
  ci = metrics.bootstrap_intervals(labels, probs, patients, CLASSES, n_boot=100, seed=0,
                                   prevalences=(0.05,))
  point = metrics.flat(metrics.classification(labels, probs, CLASSES, prevalences=(0.05,)))
  for key in ("accuracy", "macro_auroc", "covid/auprc", "covid/ppv@0.05", "ece"):
    assert ci[key]["low"] <= point[key] <= ci[key]["high"], key


def test_per_group_accuracy_confusion_and_sensitivity():
  rows = [{"source": s, "label": l, "prediction": p} for s, l, p in (
      ("a", "normal", "normal"), ("a", "covid", "normal"), ("a", "covid", "covid"),
      ("b", "pneumonia", "pneumonia"), ("b", "normal", "pneumonia"))]
  out = metrics.per_group(rows, "source", CLASSES)
  assert list(out) == ["a", "b"]
  assert out["a"]["images"] == 3 and out["a"]["accuracy"] == pytest.approx(2 / 3)
  assert out["a"]["confusion"] == [[1, 0, 0], [0, 0, 0], [1, 0, 1]]
  assert out["a"]["sensitivity"] == {"normal": 1.0, "covid": 0.5}  # pneumonia absent in a
  assert out["b"]["sensitivity"] == {"normal": 0.0, "pneumonia": 1.0}


def test_across_folds_mean_sd_and_summed_confusion():
  labels = np.array([0, 1, 2, 2])
  folds = []
  for pred in ([0, 1, 2, 2], [0, 0, 2, 1]):  # accuracy 1.0 and 0.5
    probs = np.full((4, 3), 0.1)
    probs[np.arange(4), pred] = 0.8
    folds.append(metrics.classification(labels, probs, CLASSES))
  out = metrics.across_folds(folds)
  assert out["folds"] == 2
  acc = out["metrics"]["accuracy"]
  assert acc["mean"] == pytest.approx(0.75)
  assert acc["sd"] == pytest.approx(np.std([1.0, 0.5], ddof=1))  # sample sd: 0.354
  assert acc["folds_defined"] == 2
  # Fold 2 predicts pneumonia once, wrongly: PPV 1 and 0, defined in both folds.
  assert out["metrics"]["pneumonia/ppv"]["mean"] == pytest.approx(0.5)
  assert out["confusion_summed"] == [[2, 0, 0], [1, 1, 0], [0, 1, 3]]


def test_across_folds_averages_a_metric_over_the_folds_that_define_it():
  """A class never predicted in a fold has no PPV there: its mean and sd are over the other
  folds, and folds_defined says how many; accuracy still counts every fold."""
  labels = np.array([0, 1, 2, 2])
  folds = []
  for pred in ([0, 1, 2, 2], [0, 0, 2, 1], [0, 0, 2, 2]):  # accuracy 1.0, 0.5, 0.75
    probs = np.full((4, 3), 0.1)
    probs[np.arange(4), pred] = 0.8
    folds.append(metrics.classification(labels, probs, CLASSES))
  assert np.isnan(metrics.flat(folds[2])["pneumonia/ppv"])  # the third never says pneumonia
  out = metrics.across_folds(folds)["metrics"]
  assert out["accuracy"]["mean"] == pytest.approx(0.75) and out["accuracy"]["folds_defined"] == 3
  assert out["accuracy"]["sd"] == pytest.approx(0.25)  # sample sd of 1.0, 0.5, 0.75
  ppv = out["pneumonia/ppv"]
  assert ppv["folds_defined"] == 2
  assert ppv["mean"] == pytest.approx(0.5) and ppv["sd"] == pytest.approx(np.sqrt(0.5))
  # Defined in one fold only: that fold's value, and no spread.
  only = metrics.across_folds(folds[2:] + folds[:1])["metrics"]["pneumonia/ppv"]
  assert (only["mean"], only["sd"], only["folds_defined"]) == (1.0, 0.0, 1)

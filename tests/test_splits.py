import numpy as np
import pytest

from xrayjax.data import splits


def _random_structure(rng, n_patients=60, classes=4):
  """Patients with 1-4 images, mostly one class, some with images under two labels."""
  labels, patients = [], []
  for p in range(n_patients):
    c = rng.integers(classes)
    for _ in range(rng.integers(1, 5)):
      labels.append(c if rng.random() > 0.1 else rng.integers(classes))
      patients.append(f"p{p}")
  return np.array(labels), np.array(patients)


@pytest.mark.parametrize("seed", range(8))
def test_grouped_folds_partition_images_and_patients(seed):
  rng = np.random.default_rng(seed)
  labels, patients = _random_structure(rng)
  folds = splits.kfold(labels, patients, 5, seed=seed)
  assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
  splits.check_disjoint_patients({f"fold{i}": f for i, f in enumerate(folds)}, patients)
  assert all(len(f) for f in folds)
  again = splits.kfold(labels, patients, 5, seed=seed)
  assert all(np.array_equal(a, b) for a, b in zip(folds, again))
  train = np.setdiff1d(np.arange(len(labels)), folds[0])
  rest, val = splits.carve(train, labels, patients, 0.2, seed=seed)
  splits.check_disjoint_patients({"train": rest, "val": val, "test": folds[0]}, patients)
  assert len(np.intersect1d(rest, val)) == 0 and len(rest) + len(val) == len(train)
  assert 0.05 < len(val) / len(train) < 0.45


def test_image_level_folds_leak_patients():
  rng = np.random.default_rng(0)
  labels, patients = _random_structure(rng, 80)
  folds = splits.kfold(labels, patients, 5, seed=0, grouped=False)
  splits.check_folds(folds, len(labels))
  with pytest.raises(AssertionError, match="leaks patients"):
    splits.check_disjoint_patients({f"f{i}": f for i, f in enumerate(folds)}, patients)


def test_checks_fail_loudly():
  with pytest.raises(AssertionError, match="not a partition"):
    splits.check_folds([np.array([0, 1]), np.array([1, 2])], 3)
  with pytest.raises(AssertionError, match="not a partition"):
    splits.check_folds([np.array([0])], 2)
  with pytest.raises(ValueError, match="cannot make 5 folds"):
    splits.kfold(np.zeros(4, int), np.array(["a", "b", "c", "d"]), 5, seed=0)


def test_sample_patients_takes_whole_patients():
  patients = np.array(["a", "a", "b", "c", "c", "c", "d"])
  rng = np.random.default_rng(0)
  idx = splits.sample_patients(np.arange(7), patients, 4, rng)
  assert len(idx) <= 4
  for p in set(patients[idx]):
    assert set(np.flatnonzero(patients == p)) <= set(idx)
  assert len(splits.sample_patients(np.arange(7), patients, 0, rng)) == 7

import numpy as np
import pytest

import shared_data
from xrayjax.data import splits
from xrayjax.methods import concat_splits


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


# --- duplicates ---------------------------------------------------------------------------------


def _hashes(n, rng):
  return np.array([rng.bytes(32).hex() for _ in range(n)], dtype=object)


def _flip(h, bits):
  raw = bytearray(bytes.fromhex(h))
  for b in bits:
    raw[b // 8] ^= 1 << (b % 8)
  return raw.hex()


def test_near_pairs_is_an_exact_search():
  rng = np.random.default_rng(0)
  hashes = _hashes(300, rng)
  hashes[7] = _flip(hashes[3], range(10))  # 10 bits apart
  hashes[200] = _flip(hashes[3], range(30))  # 30 bits apart
  words = np.array([np.unpackbits(np.frombuffer(bytes.fromhex(h), np.uint8)) for h in hashes])
  dist = (words[:, None] != words[None]).sum(-1)
  for d in (0, 10, 24, 30, 100):
    i, j = splits.near_pairs(hashes, d, rows=64, cols=128)  # small: many blocks, ragged ends
    want = {(a, b) for a, b in zip(*np.nonzero(dist <= d)) if a < b}
    assert set(zip(i.tolist(), j.tolist())) == want


def test_deduplicate_drops_copies_and_merges_patients_joined_by_a_duplicate():
  rng = np.random.default_rng(1)
  n = 8
  meta = {"image_id": np.array([f"i{k}" for k in range(n)], object),
          "source": np.array(["a"] * 4 + ["b"] * 4, object),
          "patient_id": np.array(["p0", "p1", "p2", "p3", "q0", "q1", "q2", "q2"], object),
          "label": np.array(["normal"] * 5 + ["covid", "normal", "normal"], object),
          "file_sha1": np.array([f"s{k}" for k in range(n)], object),
          "phash": _hashes(n, rng)}
  meta["file_sha1"][4] = meta["file_sha1"][0]  # an exact copy, same label: one is kept
  meta["file_sha1"][5] = meta["file_sha1"][1]  # an exact copy with another label: both go
  meta["phash"][6] = _flip(meta["phash"][2], range(5))  # the same picture, re-encoded
  out = splits.deduplicate(meta, max_distance=8)
  assert out["keep"].tolist() == [True, False, True, True, False, False, True, True]
  g = out["group"]
  assert g[2] == g[6] == g[7]  # p2 and q2 (both of q2's images) are one split group
  assert len({g[0], g[2], g[3]}) == 3
  r = out["report"]
  assert r["summary"] == {"exact_sets": 2, "perceptual_pairs": 1, "dropped": 3,
                          "merged_patient_groups": 3}
  assert ["p2", "q2"] in r["merged_patients"]
  reasons = {d["image"]: d["reason"] for d in r["dropped"]}
  assert reasons["b:i4"] == "exact copy of a:i0"
  assert reasons["a:i1"] == reasons["b:i5"] == "conflicting labels on exact copies"


# --- phases -----------------------------------------------------------------------------------


def test_phases_share_the_minority_and_draw_fresh_disjoint_majorities():
  labels = np.array([0] * 900 + [1] * 700 + [2] * 60)
  patients = np.array([f"p{k // 2}" for k in range(len(labels))], object)  # 2 images each
  train = np.arange(len(labels))
  ph = concat_splits.phases(train, labels, patients, ("normal", "pneumonia", "covid"), 3,
                     fresh={"normal": 250, "pneumonia": 200}, shared={"pneumonia": 34,
                                                                      "covid": -1}, seed=0)
  assert [np.bincount(labels[p]).tolist() for p in ph] == [[250, 234, 60]] * 3
  sets = [set(p.tolist()) for p in ph]
  common = sets[0] & sets[1] & sets[2]
  assert np.bincount(labels[list(common)], minlength=3).tolist() == [0, 34, 60]
  for a in range(3):
    for b in range(a + 1, 3):
      assert sets[a] & sets[b] == common  # fresh subsets are disjoint
  for p in ph:  # whole patients
    chosen = set(patients[p])
    assert all(set(np.flatnonzero(np.isin(patients, [q]))) <= set(p.tolist()) for q in chosen)
  with pytest.raises(ValueError, match="class 'normal' has 900 training images.*too few for "
                                       "4 phases of 250"):
    concat_splits.phases(train, labels, patients, ("normal", "pneumonia", "covid"), 4,
                  fresh={"normal": 250}, shared={}, seed=0)


MR7495 = shared_data.path("mr7495_splits")


@shared_data.needs(MR7495)
def test_the_authors_split_files_reproduce_their_phase_structure():
  lists = concat_splits.read_mr7495(MR7495)
  names = sorted(lists["all"])
  # image ids as the builders store them: RSNA patientIds and ieee8023 file names.
  meta = {"image_id": np.array([n[:-4] if len(n) == 40 else n for n in names], object)}
  plan = concat_splits.mr7495_plan(meta, MR7495)
  assert (plan["listed"], plan["found"], plan["missing"]) == (15_085, 15_085, 0)
  assert plan["classes"] == {"normal": 8_851, "pneumonia": 6_054, "COVID-19": 180}
  cls = np.array([lists["all"][n] for n in names])
  for fold in plan["folds"]:
    assert len(fold["phases"]) == 8
    for ph in fold["phases"]:
      counts = dict(zip(*np.unique(cls[ph], return_counts=True)))
      assert counts["normal"] == 250 and counts["pneumonia"] == 234
      assert counts["COVID-19"] in (149, 150)
    train = np.unique(np.concatenate(fold["phases"]))
    assert len(fold["test"]) == 15_085 - len(train) in (11_301, 11_302)
    assert not set(fold["test"]) & set(train)
  # Our sampler, given a fold's training images, builds phases with the authors' counts.
  fold = plan["folds"][0]
  train = np.unique(np.concatenate(fold["phases"]))
  labels = np.searchsorted(["COVID-19", "normal", "pneumonia"], cls)
  ours = concat_splits.phases(train, labels, meta["image_id"], ("covid", "normal", "pneumonia"), 8,
                       fresh={"normal": 250, "pneumonia": 200},
                       shared={"pneumonia": 34, "covid": -1}, seed=0)
  theirs = [np.bincount(labels[p], minlength=3).tolist() for p in fold["phases"]]
  assert [np.bincount(labels[p], minlength=3).tolist() for p in ours] == theirs
  # Only part of the collection on disk: the plan says how many listed files were found.
  partial = concat_splits.mr7495_plan({"image_id": meta["image_id"][::3]}, MR7495)
  assert partial["found"] == len(meta["image_id"][::3]) and partial["missing"] > 0

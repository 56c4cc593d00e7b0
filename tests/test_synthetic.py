import numpy as np
import pytest

from xrayjax.data import pipeline, sources, tasks
from xrayjax.data.sources import phantom, synthetic_cxr


def _examples(cfg, n=None):
  out = []
  for i, ex in enumerate(synthetic_cxr.generate(cfg)):
    if n is not None and i >= n:
      break
    out.append(ex)
  return out


def test_generation_is_deterministic_and_seed_dependent():
  cfg = synthetic_cxr.make_config(64, (3, 3, 3, 3), seed=1)
  a, b = _examples(cfg), _examples(cfg)
  assert len(a) == len(b) > 12
  for x, y in zip(a, b):
    for k in ("image", "lesion_mask", "lung_mask"):
      np.testing.assert_array_equal(x[k], y[k])
    assert (x["label"], x["patient_id"], x["site"]) == (y["label"], y["patient_id"], y["site"])
  other = _examples(synthetic_cxr.make_config(64, (3, 3, 3, 3), seed=2))
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, other))


def test_masks_and_findings_agree_with_labels():
  cfg = synthetic_cxr.make_config(96, (6, 6, 10, 6), seed=3)
  finding = {f: i for i, f in enumerate(tasks.FINDINGS)}
  per_patient = {}
  for ex in _examples(cfg):
    label, lesion, lung = ex["label"], ex["lesion_mask"][..., 0], ex["lung_mask"][..., 0]
    per_patient.setdefault(ex["patient_id"], set()).add(label)
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (96, 96, 1)
    assert lung.sum() > 0.1 * lung.size  # both lung fields are drawn
    if label == "normal":
      assert lesion.sum() == 0 and not ex["findings"].any()
      continue
    assert lesion.sum() > 0, f"{label} image {ex['image_id']} has an empty lesion mask"
    if label == "pneumonia":
      assert ex["findings"][finding["Pneumonia"]]
    if label == "covid":
      assert ex["findings"][finding["COVID-19"]]
      # Ground glass sits in the lungs (its mask also takes in the fading edge across the
      # lung field's soft border), mostly in the lower zones.
      rows = np.nonzero(lesion)[0]
      assert (lesion & lung).sum() >= 0.8 * lesion.sum()
      assert np.median(rows) > 0.45 * 96
    if label == "other_disease":
      names = [tasks.FINDINGS[i] for i in np.flatnonzero(ex["findings"])]
      assert len(names) == 1 and names[0] in phantom.OTHER_FINDINGS
  assert all(len(v) == 1 for v in per_patient.values())  # a patient keeps one class


def test_patients_have_one_to_three_images():
  plan = synthetic_cxr.patient_plan(synthetic_cxr.make_config(64, (20, 20, 20, 20)))
  counts = [p["images"] for p in plan]
  assert set(counts) == {1, 2, 3}


def test_full_site_confounding_ties_site_to_label():
  plan = synthetic_cxr.patient_plan(synthetic_cxr.make_config(64, (10, 10, 10, 10), 1.0))
  assert all(p["site"] == phantom.CLASSES.index(p["label"]) for p in plan)
  plan = synthetic_cxr.patient_plan(synthetic_cxr.make_config(64, (30, 30, 30, 30), 0.0))
  assert len({(p["label"], p["site"]) for p in plan}) > 8  # unconfounded: sites mixed


def test_bad_builder_config_is_rejected():
  with pytest.raises(ValueError, match="site_confounding"):
    synthetic_cxr.make_config(64, site_confounding=1.5)
  with pytest.raises(ValueError, match="non-negative counts"):
    synthetic_cxr.make_config(64, patients=(1, 2, 3))


def test_builder_and_metadata(tiny_config):
  b = sources.builder(tiny_config.data)
  meta = pipeline.read_metadata(b)
  n = b.info.splits["train"].num_examples
  assert len(meta["image_id"]) == n == len(set(meta["image_id"]))
  assert set(meta["label"]) == set(phantom.CLASSES)
  assert all(s == synthetic_cxr.SOURCE for s in meta["source"])
  with pytest.raises(ValueError, match="valid sources"):
    tiny_config.data.source = "nih"
    sources.builder(tiny_config.data)


# The classes may differ only inside their findings' masks. A linear probe on 32x32 pixels
# (patient-grouped 5-fold) that sees every image with its lesion pixels replaced by the same
# film without the finding must stay near chance for every class (one-vs-rest AUROC below
# CUE_AUROC); on the whole images it must see the findings (the probe is not blind).
CUE_AUROC = 0.65


def test_no_class_cue_outside_the_lesion_masks():
  from sklearn import metrics

  from xrayjax.evaluate import shortcuts
  cfg = synthetic_cxr.make_config(64, (50, 50, 50, 50), seed=0)
  ex = list(synthetic_cxr.generate(cfg, healthy=True))
  image = np.stack([e["image"][..., 0] for e in ex])
  healthy = np.stack([e["healthy"][..., 0] for e in ex])
  lesion = np.stack([e["lesion_mask"][..., 0] for e in ex]).astype(bool)
  labels = np.array([phantom.CLASSES.index(e["label"]) for e in ex])
  patients = np.array([e["patient_id"] for e in ex])
  # Outside its mask a film and its healthy counterpart differ by at most the rounding of
  # phantom.VISIBLE (2 grey levels); normal films have no mask and are their own counterpart.
  assert np.abs(image.astype(int) - healthy)[~lesion].max() <= 2
  assert not lesion[labels == 0].any()

  def auroc(x):
    p = shortcuts.probe(shortcuts.downsample(x), labels, patients, seed=0)
    return {c: metrics.roc_auc_score(labels == k, p[:, k]) for k, c in enumerate(phantom.CLASSES)}

  whole, outside = auroc(image), auroc(np.where(lesion, healthy, image))
  assert min(whole.values()) >= 0.7, whole
  assert max(outside.values()) < CUE_AUROC, (
      f"a class is told apart by pixels outside the lesion masks: {outside}")

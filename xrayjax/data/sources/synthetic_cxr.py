"""`synthetic_cxr`: the embedded default data set, generated locally (no download).

Patients get an anatomy, a class, a site and 1-3 images (`phantom.render`).
Everything is a pure function of the builder config (size, patients per class,
site confounding, seed), so two builds are byte-identical.

Site confounding c in [0, 1]: with probability c a patient's site (its exposure
curve and corner marker) is tied to the class (class k -> site k); otherwise the
site is uniform. c = 0 (default) gives no shortcut; c = 1 a perfect one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from xrayjax.data import tasks
from xrayjax.data.sources import decode, phantom, schema

SOURCE = "synthetic_cxr"
DEFAULT_PATIENTS = (800, 60, 800, 60)  # normal, pneumonia, other_disease, covid


@dataclasses.dataclass(eq=False)
class SyntheticCxrConfig(tfds.core.BuilderConfig):
  image_size: int = 128
  patients: tuple[int, int, int, int] = DEFAULT_PATIENTS
  site_confounding: float = 0.0
  seed: int = 0


def make_config(image_size: int = 128, patients=DEFAULT_PATIENTS,
                site_confounding: float = 0.0, seed: int = 0) -> SyntheticCxrConfig:
  """A config whose name encodes every parameter (so builds never collide)."""
  patients = tuple(int(p) for p in patients)
  if len(patients) != len(phantom.CLASSES) or min(patients) < 0:
    raise ValueError(f"synthetic patients must be {len(phantom.CLASSES)} non-negative counts "
                     f"for {phantom.CLASSES}, got {patients}")
  if not 0.0 <= site_confounding <= 1.0:
    raise ValueError(f"site_confounding must be in [0, 1], got {site_confounding}")
  if image_size < 32:
    raise ValueError(f"synthetic image_size must be >= 32, got {image_size}")
  default = patients == DEFAULT_PATIENTS and site_confounding == 0 and seed == 0
  name = f"s{image_size}" if default else (
      f"s{image_size}_p{'-'.join(map(str, patients))}_c{int(round(site_confounding * 100))}"
      f"_seed{seed}")
  return SyntheticCxrConfig(name=name, image_size=image_size, patients=patients,
                            site_confounding=float(site_confounding), seed=int(seed),
                            description=f"{image_size}px, patients per class {patients}, "
                                        f"site confounding {site_confounding}, seed {seed}")


class SyntheticCxr(tfds.core.GeneratorBasedBuilder):
  """Procedural chest X-rays with lesion and lung masks."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.1.0": "file_sha1 and phash for duplicate detection.",
      "2.0.0": "Lesion masks cover every visible change (the film without the finding is "
               "rendered too); COVID-19 ground glass larger and denser, nodules larger.",
  }
  BUILDER_CONFIGS = [make_config(128), make_config(256)]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return schema.dataset_info(self, s, __doc__,
                               lesion_mask=tfds.features.Image(shape=(s, s, 1)),
                               lung_mask=tfds.features.Image(shape=(s, s, 1)),
                               severity=tfds.features.Scalar(dtype=np.float32))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for example in generate(self.builder_config):
      yield example["image_id"], example


def patient_plan(cfg: SyntheticCxrConfig) -> list[dict]:
  """Per patient: class, site, number of images. Cheap; no rendering."""
  rng = np.random.default_rng([cfg.seed, 0])
  plan = []
  for label_index, (label, count) in enumerate(zip(phantom.CLASSES, cfg.patients)):
    for _ in range(count):
      if rng.random() < cfg.site_confounding:
        site = label_index % len(phantom.SITES)
      else:
        site = int(rng.integers(len(phantom.SITES)))
      plan.append({"label": label, "site": site, "images": int(rng.integers(1, 4))})
  return plan


def generate(cfg: SyntheticCxrConfig, healthy: bool = False):
  """Yields examples in a fixed order; patient p draws from its own generator. `healthy`:
  also yield each film without its finding (`phantom.render`), for tests of class cues."""
  finding_index = {f: i for i, f in enumerate(tasks.FINDINGS)}
  for p, pat in enumerate(patient_plan(cfg)):
    rng = np.random.default_rng([cfg.seed, 1, p])
    anatomy = phantom.sample_anatomy(rng)
    label = pat["label"]
    finding = str(rng.choice(phantom.OTHER_FINDINGS)) if label == "other_disease" else None
    # Severity is a patient property (the disease), mild cases are common.
    severity = 0.0 if label == "normal" else 0.25 + 0.75 * float(rng.beta(2.0, 1.5))
    names = {"pneumonia": ["Pneumonia"], "covid": ["COVID-19"],
             "other_disease": [finding], "normal": []}[label]
    findings = np.zeros(len(tasks.FINDINGS), np.bool_)
    findings[[finding_index[n] for n in names]] = True
    for i in range(pat["images"]):
      view = str(rng.choice(phantom.VIEWS, p=(0.7, 0.3)))
      # Follow-up images: the finding evolves a little between studies.
      sev = float(np.clip(severity * rng.uniform(0.8, 1.2), 0.05, 1.0)) if severity else 0.0
      out = phantom.render(rng, size=cfg.image_size, label=label, anatomy=anatomy,
                           site=phantom.SITES[pat["site"]], view=view, severity=sev,
                           finding=finding)
      yield {
          "image": out["image"][..., None],
          "file_sha1": decode.sha1(out["image"].tobytes()),
          "phash": decode.perceptual_hash(out["image"]),
          "lesion_mask": out["lesion_mask"][..., None],
          "lung_mask": out["lung_mask"][..., None],
          "label": label,
          "findings": findings,
          "severity": np.float32(sev),
          "patient_id": f"syn-{p:06d}",
          "image_id": f"syn-{p:06d}-{i}",
          "source": SOURCE,
          "site": f"site{pat['site']}",
          "view": view,
      } | ({"healthy": out["healthy"][..., None]} if healthy else {})

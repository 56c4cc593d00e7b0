"""Helpers shared by experiment configs: the `key=value,flag` argument string, the data,
evaluation and shortcut-audit blocks every method uses."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, defaults: dict[str, str], choices: dict[str, tuple],
              flags: tuple[str, ...]) -> dict:
  """Parses "model=vgg16,runlocal" into {"model": "vgg16", "runlocal": True, ...}.

  Unknown keys and values outside `choices` raise ValueError listing what is valid.
  """
  out: dict = dict(defaults)
  out.update({f: False for f in flags})
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key in flags and not value:
      out[key] = True
    elif key in defaults and value:
      if key in choices and value not in choices[key]:
        raise ValueError(f"config arg {key}={value!r} is not valid; choose one of "
                         f"{list(choices[key])}")
      out[key] = value
    else:
      raise ValueError(f"unknown config arg {item!r}; valid: "
                       f"{[f'{k}=' + '|'.join(choices.get(k, ('...',))) for k in defaults]} "
                       f"and flags {list(flags)}")
  return out


def data_config(source: str) -> ml_collections.ConfigDict:
  """The data block: which sources (`nih`: NIH ChestX-ray14 + ieee8023), every source's
  options, and the model's input size (`image_size`; built images are resized to it)."""
  placeholder = ml_collections.config_dict.placeholder
  source = {"nih": "nih_cxr14,ieee8023_covid"}.get(source, source)
  return ml_collections.ConfigDict(dict(
      source=source, image_size=96, tfds_dir=placeholder(str),
      synthetic=dict(image_size=128, patients=(800, 60, 800, 60), site_confounding=0.0, seed=0),
      # A CSV (path, label column, patient_id, source), e.g. ../shared/data/cxr_bench_64/
      # manifest.csv; path_env names the environment variable read when path is unset.
      manifest=dict(path=placeholder(str), path_env="XRAYJAX_MANIFEST", label_column="label4",
                    image_size=64),
      # Native layouts (data/sources/*.py); root also from $XRAYJAX_<SOURCE>.
      nih_cxr14=dict(root=placeholder(str), image_size=256),
      rsna_pneumonia=dict(root=placeholder(str), image_size=256),
      ieee8023_covid=dict(root=placeholder(str), image_size=256, frontal_only=True),
      covidx=dict(root=placeholder(str), image_size=256, label_files=""),
  ))


def eval_config(bootstrap: int = 1000, per_class: int = 3) -> ml_collections.ConfigDict:
  """The evaluation block.

  prevalences: PPV and NPV are also reported as they would be at these prevalences.
  bootstrap: patient-clustered resamples for the 95% intervals (0: none).
  gradcam: maps of `target` (any entry of the model's `out`; concat also has xception,
  resnet50v2, concat) by `method` (gradcam | gradcam++ | hirescam): overlays (the lesion
  outlined) of per_class right and per_class wrong predictions of every class, and of every
  misclassified image when `misclassified`; localisation scores; the model-randomisation
  check on the first sanity_folds folds. also_score: further maps scored for localisation
  only (concat: each branch's).
  """
  return ml_collections.ConfigDict(dict(
      prevalences=(0.01, 0.05, 0.2), bootstrap=bootstrap,
      gradcam=dict(enabled=True, target="features", method="gradcam", per_class=per_class,
                   misclassified=True, sanity_folds=1, batch_size=16, also_score=())))


def audit_config() -> ml_collections.ConfigDict:
  """The shortcut audit (evaluate/shortcuts.py; README, "Shortcut audit").

  Every run (cheap): confounding tables, perturbations of the test images (`perturb`),
  pixel probes and the source baseline (`probes`), within-source metrics and the verdict.
  retrain (opt-in, each a whole training in <run>/audit/<name>/): comma separated, of
  border, centre, lungs, no_lungs (the same method trained and tested on that input) and
  loso (leave-one-source-out: one run per source, or per site when there is one source,
  whose classes also occur elsewhere), e.g. "border,lungs".
  input: what the model sees, in training and testing: full | border | centre | lungs |
  no_lungs (data/regions.py). leave_out: FIELD:VALUE (e.g. source:ieee8023): train
  without those images, test on them. (retrain sets both in its runs.)
  Geometry, as fractions of the image side (data/regions.py): centre, the kept / erased
  central box; corner, the erased corner squares; top_crop, the rows cut off the top;
  lung_box (top, bottom, left, right), what stands in for the lungs without a lung mask.
  """
  return ml_collections.ConfigDict(dict(
      perturb=True, probes=True, retrain="", input="full", leave_out="",
      centre=0.6, corner=0.15, top_crop=0.08, lung_box=(0.15, 0.75, 0.12, 0.88)))

"""Helpers shared by experiment configs: the `key=value,flag` argument string, the run header,
the data, model, evaluation and shortcut-audit blocks every method uses, and `override`
(fields by their dotted config path, as recipes name them)."""

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


def header(c: ml_collections.ConfigDict, method: str, protocol: str, data: str) -> None:
  """The fields every run has: method, seed, protocol, folds, logging, checkpoints, dedup."""
  c.method = method
  c.seed = 0
  c.protocol = protocol  # corrected | paper | both (the two side by side)
  c.folds = 5
  c.log_every = 20
  # Checkpoints inside an epoch (every epoch end selection could pick has one): 0 = about
  # every 10 minutes of training at the measured speed. SIGTERM / SIGINT also checkpoint.
  c.checkpoint_every_steps = 0
  # A training partition whose images (at the model's size, uint8) fit in this many MB is
  # decoded once and cached in every process; a larger one is streamed: each epoch, each
  # process decodes only its share of the batches (the same batches; docs/scaling-out.md).
  c.cache_budget_mb = 2048
  # Duplicates (exact file copies, and 256-bit pHashes at most max_distance bits apart) are
  # found across all sources before splitting; the corrected protocol drops copies and keeps
  # patients joined by a duplicate in one partition (duplicates.json in the run directory).
  # Real data: 24 bits (re-cropped, re-windowed copies of one picture are closer, different
  # patients farther; docs/data.md); the synthetic phantoms share one anatomy template and
  # hold no copies, so they use 12.
  c.dedup = dict(max_distance=12 if data == "synthetic" else 24)


def model_config(width: float) -> ml_collections.ConfigDict:
  """The model block: channel `width` (1.0 = the published network), `init_from` (Keras
  weight files, comma separated, loaded over the random initialisation;
  models/keras_weights.py) and `compute_dtype`: float32 | bfloat16 (for GPUs and TPUs), what
  convolutions, dense layers and BatchNorm compute in (parameters, BatchNorm statistics and
  the loss stay float32)."""
  return ml_collections.ConfigDict(dict(
      width=width, init_from=ml_collections.config_dict.placeholder(str),
      compute_dtype="float32"))


def override(c: ml_collections.ConfigDict, fields: dict) -> None:
  """Sets each dotted config path of `fields` ("stage_b.optimizer.lr": 3e-4) in `c`; a path
  the config does not have is an error (a recipe never adds a field)."""
  for path, value in fields.items():
    *parents, last = path.split(".")
    node = c
    for name in parents:
      node = node[name]
    if last not in node:
      raise KeyError(f"config has no field {path!r}")
    node[last] = value


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
  resnet50v2, concat, and each branch's own maps by path, e.g. xception/block3) by `method` (gradcam | gradcam++ | hirescam): overlays (the lesion
  outlined) of per_class right and per_class wrong predictions of every class, and of every
  misclassified image when `misclassified`; localisation scores; the model-randomisation
  check on the first sanity_folds folds. also_score: further maps scored for localisation
  only (concat: each branch's). reference: '' (maps as published: activations measured
  against zero) or a class name, e.g. normal: each map measured against its mean over the
  evaluated model's training images of that class (evaluate/gradcam.py; docs/detl.md).
  """
  return ml_collections.ConfigDict(dict(
      prevalences=(0.01, 0.05, 0.2), bootstrap=bootstrap,
      gradcam=dict(enabled=True, target="features", method="gradcam", per_class=per_class,
                   misclassified=True, sanity_folds=1, batch_size=16, also_score=(),
                   reference="")))


def audit_config() -> ml_collections.ConfigDict:
  """The shortcut audit (evaluate/shortcuts.py; docs/shortcut-audit.md).

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

r"""Predicts PNG, JPEG or DICOM chest X-rays with a trained run, with a Grad-CAM overlay each.

  python -m xrayjax.predict --workdir=checkpoints/detl-vgg16-... scan1.dcm scans/ xray.png
  python -m xrayjax.predict --workdir=RUN --fold=2 --format=csv --output=pred.csv FILES...

--fold=all (default) averages the class probabilities (and the Grad-CAM maps) of every
fold's stage-B model: an ensemble of the cross-validation models. --fold=K uses fold K's.
Folders are searched recursively for .png, .jpg, .jpeg and .dcm files. Images are decoded as
the builders decode them (DICOM: modality and VOI LUT, MONOCHROME1, any bit depth, JPEG and
JPEG 2000), squashed to the model's input size and normalised. A file that cannot be read is
reported with its reason and skipped; the others are still predicted. Overlays (the image
beside its map for the predicted class) go to --overlays (default WORKDIR/predictions/).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run directory.", required=True)
_FOLD = flags.DEFINE_string("fold", "all", "Fold whose model predicts, or `all` (ensemble).")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "csv", "json"], "Output format.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the table here (default: stdout).")
_OVERLAYS = flags.DEFINE_string("overlays", None,
                                "Grad-CAM overlay directory (default WORKDIR/predictions; "
                                "`none` to skip).")
_TARGET = flags.DEFINE_string("gradcam_target", None,
                              "Map to explain (default: the run's eval.gradcam.target).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per batch.")

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def find_images(paths: list[str]) -> list[str]:
  """Files as given, and every image file under the folders given (sorted)."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      for d, _, names in os.walk(p):
        out += sorted(os.path.join(d, n) for n in names if n.lower().endswith(SUFFIXES))
    else:
      out.append(p)
  return out


def load(paths: list[str], size: int) -> tuple[np.ndarray, list[str], list[dict]]:
  """(images [n, size, size, 1] in [-1, 1], the paths read, [{file, reason}] skipped)."""
  from xrayjax.data.sources import native
  images, ok, skipped = [], [], []
  for p in paths:
    try:
      image, _, _ = native.read_image(p)
    except native.SkippedImage as e:
      skipped.append({"file": p, "reason": str(e)})
      continue
    images.append(native.resize(image, size).astype(np.float32) / 127.5 - 1.0)
    ok.append(p)
  return (np.stack(images)[..., None] if images else np.zeros((0, size, size, 1), np.float32),
          ok, skipped)


class Predictor:
  """The stage-B model(s) of a trained run."""

  def __init__(self, workdir: str, fold: str = "all"):
    from ml_collections import config_dict

    from xrayjax import experiment, files, models, train
    from xrayjax.data import tasks
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: --workdir is not an xrayjax run directory")
    self.config = config = config_dict.ConfigDict(files.read_json(path))
    self.classes = tasks.get(config.data_b.task).classes
    self.model = models.build(config.model_name, len(self.classes), config.model)
    self.size = config.data.image_size
    spec = models.spec(config.model_name)
    folds = range(config.folds) if fold == "all" else [int(fold)]
    init = experiment.init_variables(self.model, self.size, 0)
    self.variables = [
        train.restore_selected(self.model, init, os.path.join(workdir, f"fold{k}", "stage_b"),
                               config.stage_b, tuple(config.stage_b.param_rules),
                               spec.PARAM_GROUPS) for k in folds]
    self.folds = list(folds)

  def __call__(self, images: np.ndarray, batch: int, target: str | None = None):
    """(probabilities [n, C] averaged over the models, Grad-CAM [n, s, s] of the predicted
    class, averaged over the models; None when `target` is None)."""
    import jax
    import jax.numpy as jnp

    from xrayjax.evaluate import audit, gradcam
    logits_fn = jax.jit(lambda v, x: jax.nn.softmax(self.model.apply(v, x, train=False)[0]))
    probs = []
    for v in self.variables:
      probs.append(np.concatenate([np.asarray(logits_fn(v, jnp.asarray(images[s:s + batch])))
                                   for s in range(0, len(images), batch)]))
    probs = np.mean(probs, axis=0)
    if target is None:
      return probs, None
    cam_fn = gradcam.make_fn(self.model, target, self.config.eval.gradcam.method)
    chosen = probs.argmax(-1).astype(np.int32)
    cams = np.mean([audit.maps(cam_fn, v, images, chosen, batch)["cam"]
                    for v in self.variables], axis=0)
    return probs, cams


def table(rows: list[dict], classes, skipped: list[dict], fmt: str) -> str:
  if fmt == "json":
    return json.dumps({"predictions": rows, "skipped": skipped}, indent=2)
  cols = ["file", "prediction"] + [f"p_{c}" for c in classes]
  if fmt == "csv":
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols + ["overlay"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
  width = max([len(r["file"]) for r in rows] + [4])
  lines = [f"{'file':<{width}}  {'prediction':<14}" + "".join(f"{c:>15}" for c in classes)]
  for r in rows:
    lines.append(f"{r['file']:<{width}}  {r['prediction']:<14}" +
                 "".join(f"{r[f'p_{c}']:>15.3f}" for c in classes))
  for s in skipped:
    lines.append(f"skipped {s['file']}: {s['reason']}")
  return "\n".join(lines)


def predict(workdir: str, paths: list[str], fold: str = "all", overlays: str | None = None,
            target: str | None = None, batch: int = 16) -> tuple[list[dict], list[dict], tuple]:
  """-> (one row per predicted file, skipped files with reasons, class names)."""
  from xrayjax.evaluate import audit
  predictor = Predictor(workdir, fold)
  files_ = find_images(paths)
  images, ok, skipped = load(files_, predictor.size)
  for s in skipped:
    logging.warning("skipped %s: %s", s["file"], s["reason"])
  if not ok:
    return [], skipped, predictor.classes
  overlays = overlays or os.path.join(workdir, "predictions")
  explain = overlays != "none"
  target = target or predictor.config.eval.gradcam.target
  probs, cams = predictor(images, batch, target if explain else None)
  rows = []
  if explain:
    os.makedirs(overlays, exist_ok=True)
  for i, path in enumerate(ok):
    c = int(probs[i].argmax())
    row = {"file": path, "prediction": predictor.classes[c],
           **{f"p_{k}": float(probs[i, j]) for j, k in enumerate(predictor.classes)}}
    if explain:
      stem = os.path.splitext(os.path.basename(path))[0]
      out = os.path.join(overlays, f"{i:04d}_{audit._safe(stem)}.png")
      audit.save_overlay(out, images[i, ..., 0], cams[i],
                         f"{os.path.basename(path)}\npredicted {predictor.classes[c]} "
                         f"({100 * probs[i, c]:.0f}%), folds {predictor.folds}")
      row["overlay"] = out
    rows.append(row)
  return rows, skipped, predictor.classes


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more PNG, JPEG or DICOM files or folders")
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  rows, skipped, classes = predict(_WORKDIR.value, paths, _FOLD.value, _OVERLAYS.value,
                                   _TARGET.value, _BATCH.value)
  text = table(rows, classes, skipped, _FORMAT.value)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text + "\n")
  else:
    print(text)
  if not rows:
    sys.exit(f"no image could be read ({len(skipped)} skipped)")


if __name__ == "__main__":
  app.run(main)

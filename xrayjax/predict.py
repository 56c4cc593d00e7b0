r"""Predicts PNG, JPEG or DICOM chest X-rays with a trained run, with a Grad-CAM overlay each.

  python -m xrayjax.predict --workdir=checkpoints/detl-vgg16-... scan1.dcm scans/ xray.png
  python -m xrayjax.predict --workdir=RUN --fold=2 --format=csv --output=pred.csv FILES...

--fold=all (default) averages the class probabilities (and the Grad-CAM maps) of the model
every fold evaluated (the run's plan.json names them): an ensemble of the cross-validation
models. --fold=K uses fold K's. Folders are searched recursively for .png, .jpg, .jpeg and
.dcm files. Images reach the model exactly as training images did: decoded as the builders
decode them (DICOM: modality and VOI LUT, MONOCHROME1, any bit depth, JPEG and JPEG 2000),
squashed to the size the run's data were built at, resized to the model's input by the
training pipeline's resize, and normalised. A file that cannot be read is
reported with its reason and skipped; the others are still predicted. Overlays (the image
beside its map for the predicted class) go to --overlays (default WORKDIR/predictions/).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from xrayjax import hostmem

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run directory.", required=True)
_FOLD = flags.DEFINE_string("fold", "all", "Fold whose model predicts, or `all` (ensemble).")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "csv", "json"], "Output format.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the table here (default: stdout).")
_OVERLAYS = flags.DEFINE_string("overlays", None,
                                "Grad-CAM overlay directory (default WORKDIR/predictions; "
                                "`none` to skip).")
_TARGET = flags.DEFINE_string("gradcam_target", None,
                              "Map to explain (default: the run's eval.gradcam.target).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per batch (a multiple of the devices).")

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


class InputError(ValueError):
  """A bad argument: the message names it and what is valid (the command prints it alone)."""


class NotARunDirectory(FileNotFoundError):
  """--workdir is not a trained run directory."""


def find_images(paths: list[str]) -> list[str]:
  """Files as given, and every image file under the folders given (sorted).

  Raises InputError for a path that does not exist and for a folder with no image file.
  """
  out = []
  for p in paths:
    if os.path.isdir(p):
      found, others = [], 0
      for d, _, names in sorted(os.walk(p)):
        found += sorted(os.path.join(d, n) for n in names if n.lower().endswith(SUFFIXES))
        others += sum(not n.lower().endswith(SUFFIXES) for n in names)
      if not found:
        what = f"only {others} other files" if others else "nothing"
        raise InputError(f"folder {p} holds no image file ({', '.join(SUFFIXES)}, searched "
                         f"recursively; it holds {what}): give PNG, JPEG or DICOM files or "
                         "folders holding them")
      out += found
    elif os.path.exists(p):
      out.append(p)
    else:
      raise InputError(f"{p}: no such file or folder; give PNG, JPEG or DICOM files or folders "
                       "holding them")
  return out


def load(paths: list[str], stored_size: int, image_size: int
         ) -> tuple[np.ndarray, list[str], list[dict]]:
  """(uint8 images [n, image_size, image_size, 1] as training fed them, the paths read,
  [{file, reason}] skipped).

  Each file goes the way a training image went: decoded as the builders decode it, squashed
  to the size the run's data were built at (`stored_size`, as the builders store it), then
  resized to the model's input by the pipeline's own resize (pipeline.to_model_size).
  """
  from xrayjax.data import pipeline
  from xrayjax.data.sources import decode
  images, ok, skipped = [], [], []
  for p in paths:
    try:
      image, _, _ = decode.read_image(p)
    except decode.SkippedImage as e:
      reason = str(e)
      if reason.startswith("unreadable image") and not p.lower().endswith(SUFFIXES):
        kind = reason.split(": ")[1] if ": " in reason else reason
        reason = (f"not a PNG, JPEG or DICOM image ({kind}); predict reads .png, .jpg, .jpeg "
                  "and .dcm files")
      skipped.append({"file": p, "reason": reason})
      continue
    stored = decode.resize(image, stored_size)[..., None]
    images.append(np.asarray(pipeline.to_model_size(stored, image_size)))
    ok.append(p)
  return (np.stack(images) if images else np.zeros((0, image_size, image_size, 1), np.uint8),
          ok, skipped)


class Predictor:
  """The evaluated models of a trained run (one per fold), read from its plan.json.

  The run directory and the fold are checked when it is made; the models are restored when
  it first predicts (so bad input is reported before any checkpoint is read).
  """

  def __init__(self, workdir: str, fold: str = "all"):
    from ml_collections import config_dict

    from xrayjax import files, rundir
    from xrayjax.data import sources
    for name in (rundir.CONFIG, rundir.PLAN):
      if not os.path.exists(os.path.join(workdir, name)):
        raise NotARunDirectory(
            f"{os.path.join(workdir, name)} not found: --workdir is not an xrayjax run "
            "directory (a protocol=both run holds two: give WORKDIR/corrected or "
            "WORKDIR/paper), or one made by an xrayjax older than plan.json")
    self.workdir = workdir
    self.config = config = config_dict.ConfigDict(files.read_json(os.path.join(workdir, rundir.CONFIG)))
    masked = config.get("audit", {}).get("input", "full")
    if masked != "full":
      raise InputError(f"{workdir} trained its models on {masked} inputs for a shortcut audit "
                       "(config.audit.input); predict serves models trained on whole images")
    plan = files.read_json(os.path.join(workdir, rundir.PLAN))
    self.evaluations = plan["evaluations"]
    if fold != "all":
      self.evaluations = [e for e in self.evaluations if str(e["fold"]) == str(fold).strip()]
      if not self.evaluations:
        raise InputError(f"--fold={fold} is not a fold of this run: valid values are "
                         f"{', '.join(str(e['fold']) for e in plan['evaluations'])} or `all` "
                         "(the ensemble of every fold's model)")
    self.classes = tuple(plan["classes"])
    self.size = config.data.image_size
    self.stored_size = sources.stored_size(config.data)
    self.folds = [e["fold"] for e in self.evaluations]
    self._variables = None

  @property
  def variables(self) -> list:
    """Each evaluated fold's model variables, restored on first use."""
    if self._variables is None:
      from xrayjax import infer
      self._variables = [infer.restore(os.path.join(self.workdir, e["stage"]))[0]
                         for e in self.evaluations]
    return self._variables

  def __call__(self, images: np.ndarray, batch: int, target: str | None = None):
    """(probabilities [n, C] averaged over the models, Grad-CAM [n, s, s] of the predicted
    class, averaged over the models; None when `target` is None). `images` as `load`
    returns them."""
    from xrayjax import infer, models, sharding
    from xrayjax.data import pipeline
    from xrayjax.evaluate import audit, gradcam
    self.model = models.build(self.config.model_name, len(self.classes), self.config.model)
    self.mesh = sharding.make_mesh()
    ds, n = pipeline.from_arrays(images), len(images)
    predict_fn = infer.make_predict_fn(self.model, self.mesh)
    probs = np.mean([infer.predict(predict_fn, v, ds, n, batch, self.mesh)[0]
                     for v in self.variables], axis=0)
    if target is None:
      return probs, None
    cam_fn = gradcam.make_fn(self.model, target, self.config.eval.gradcam.method)
    chosen = probs.argmax(-1)
    cams = np.mean([audit.maps(cam_fn, v, ds, n, chosen, batch, self.mesh)["cam"]
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
  """-> (one row per predicted file, skipped files with reasons, class names).

  Raises NotARunDirectory for a `workdir` that is not a run, InputError for a fold the run
  does not have, a path that does not exist or a folder without images; a file that is not
  a readable image is skipped with its reason.
  """
  from xrayjax.evaluate import audit
  if batch < 1:
    raise InputError(f"--batch_size={batch}: give a positive number of images per batch")
  predictor = Predictor(workdir, fold)
  files_ = find_images(paths)
  images, ok, skipped = load(files_, predictor.stored_size, predictor.size)
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
      audit.save_overlay(out, images[i, ..., 0], cams[i], None,
                         f"{os.path.basename(path)}\npredicted {predictor.classes[c]} "
                         f"({100 * probs[i, c]:.0f}%), folds {predictor.folds}")
      row["overlay"] = out
    rows.append(row)
  return rows, skipped, predictor.classes


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more PNG, JPEG or DICOM files or folders")
  import jax

  from xrayjax.data import pipeline
  pipeline.configure_tensorflow(jax.default_backend())
  try:
    rows, skipped, classes = predict(_WORKDIR.value, paths, _FOLD.value, _OVERLAYS.value,
                                     _TARGET.value, _BATCH.value)
  except (InputError, NotARunDirectory) as e:
    sys.exit(f"xrayjax.predict: {e}")  # one line on stderr, exit status 1, no traceback
  if not rows:
    sys.exit("xrayjax.predict: no image could be read: " + "; ".join(
        f"{s['file']}: {s['reason']}" for s in skipped))
  for s in skipped:
    logging.warning("skipped %s: %s", s["file"], s["reason"])
  text = table(rows, classes, skipped, _FORMAT.value)
  if _OUTPUT.value:
    from xrayjax import files
    files.write_text(_OUTPUT.value, text + "\n")
  else:
    print(text)


if __name__ == "__main__":
  hostmem.reexec()  # the command runs again with huge pages and the block cache (once)
  app.run(main)

"""Grad-CAM on a fold's test images: the gallery, localisation scores and the sanity check.

- Gallery: for every class, a sample of correct and of wrong predictions (`per_class` of
  each, seeded), and optionally every misclassified image: a PNG with the image beside its
  Grad-CAM overlay for the predicted class, the lesion outlined (synthetic masks, NIH / RSNA
  boxes), titled with the label, the prediction and its probability.
- Localisation, with the map of the *true* class (what the model should have looked at):
  the pointing game (is the map's peak inside the lesion?) and the fraction of the map's
  energy inside the lesion (synthetic lesion masks, NIH / RSNA boxes) and inside the lungs
  (lung masks).
- With `reference` (a class name, e.g. normal), every map is measured against that map's
  mean over the evaluated model's training images of the class (gradcam.py), not against
  zero; the randomised model's maps against its own mean.
- Model randomisation (Adebayo et al. 2018): the layers of the last conv block and the head
  are re-initialised and the maps recomputed for the same classes; the Spearman rank
  correlation with the trained network's maps is reported. Maps that barely change would
  not be explaining what the network learnt.
"""

from __future__ import annotations

import functools
import os
import re

import flax
import jax
import numpy as np

from xrayjax import files, infer, sharding, train
from xrayjax.data import pipeline
from xrayjax.evaluate import gradcam


def maps(cam_fn, variables, ds, num_examples: int, classes: np.ndarray, batch: int,
         mesh) -> dict:
  """Grad-CAM of every image of `ds` for `classes` (per dataset index; -1: predicted), by
  the one padded-batch loop: {cam, probs, class, map} per image, in index order."""
  with_class = pipeline.with_field(ds, "class", np.asarray(classes, np.int32))
  return infer.batched(cam_fn, variables, with_class, num_examples, batch, mesh)


def reference_maps(model, variables, targets: tuple[str, ...], reference: tuple, batch: int,
                   mesh) -> dict[str, np.ndarray]:
  """{target: the mean of its map over the reference images} (`reference` = (dataset,
  count)), one forward pass for all targets, by a process-local loop (the mesh's devices
  are this process's: Grad-CAM runs on one)."""
  ds, count = reference
  fn = gradcam.make_sum_fn(model, tuple(targets))
  total = {t: 0.0 for t in targets}
  for b in infer.eval_batches(ds, count, batch, 0, 1):
    sums = jax.device_get(fn(variables, sharding.to_global(b, mesh)))
    total = {t: total[t] + np.asarray(sums[t]) for t in targets}
  return {t: v / count for t, v in total.items()}


def randomised_top(model, variables, image_size: int, groups: dict, seed: int) -> dict:
  """`variables` with the last conv block and head re-initialised (fresh random weights)."""
  # Jitted, those layers alone (eagerly, every op of the network would compile on its own).
  fresh = train.fresh_layers(model, image_size, seed,
                             f"{groups['last_conv_block']}|{groups['head']}")
  out = {}
  for col in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(jax.device_get(variables.get(col, {})), sep="/")
    new = flax.traverse_util.flatten_dict(jax.device_get(fresh.get(col, {})), sep="/")
    out[col] = flax.traverse_util.unflatten_dict({k: new.get(k, v) for k, v in flat.items()},
                                                 sep="/")
  return out


def explain_fold(*, model, variables, ds, num_examples: int, labels: np.ndarray,
                 masks: dict, classes, cfg, groups: dict, out_dir: str, names: np.ndarray,
                 fold: int, seed: int, sanity: bool, mesh, reference: tuple | None = None
                 ) -> dict:
  """Grad-CAM audit of one fold's test images: `ds` (index k = the k-th test image, true
  label `labels[k]`, mask `masks[...][k]`, name `names[k]`). `reference` = (dataset, count)
  of the images whose mean map every map is measured against (cfg.reference), or None."""

  also = [t for t in cfg.get("also_score", ()) if t != cfg.target]

  def cam_fns(weights, targets) -> dict:
    """{target: its Grad-CAM fn, bound to its reference map when there is one}."""
    refs = (reference_maps(model, weights, targets, reference, cfg.batch_size, mesh)
            if reference else {})
    return {t: functools.partial(gradcam.make_fn(model, t, cfg.method), reference=refs[t])
            if refs else gradcam.make_fn(model, t, cfg.method) for t in targets}

  fns = cam_fns(variables, (cfg.target, *also))
  pred = maps(fns[cfg.target], variables, ds, num_examples, np.full(num_examples, -1),
              cfg.batch_size, mesh)
  true = maps(fns[cfg.target], variables, ds, num_examples, labels, cfg.batch_size, mesh)
  result = {"fold": fold, "target": cfg.target, "method": cfg.method, "per_image": [],
            "reference_images": reference[1] if reference else 0,
            **localisation(true["cam"], masks)}
  # Other maps of the same network (concat: each branch), scored the same way.
  result["targets"] = {t: localisation(maps(fns[t], variables, ds, num_examples, labels,
                                            cfg.batch_size, mesh)["cam"], masks) for t in also}
  lesion = masks["has_lesion"]
  if sanity:
    size = int(ds.element_spec["image"].shape[0])
    rand = randomised_top(model, variables, size, groups, seed)
    again = maps(cam_fns(rand, (cfg.target,))[cfg.target], rand, ds, num_examples,
                 pred["class"], cfg.batch_size, mesh)
    result["randomisation_spearman"] = gradcam.rank_similarity(pred["cam"], again["cam"])
  # Gallery: per class, a sample of right and of wrong predictions (seeded), and optionally
  # every misclassified image.
  rng = np.random.default_rng(seed)
  right = pred["class"] == labels
  chosen = set()
  for c in range(len(classes)):
    for ok in (True, False):
      idx = np.flatnonzero((labels == c) & (right == ok))
      chosen.update(rng.permutation(idx)[:cfg.per_class].tolist())
  wrong = set(np.flatnonzero(~right).tolist())
  if cfg.misclassified:
    chosen.update(wrong)
  os.makedirs(out_dir, exist_ok=True)
  images = pipeline.images(ds, sorted(chosen))
  for i in sorted(chosen):
    kind = "wrong" if i in wrong else "right"
    path = os.path.join(out_dir, f"fold{fold}_{kind}_{_safe(names[i])}.png")
    p = float(pred["probs"][i, pred["class"][i]])
    save_overlay(path, images[i], pred["cam"][i], masks["lesion"][i] if lesion[i] else None,
                 f"{names[i]}\ntruth {classes[labels[i]]} | predicted {classes[pred['class'][i]]}"
                 f" ({100 * p:.0f}%)")
    result["per_image"].append({"image": str(names[i]), "file": os.path.basename(path),
                                "label": classes[labels[i]],
                                "prediction": classes[pred["class"][i]], "probability": p,
                                "misclassified": kind == "wrong"})
  return result


def localisation(cams: np.ndarray, masks: dict) -> dict:
  """Per-image localisation scores of the true class's maps `cams` (one per test image):
  pointing game and energy in the lesion (images with a lesion), energy in the lungs
  (images with a lung mask), and each mask's share of the image (the chance level: what a
  uniform map would score)."""
  out = {}
  lesion, lung = masks["has_lesion"], masks["has_lung"]
  if lesion.any():
    out["pointing_game"] = gradcam.pointing_game(cams[lesion], masks["lesion"][lesion])
    out["energy_in_lesion"] = gradcam.energy_inside(cams[lesion], masks["lesion"][lesion])
    out["lesion_area"] = masks["lesion"][lesion].mean(axis=(1, 2))
  if lung.any():
    out["energy_in_lungs"] = gradcam.energy_inside(cams[lung], masks["lung"][lung])
    out["lung_area"] = masks["lung"][lung].mean(axis=(1, 2))
  return out


def summarise(fold_results: list[dict]) -> dict:
  """Mean, sd and count of each audit score over all folds' images; `undefined` counts the
  images whose map was all zero (no score). `lesion_area` / `lung_area` (the masks' share of
  the image) are the chance level of the pointing game and of the energy shares: what a
  uniform map would score."""
  out = {}
  for key in ("pointing_game", "energy_in_lesion", "energy_in_lungs", "randomisation_spearman",
              "lesion_area", "lung_area"):
    values = np.concatenate([np.asarray(r[key]) for r in fold_results if key in r] or [[]])
    defined = values[~np.isnan(values)]
    if len(values):
      out[key] = {"mean": float(defined.mean()) if len(defined) else float("nan"),
                  "sd": float(defined.std()) if len(defined) else float("nan"),
                  "images": len(defined), "undefined": int(len(values) - len(defined))}
  return out


def _safe(name) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[-80:]


def save_overlay(path: str, image: np.ndarray, cam: np.ndarray, lesion: np.ndarray | None,
                 title: str) -> None:
  """The image beside its heat-map overlay (the `lesion` mask outlined unless None), with a
  title, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(5, 2.9), dpi=100)
  grey = image if image.dtype == np.uint8 else (np.asarray(image) + 1) / 2
  axes[0].imshow(grey, cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
  axes[1].imshow(gradcam.overlay(image, cam, lesion=lesion),
                 interpolation="nearest")
  for ax in axes:
    ax.axis("off")
  fig.suptitle(title, fontsize=7)
  fig.tight_layout()
  files.write_with(path, fig.savefig)
  plt.close(fig)

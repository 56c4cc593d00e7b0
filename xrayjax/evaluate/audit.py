"""Grad-CAM on a fold's test images: the gallery, localisation scores and the sanity check.

- Gallery: for a configurable sample per class and for every misclassified image, a PNG with
  the image beside its Grad-CAM overlay for the predicted class, titled with the label, the
  prediction and its probability.
- Localisation, with the map of the *true* class (what the model should have looked at):
  the pointing game (is the map's peak inside the lesion?) and the fraction of the map's
  energy inside the lesion (synthetic lesion masks, NIH / RSNA boxes) and inside the lungs
  (lung masks).
- Model randomisation (Adebayo et al. 2018): the layers of the last conv block and the head
  are re-initialised and the maps recomputed for the same classes; the Spearman rank
  correlation with the trained network's maps is reported. Maps that barely change would
  not be explaining what the network learnt.
"""

from __future__ import annotations

import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from xrayjax.evaluate import gradcam


def maps(cam_fn, variables, images: np.ndarray, classes: np.ndarray, batch: int) -> dict:
  """Grad-CAM of every image in batches of `batch` (the last one padded): cam, class, probs."""
  out = {"cam": [], "class": [], "probs": []}
  for s in range(0, len(images), batch):
    x, c = images[s:s + batch], classes[s:s + batch]
    n = len(x)
    if n < batch:  # one compiled shape
      x = np.concatenate([x, np.zeros((batch - n,) + x.shape[1:], x.dtype)])
      c = np.concatenate([c, np.zeros(batch - n, c.dtype)])
    r = jax.device_get(cam_fn(variables, jnp.asarray(x), jnp.asarray(c)))
    out["cam"].append(np.asarray(r["cam"])[:n])
    out["class"].append(np.asarray(r["class"])[:n])
    out["probs"].append(np.asarray(jax.nn.softmax(r["logits"]))[:n])
  return {k: np.concatenate(v) for k, v in out.items()}


def randomised_top(model, variables, image_size: int, groups: dict, seed: int) -> dict:
  """`variables` with the last conv block and head re-initialised (fresh random weights)."""
  fresh = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 1)),
                     train=False)
  pattern = re.compile(f"{groups['last_conv_block']}|{groups['head']}")
  out = {}
  for col in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(jax.device_get(variables.get(col, {})), sep="/")
    new = flax.traverse_util.flatten_dict(jax.device_get(fresh.get(col, {})), sep="/")
    out[col] = flax.traverse_util.unflatten_dict(
        {k: (new[k] if pattern.search(k) else v) for k, v in flat.items()}, sep="/")
  return out


def explain_fold(*, model, variables, images: np.ndarray, labels: np.ndarray,
                 masks: dict, classes, cfg, groups: dict, out_dir: str, names: np.ndarray,
                 fold: int, seed: int, sanity: bool) -> dict:
  """Grad-CAM audit of one fold's test images (normalised [n, s, s, 1], true labels)."""
  cam_fn = gradcam.make_fn(model, cfg.target, cfg.method)
  pred = maps(cam_fn, variables, images, np.full(len(images), -1, np.int32), cfg.batch_size)
  true = maps(cam_fn, variables, images, labels.astype(np.int32), cfg.batch_size)
  result = {"fold": fold, "target": cfg.target, "method": cfg.method, "per_image": []}
  lesion, lung = masks["has_lesion"], masks["has_lung"]
  # Each score's chance level: what a uniform map would get (the mask's share of the image).
  if lesion.any():
    result["pointing_game"] = gradcam.pointing_game(true["cam"][lesion], masks["lesion"][lesion])
    result["energy_in_lesion"] = gradcam.energy_inside(true["cam"][lesion],
                                                       masks["lesion"][lesion])
    result["lesion_area"] = masks["lesion"][lesion].mean(axis=(1, 2))
  if lung.any():
    result["energy_in_lungs"] = gradcam.energy_inside(true["cam"][lung], masks["lung"][lung])
    result["lung_area"] = masks["lung"][lung].mean(axis=(1, 2))
  if sanity:
    rand = randomised_top(model, variables, images.shape[1], groups, seed)
    again = maps(cam_fn, rand, images, pred["class"].astype(np.int32), cfg.batch_size)
    result["randomisation_spearman"] = gradcam.rank_similarity(pred["cam"], again["cam"])
  # Gallery: a sample per class (seeded) and every misclassified image.
  rng = np.random.default_rng(seed)
  chosen = set()
  for c in range(len(classes)):
    idx = np.flatnonzero(labels == c)
    chosen.update(rng.permutation(idx)[:cfg.per_class].tolist())
  wrong = set(np.flatnonzero(pred["class"] != labels).tolist())
  if cfg.misclassified:
    chosen.update(wrong)
  os.makedirs(out_dir, exist_ok=True)
  for i in sorted(chosen):
    kind = "wrong" if i in wrong else "sample"
    path = os.path.join(out_dir, f"fold{fold}_{kind}_{_safe(names[i])}.png")
    p = float(pred["probs"][i, pred["class"][i]])
    save_overlay(path, images[i, ..., 0], pred["cam"][i],
                 f"{names[i]}\ntruth {classes[labels[i]]} | predicted {classes[pred['class'][i]]}"
                 f" ({100 * p:.0f}%)")
    result["per_image"].append({"image": str(names[i]), "file": os.path.basename(path),
                                "label": classes[labels[i]],
                                "prediction": classes[pred["class"][i]], "probability": p,
                                "misclassified": kind == "wrong"})
  return result


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


def save_overlay(path: str, image: np.ndarray, cam: np.ndarray, title: str) -> None:
  """The image beside its heat-map overlay, with a title, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(5, 2.9), dpi=100)
  grey = image if image.dtype == np.uint8 else (np.asarray(image) + 1) / 2
  axes[0].imshow(grey, cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
  axes[1].imshow(gradcam.overlay(image, cam))
  for ax in axes:
    ax.axis("off")
  fig.suptitle(title, fontsize=7)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)

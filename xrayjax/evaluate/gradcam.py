"""Grad-CAM (Selvaraju et al. 2017), Grad-CAM++ (Chattopadhay et al. 2018) and HiResCAM
(Draelos & Carin 2020) in JAX.

Any named entry of a model's `out` can be the target map (default `features`, the last conv
block; for `concat` also `xception`, `resnet50v2`, `concat` and each branch's own maps by
path, e.g. `xception/block3`, `resnet50v2/conv2`). Every model records its maps through
`models.common.record`, a Flax `perturb` tap, so the gradient of a class score with respect
to the map is `jax.grad` with respect to that tap: no second model, no hooks.

The class score is the pre-softmax logit, as in the paper. The map for image i and class c:

  Grad-CAM:   w_k = mean_ij dy/dA_ijk,              cam = relu(sum_k w_k A_k)
  Grad-CAM++: a_ijk = g^2 / (2 g^2 + sum_ab A_abk g^3), w_k = sum_ij a_ijk relu(g_ijk)
              (g = dy/dA; the closed form for an exponential score, as the paper derives)
  HiResCAM:   cam = relu(sum_k g_k * A_k)  (the gradient kept per position, not averaged:
              for a flatten + dense head, Grad-CAM's average mixes the weights of every
              position into every other, and the map need not show what raised the score;
              for a global-average-pooling + linear head the two are the same)

With a reference map R (the target map's mean over a set of reference images, e.g. the
training images of the normal class; audit.reference_map) every form combines A - R instead
of A (HiResCAM: cam = relu(sum_k g_k * (A_k - R_k)), the first-order Taylor term of the score
against the reference, as DeepLIFT and integrated gradients measure against a baseline).
Plain maps are the case R = 0: they credit only activations that are present, so evidence a
network carries by switching activations *off* (measured for a DETL seed, docs/detl.md) earns
no credit, and the map's peak slides to the lesion's rim.

Maps are upsampled (bilinear) to the input size and scaled to [0, 1] per image (all zero if
the map is all zero). One jitted call handles a batch; BatchNorm runs in inference mode.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from xrayjax.models.common import TAP

METHODS = ("gradcam", "gradcam++", "hirescam")


def _taps(perturbations) -> dict:
  """{target name: tap path}: a tap `tap_<name>` of a submodule `sub` is target `sub/<name>`."""
  out = {}
  for path in flax.traverse_util.flatten_dict(perturbations):
    if path[-1].startswith(TAP):
      out["/".join(path[:-1] + (path[-1][len(TAP):],))] = path
  return out


def targets(model, variables, image_size: int) -> list[str]:
  """The maps Grad-CAM can target for this model."""
  shapes = jax.eval_shape(lambda: model.apply(
      variables, jnp.zeros((1, image_size, image_size, 1)), train=False,
      mutable=["perturbations"])[1]["perturbations"])
  return list(_taps(shapes))


@functools.lru_cache(maxsize=8)  # one compiled function per model, target and method
def make_fn(model, target: str = "features", method: str = "gradcam"):
  """-> jitted fn(variables, batch, reference=None) -> {"cam" [B, H, W] in [0, 1], "probs"
  [B, C], "class" [B], "map" [B, h, w] (unscaled)}, for infer.batched (bind a reference
  with functools.partial).

  `batch["image"]` [B, H, W, 1] normalised; `batch["class"]` [B] is the class to explain
  (-1 or absent: the predicted one); `reference` [h, w, K] the target map's reference R.
  """
  if method not in METHODS:
    raise ValueError(f"unknown Grad-CAM method {method!r}; valid: {METHODS}")

  @jax.jit
  def fn(variables, batch, reference=None):
    images = batch["image"]
    classes = batch.get("class", jnp.full(images.shape[:1], -1, jnp.int32))
    shapes = jax.eval_shape(lambda: model.apply(variables, images, train=False,
                                                mutable=["perturbations"])[1]["perturbations"])
    taps = _taps(shapes)
    if target not in taps:
      raise ValueError(f"{type(model).__name__} has no map {target!r} to explain; valid "
                       f"targets: {list(taps)}")
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    path = taps[target]

    def score(perturbations):
      logits, out = model.apply({**variables, "perturbations": perturbations}, images,
                                train=False)
      chosen = jnp.where(classes >= 0, classes, jnp.argmax(logits, -1))
      picked = jnp.take_along_axis(logits, chosen[:, None], axis=1)
      return picked.sum(), (logits, out[target], chosen)

    grads, (logits, fmap, chosen) = jax.grad(score, has_aux=True)(zeros)
    g = flax.traverse_util.flatten_dict(grads)[path].astype(jnp.float32)
    a = fmap.astype(jnp.float32)
    shifted = a if reference is None else a - reference.astype(jnp.float32)
    if method == "hirescam":
      cam = jax.nn.relu((g * shifted).sum(-1))
    else:
      if method == "gradcam":
        weights = g.mean(axis=(1, 2))
      else:
        g2, g3 = g * g, g * g * g
        denom = 2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g3
        alpha = g2 / jnp.where(denom != 0, denom, 1.0)
        weights = (alpha * jax.nn.relu(g)).sum(axis=(1, 2))
      cam = jax.nn.relu(jnp.einsum("bhwk,bk->bhw", shifted, weights))
    up = jax.image.resize(cam, (cam.shape[0],) + images.shape[1:3], "bilinear")
    up = jax.nn.relu(up)
    top = up.max(axis=(1, 2), keepdims=True)
    return {"cam": jnp.where(top > 0, up / jnp.where(top > 0, top, 1.0), 0.0),
            "probs": jax.nn.softmax(logits.astype(jnp.float32)), "class": chosen, "map": cam}

  return fn


@functools.lru_cache(maxsize=8)
def make_sum_fn(model, targets: tuple[str, ...]):
  """-> jitted fn(variables, batch) -> {target: the sum of its map over the batch's real
  (mask = 1) images [h, w, K]}, every target from one forward pass: for reference maps."""

  @jax.jit
  def fn(variables, batch):
    _, out = model.apply(variables, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    return {t: jnp.einsum("bhwk,b->hwk", out[t].astype(jnp.float32), mask) for t in targets}

  return fn


# --- audits ------------------------------------------------------------------------------------


def pointing_game(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """1 where the heat map's maximum falls inside the mask, per image ([B, H, W] each); nan
  for an all-zero map (it points nowhere)."""
  flat = cams.reshape(len(cams), -1)
  peak = flat.argmax(-1)
  hit = masks.reshape(len(masks), -1)[np.arange(len(masks)), peak].astype(np.float64)
  return np.where(flat.max(-1) > 0, hit, np.nan)


def energy_inside(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Fraction of each heat map's total (sum) that lies inside the mask (nan if all zero)."""
  total = cams.sum(axis=(1, 2))
  inside = (cams * (masks > 0)).sum(axis=(1, 2))
  return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def rank_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Spearman rank correlation per pair of maps (Adebayo et al.'s sanity-check measure)."""
  from scipy import stats
  out = []
  for x, y in zip(a, b):
    if np.ptp(x) == 0 or np.ptp(y) == 0:
      out.append(np.nan)
    else:
      out.append(stats.spearmanr(x.ravel(), y.ravel()).statistic)
  return np.array(out, np.float64)


@functools.lru_cache(maxsize=None)
def _colormap():
  import matplotlib
  return matplotlib.colormaps["jet"]


OUTLINE = (0, 255, 0)  # the lesion outline's colour (jet blended with grey never hits it)


def outline(mask: np.ndarray) -> np.ndarray:
  """The boundary pixels of a boolean mask [H, W] (in the mask, with a 4-neighbour outside)."""
  from scipy import ndimage
  mask = np.asarray(mask, bool)
  return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4,
            lesion: np.ndarray | None = None) -> np.ndarray:
  """Grey image [H, W] (uint8, or float in [-1, 1] as the model sees it) + heat map [H, W]
  in [0, 1] -> RGB uint8; `lesion` (a boolean mask [H, W]: synthetic lesion masks, NIH /
  RSNA boxes) is drawn as an OUTLINE over the heat map, so a reader sees whether it hits."""
  image = np.asarray(image)
  grey = image / 255 if image.dtype == np.uint8 else (image.astype(np.float64) + 1) / 2
  rgb = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
  heat = _colormap()(np.clip(cam, 0, 1))[..., :3]
  out = np.round(255 * ((1 - alpha) * rgb + alpha * heat)).astype(np.uint8)
  if lesion is not None:
    out[outline(lesion)] = OUTLINE
  return out

"""Procedural chest X-ray phantom: anatomy, clinically placed findings, sites.

Pure numpy, deterministic given a `numpy.random.Generator`. The TFDS builder
`synthetic_cxr` calls `render` once per image; nothing here knows about TFDS.

Image geometry is in normalised coordinates: x runs 0..1 from the image's left
(the patient's right, as in a PA film) to its right, y runs 0..1 top to bottom.
The phantom is drawn as a density map (0 air, ~1 bone), then mapped to grey
levels through the site's exposure curve, plus quantum and scatter noise.

Findings are drawn where they occur clinically:
  pneumonia (bacterial, lobar): a dense, homogeneous consolidation bounded by a
    fissure in one lung (sometimes a patchy multifocal bronchopneumonia);
  covid: faint ground-glass patches, bilateral, peripheral, lower zone;
  other_disease: cardiomegaly, pleural effusion (meniscus at the costophrenic
    angle), nodule, mass, or plate atelectasis with an elevated hemidiaphragm.
Each finding comes with a severity in (0, 1]; mild cases are hard to see, which
keeps accuracy informative.

Every finding is drawn onto a copy of the patient's healthy film and both share one
acquisition (the same exposure and noise), so `render` also returns the counterfactual
healthy film, and the lesion mask is exactly where the two differ visibly. The classes
differ only inside their masks: no class cue (exposure, noise, view, site, positioning)
lies outside the findings (tests/test_synthetic.py measures it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

CLASSES = ("normal", "pneumonia", "other_disease", "covid")
# Finding names follow NIH ChestX-ray14 where one exists, so tasks can treat
# synthetic and real findings alike.
OTHER_FINDINGS = ("Cardiomegaly", "Effusion", "Nodule", "Mass", "Atelectasis")
VIEWS = ("PA", "AP")
# A finding's mask is where it changes the noise-free film by at least this much (2 grey
# levels): outside it the film with the finding and without it differ by less than the
# 8-bit rounding, and a probe cannot tell the classes apart there (tests/test_synthetic.py).
VISIBLE = 2 / 255


@dataclasses.dataclass(frozen=True)
class Site:
  """An acquisition site: exposure curve, noise level and corner marker."""
  gamma: float
  contrast: float
  offset: float
  noise: float
  marker_corner: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right


SITES = (
    Site(gamma=1.00, contrast=1.00, offset=0.00, noise=0.025, marker_corner=0),
    Site(gamma=0.75, contrast=0.90, offset=0.06, noise=0.035, marker_corner=1),
    Site(gamma=1.35, contrast=1.10, offset=-0.04, noise=0.020, marker_corner=3),
    Site(gamma=0.90, contrast=0.80, offset=0.10, noise=0.045, marker_corner=2),
)


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """Per-patient anatomy; images of one patient share it (up to positioning)."""
  body_rx: float
  lung_dx: float
  lung_rx: float
  lung_ry: float
  lung_cy: float
  dome_right: float
  dome_left: float
  heart_rx: float
  heart_ry: float
  rib_phase: float
  rib_spacing: float


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
  return Anatomy(
      body_rx=rng.uniform(0.40, 0.47),
      lung_dx=rng.uniform(0.185, 0.215),
      lung_rx=rng.uniform(0.125, 0.15),
      lung_ry=rng.uniform(0.27, 0.31),
      lung_cy=rng.uniform(0.44, 0.48),
      dome_right=rng.uniform(0.70, 0.74),
      dome_left=rng.uniform(0.72, 0.76),
      heart_rx=rng.uniform(0.135, 0.155),
      heart_ry=rng.uniform(0.11, 0.13),
      rib_phase=rng.uniform(0, 1),
      rib_spacing=rng.uniform(0.075, 0.09),
  )


def _soft(signed: np.ndarray, width: float) -> np.ndarray:
  """Soft indicator of `signed > 0` with an edge `width` wide."""
  return 1.0 / (1.0 + np.exp(-np.clip(signed / width, -30, 30)))


def _ellipse(x, y, cx, cy, rx, ry, width=0.01, power=2.0):
  r = (np.abs((x - cx) / rx) ** power + np.abs((y - cy) / ry) ** power) ** (1 / power)
  return _soft(1.0 - r, width / min(rx, ry))


def _smooth_noise(rng, size: int, sigma: float) -> np.ndarray:
  """Unit-variance smooth noise; `sigma` is a fraction of the image size."""
  n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma * size, mode="wrap")
  return (n / (n.std() + 1e-8)).astype(np.float32)


def _lungs(x, y, a: Anatomy, edge: float):
  """Soft masks of the right (image-left) and left (image-right) lung fields."""
  masks = []
  for side, dome in ((-1, a.dome_right), (1, a.dome_left)):
    cx = 0.5 + side * a.lung_dx
    field = _ellipse(x, y, cx, a.lung_cy, a.lung_rx, a.lung_ry, edge, power=2.6)
    # Diaphragm dome: the lung ends on a curve, highest at mid-hemithorax.
    dome_y = dome + 1.6 * (x - cx) ** 2 / a.lung_rx * 0.35
    masks.append(field * _soft(dome_y - y, edge))
  return masks


def _draw_lobar(rng, x, y, lung, side_cx, a, noise):
  """Lobar consolidation: the lung beyond a fissure line, patchy edge."""
  upper = rng.random() < 0.35
  tilt = rng.uniform(-0.3, 0.3)
  fissure = a.lung_cy + rng.uniform(-0.06, 0.08) + tilt * (x - side_cx)
  side = (fissure - y) if upper else (y - fissure)
  lobe = _soft(side + 0.03 * noise, 0.015)
  return lobe * lung * (0.85 + 0.15 * noise)


def _draw_blobs(rng, x, y, centers, radii, noise, edge=0.02):
  out = np.zeros_like(x)
  for (cx, cy), r in zip(centers, radii):
    out = np.maximum(out, _ellipse(x, y, cx, cy, r, r * rng.uniform(0.7, 1.3), edge))
  return out * np.clip(0.7 + 0.5 * noise, 0, 1)


def render(rng: np.random.Generator, *, size: int, label: str, anatomy: Anatomy,
           site: Site, view: str, severity: float, finding: str | None) -> dict:
  """Draws one image, and the same film without its finding.

  The finding is drawn onto a copy of the patient's healthy density map; both go through
  the same acquisition (exposure curve, the same noise), so `healthy` is the counterfactual
  film: identical except where the finding is. `lesion_mask` is where the finding changes
  the noise-free film by at least VISIBLE (2 grey levels), plus the heart for cardiomegaly
  (the enlarged organ is the finding), so no visible trace of it lies outside the mask.

  Args:
    rng: source of all randomness for this image.
    size: output side in pixels.
    label: one of CLASSES.
    anatomy: the patient's anatomy.
    site: acquisition site (exposure curve, noise, marker).
    view: "PA" or "AP" (AP magnifies the heart and lowers the inspiration).
    severity: finding strength in (0, 1]; ignored for normal.
    finding: for other_disease, one of OTHER_FINDINGS.

  Returns:
    dict of uint8 arrays `image`, `healthy`, `lesion_mask`, `lung_mask` (size x size).
  """
  g = (np.arange(size, dtype=np.float32) + 0.5) / size
  x0, y0 = np.meshgrid(g, g)
  # Positioning: small rotation, shift and magnification per image.
  th = np.deg2rad(rng.uniform(-4, 4))
  s = rng.uniform(0.94, 1.06)
  tx, ty = rng.uniform(-0.03, 0.03, size=2)
  xc, yc = x0 - 0.5, y0 - 0.5
  x = (np.cos(th) * xc - np.sin(th) * yc) / s + 0.5 + tx
  y = (np.sin(th) * xc + np.cos(th) * yc) / s + 0.5 + ty
  edge = 0.012
  if view == "AP":  # shallower inspiration, magnified heart
    anatomy = dataclasses.replace(anatomy, lung_ry=anatomy.lung_ry * 0.95,
                                  heart_rx=anatomy.heart_rx * 1.08,
                                  heart_ry=anatomy.heart_ry * 1.05)
  # The textures (vessels, finding patchiness) are drawn once and shared by both films.
  vessel_noise = np.abs(_smooth_noise(rng, size, 0.012))
  noise = _smooth_noise(rng, size, 0.03)
  healthy, parts = _anatomy(x, y, anatomy, edge, vessel_noise)
  # Findings that change the anatomy itself (heart size, diaphragm height) redraw it.
  a = anatomy
  if label == "other_disease" and finding == "Cardiomegaly":
    grow = 1.22 + 0.25 * severity
    a = dataclasses.replace(a, heart_rx=a.heart_rx * grow,
                            heart_ry=a.heart_ry * (1 + (grow - 1) * 0.6))
  if label == "other_disease" and finding == "Atelectasis":
    side = rng.choice((-1, 1))
    lift = 0.02 + 0.04 * severity
    a = dataclasses.replace(a, **({"dome_right": a.dome_right - lift} if side < 0 else
                                  {"dome_left": a.dome_left - lift}))
  density, parts = (healthy.copy(), parts) if a is anatomy else _anatomy(x, y, a, edge,
                                                                          vessel_noise)
  lung_r, lung_l, lungs, heart, body = (parts[k] for k in ("lung_r", "lung_l", "lungs",
                                                           "heart", "body"))
  organ = np.zeros_like(x)  # an organ that is itself the finding (cardiomegaly: the heart)

  # --- findings ----------------------------------------------------------------
  if label == "pneumonia":
    if rng.random() < 0.8:
      side = rng.choice((-1, 1))
      lung = lung_r if side < 0 else lung_l
      lesion = _draw_lobar(rng, x, y, lung, 0.5 + side * a.lung_dx, a, noise)
    else:  # multifocal bronchopneumonia: a few dense patches, any zone
      n = rng.integers(2, 4)
      sides = rng.choice((-1, 1), size=n)
      centers = [(0.5 + sd * a.lung_dx + rng.uniform(-0.5, 0.5) * a.lung_rx,
                  a.lung_cy + rng.uniform(-0.5, 0.6) * a.lung_ry) for sd in sides]
      lesion = _draw_blobs(rng, x, y, centers, rng.uniform(0.05, 0.09, size=n), noise) * lungs
    density += (0.14 + 0.22 * severity) * lesion
  elif label == "covid":
    centers, radii = [], []
    sides = [-1, 1] if rng.random() < 0.85 else [rng.choice((-1, 1))]
    for sd in sides:
      for _ in range(rng.integers(1, 4)):
        cx = 0.5 + sd * (a.lung_dx + rng.uniform(0.35, 0.8) * a.lung_rx)  # periphery
        cy = a.lung_cy + rng.uniform(0.0, 0.75) * a.lung_ry  # lower zones
        centers.append((cx, cy))
        radii.append(rng.uniform(0.05, 0.09))
    lesion = _draw_blobs(rng, x, y, centers, radii, noise, edge=0.015) * lungs
    density += (0.10 + 0.14 * severity) * lesion  # ground glass: faint, vessels stay visible
  elif label == "other_disease":
    if finding == "Cardiomegaly":
      organ = heart
    elif finding == "Effusion":
      side = rng.choice((-1, 1))
      lung = lung_r if side < 0 else lung_l
      dome = a.dome_right if side < 0 else a.dome_left
      level = dome - (0.06 + 0.12 * severity)
      lateral = np.clip(side * (x - 0.5) - a.lung_dx, 0, None)
      meniscus = level - 0.6 * lateral  # fluid climbs the lateral chest wall
      density += 0.34 * _soft(y - meniscus, 0.01) * lung
    elif finding in ("Nodule", "Mass"):
      side = rng.choice((-1, 1))
      cx = 0.5 + side * (a.lung_dx + rng.uniform(-0.5, 0.6) * a.lung_rx)
      cy = a.lung_cy + rng.uniform(-0.6, 0.5) * a.lung_ry
      r = rng.uniform(0.025, 0.04) if finding == "Nodule" else rng.uniform(0.05, 0.08)
      lesion = _draw_blobs(rng, x, y, [(cx, cy)], [r], np.ones_like(x) * 0.6, edge=0.006) * lungs
      density += (0.18 + 0.2 * severity) * lesion
    elif finding == "Atelectasis":
      side = rng.choice((-1, 1))
      cx = 0.5 + side * (a.lung_dx + rng.uniform(-0.3, 0.3) * a.lung_rx)
      cy = (a.dome_right if side < 0 else a.dome_left) - rng.uniform(0.06, 0.12)
      ang = rng.uniform(-0.3, 0.3)
      u = (x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)
      v = -(x - cx) * np.sin(ang) + (y - cy) * np.cos(ang)
      lesion = _soft(1 - np.sqrt((u / 0.1) ** 2 + (v / 0.016) ** 2), 0.15) * lungs
      density += (0.18 + 0.18 * severity) * lesion
    else:
      raise ValueError(f"unknown finding {finding!r}; expected one of {OTHER_FINDINGS}")
  # A calcified granuloma is a normal variant in any class: a distractor for nodules.
  if rng.random() < 0.15:
    gx = 0.5 + rng.choice((-1, 1)) * (a.lung_dx + rng.uniform(-0.5, 0.5) * a.lung_rx)
    gy = a.lung_cy + rng.uniform(-0.5, 0.5) * a.lung_ry
    granuloma = 0.3 * _ellipse(x, y, gx, gy, 0.007, 0.007, 0.003) * lungs
    density += granuloma
    healthy += granuloma

  # --- acquisition ---------------------------------------------------------------
  exposure = rng.uniform(0.9, 1.1)
  film = lambda d: np.clip(d * exposure * site.contrast + site.offset, 0, 1) ** site.gamma
  img, img_healthy = film(density), film(healthy)
  changed = np.abs(img - img_healthy) >= VISIBLE
  lesion_mask = changed | (organ > 0.5)
  grain = site.noise * rng.standard_normal(img.shape) + 0.02 * _smooth_noise(rng, size, 0.1)
  return {
      "image": _to_uint8(_add_marker(img + grain, site.marker_corner, size)),
      "healthy": _to_uint8(_add_marker(img_healthy + grain, site.marker_corner, size)),
      "lesion_mask": lesion_mask.astype(np.uint8),
      "lung_mask": (lungs > 0.5).astype(np.uint8),
  }


def _anatomy(x, y, a: Anatomy, edge: float, vessel_noise: np.ndarray):
  """The healthy density map (0 air, ~1 bone) of anatomy `a`, and its parts."""
  body = _ellipse(x, y, 0.5, 0.62, a.body_rx, 0.55, 0.03, power=3.0)
  shoulders = _ellipse(x, y, 0.5, 0.18, a.body_rx + 0.06, 0.10, 0.03)
  body = np.maximum(body, shoulders)
  lung_r, lung_l = _lungs(x, y, a, edge)
  heart_cx = 0.5 + 0.05
  heart = _ellipse(x, y, heart_cx, a.dome_left - a.heart_ry * 0.55, a.heart_rx, a.heart_ry, edge)
  lungs = np.clip(lung_r + lung_l - heart, 0, 1)
  mediastinum = _soft(0.055 - np.abs(x - 0.5), 0.01) * _soft(y - 0.12, 0.02)
  abdomen = _soft(y - np.minimum(a.dome_right, a.dome_left) - 0.02, 0.03)
  # Posterior ribs: arcs across each hemithorax; clavicles: two slanted bars.
  arc = y - 0.9 * (x - 0.5) ** 2
  ribs = 0.5 + 0.5 * np.cos(2 * np.pi * ((arc - a.rib_phase * a.rib_spacing) / a.rib_spacing))
  ribs = (ribs ** 6) * _soft(np.abs(x - 0.5) - 0.06, 0.01) * _soft(0.8 - y, 0.03)
  clavicles = sum(
      _soft(0.012 - np.abs(y - (0.2 + 0.25 * side * (x - 0.5) - 0.02)), 0.004)
      * _soft(0.3 - side * (x - 0.5), 0.01) * _soft(side * (x - 0.5) - 0.02, 0.01)
      for side in (-1, 1))
  hilum = sum(np.exp(-(((x - 0.5 - sd * 0.09) / 0.12) ** 2 + ((y - 0.45) / 0.14) ** 2))
              for sd in (-1, 1))
  density = 0.52 * body + 0.12 * mediastinum + 0.25 * abdomen * body
  density = density - 0.36 * lungs + 0.22 * heart * (1 - lungs)
  density += 0.10 * ribs * body + 0.14 * clavicles + 0.05 * vessel_noise * hilum * lungs
  return density, {"lung_r": lung_r, "lung_l": lung_l, "lungs": lungs, "heart": heart,
                   "body": body}


def _add_marker(img: np.ndarray, corner: int, size: int) -> np.ndarray:
  """Burns a lead-marker-like 'L' into a corner (what shortcut models latch onto)."""
  img = img.copy()
  m = max(size // 16, 4)
  t = max(m // 4, 1)
  pad = max(size // 32, 2)
  r0 = pad if corner in (0, 1) else size - pad - m
  c0 = pad if corner in (0, 2) else size - pad - m
  img[r0:r0 + m, c0:c0 + t] = 1.0
  img[r0 + m - t:r0 + m, c0:c0 + m] = 1.0
  return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)

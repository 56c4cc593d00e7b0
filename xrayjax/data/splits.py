"""Splits computed on metadata only: cohorts, folds, validation carves, checks.

All functions take per-image arrays (task label, patient id) and return image
indices; they are deterministic given the seed. The corrected protocol groups
by patient everywhere; the paper protocol splits images as the papers did
(patients can leak across partitions; that is the point of reproducing it).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import model_selection

from xrayjax import sharding


def kfold(labels: np.ndarray, patients: np.ndarray, k: int, seed: int,
          grouped: bool = True) -> list[np.ndarray]:
  """Stratified k-fold; returns the test indices of each fold (a partition).

  Args:
    labels: task class index per image.
    patients: patient id per image (used when `grouped`).
    k: number of folds.
    seed: shuffling seed.
    grouped: keep every patient's images in one fold (corrected protocol).

  Returns:
    k sorted index arrays; every image is in exactly one of them.
  """
  n = len(labels)
  if grouped and len(np.unique(patients)) < k or n < k:
    raise ValueError(f"cannot make {k} folds from {n} images of {len(np.unique(patients))} "
                     "patients; lower `folds` or add data")
  if grouped:
    splitter = model_selection.StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  else:
    splitter = model_selection.StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
  folds = [np.sort(test) for _, test in
           splitter.split(np.zeros(n), labels, patients if grouped else None)]
  check_folds(folds, n)
  return folds


def carve(indices: np.ndarray, labels: np.ndarray, patients: np.ndarray, fraction: float,
          seed: int, grouped: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Splits `indices` into (rest, carved), carving about `fraction`, stratified.

  Used for the validation split carved from a fold's training patients.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  k = max(2, int(round(1 / fraction)))
  folds = kfold(labels[indices], patients[indices], k, seed, grouped)
  carved = indices[folds[0]]
  rest = np.setdiff1d(indices, carved)
  return rest, np.sort(carved)


def sample_patients(candidates: np.ndarray, patients: np.ndarray, target_images: int,
                    rng: np.random.Generator) -> np.ndarray:
  """Whole patients, in random order, until `target_images` images are taken.

  A patient whose images would overshoot the target is skipped, so the count is
  at most the target; 0 or a target above the supply takes every candidate.
  """
  by_patient = collections.defaultdict(list)
  for i in candidates:
    by_patient[patients[i]].append(i)
  order = sorted(by_patient)
  rng.shuffle(order)
  if target_images <= 0 or target_images >= len(candidates):
    return np.sort(np.asarray(candidates))
  taken: list[int] = []
  for p in order:
    if len(taken) + len(by_patient[p]) <= target_images:
      taken.extend(by_patient[p])
    if len(taken) == target_images:
      break
  return np.sort(np.asarray(taken, dtype=np.int64))


def check_disjoint_patients(parts: dict[str, np.ndarray], patients: np.ndarray) -> None:
  """Fails loudly if any patient has images in two of the named partitions."""
  seen: dict[str, str] = {}
  for name, idx in parts.items():
    for p in np.unique(patients[idx]):
      if p in seen and seen[p] != name:
        raise AssertionError(f"patient {p!r} is in both {seen[p]!r} and {name!r}: the split "
                             "leaks patients across partitions")
      seen[p] = name


def check_folds(folds: list[np.ndarray], n: int) -> None:
  """Fails loudly unless every image 0..n-1 is evaluated exactly once over the folds."""
  counts = np.bincount(np.concatenate(folds).astype(np.int64), minlength=n) if folds else \
      np.zeros(n, np.int64)
  if len(counts) != n or np.any(counts != 1):
    bad = np.flatnonzero(counts != 1)[:5]
    raise AssertionError(f"folds are not a partition of {n} images: images {bad.tolist()} are "
                         f"evaluated {counts[bad].tolist()} times")


# --- duplicates -------------------------------------------------------------------------------


def _hash_words(phash: np.ndarray) -> np.ndarray:
  """Hex perceptual hashes -> uint32 words [n, words] (all hashes must have one length)."""
  raw = [bytes.fromhex(h) for h in phash]
  width = max(len(r) for r in raw)
  raw = [r.ljust(-(-width // 4) * 4, b"\0") for r in raw]
  return np.frombuffer(b"".join(raw), np.uint32).reshape(len(raw), -1)


@functools.lru_cache(maxsize=4)
def _rows_with_pairs(max_distance: int):
  """Jitted (block [R, w], start, chunk [C, w], chunk_start, n) -> per block row, how many
  chunk hashes j > its own index i (j < n) are at most `max_distance` bits away."""
  @jax.jit
  def fn(block, start, chunk, chunk_start, n):
    dist = jnp.bitwise_count(block[:, None, :] ^ chunk[None, :, :]).astype(jnp.int32).sum(-1)
    i = start + jnp.arange(block.shape[0])[:, None]
    j = chunk_start + jnp.arange(chunk.shape[0])[None, :]
    return ((dist <= max_distance) & (j > i) & (j < n)).sum(1)

  return fn


def near_pairs(phash: np.ndarray, max_distance: int, rows: int = 1024, cols: int = 16384
               ) -> tuple[np.ndarray, np.ndarray]:
  """(i, j), i < j, of every pair of hashes at most `max_distance` bits apart (exact search).

  Every pair is compared (blocks of `rows` x `cols` in one compiled XLA loop: about 10x a
  numpy loop's speed, docs/data.md); only the few rows with a near pair are resolved here.
  """
  n = len(phash)
  if n < 2 or max_distance < 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  words = _hash_words(phash)
  padded = np.zeros((-(-n // cols) * cols + rows, words.shape[1]), np.uint32)
  padded[:n] = words
  fn = _rows_with_pairs(int(max_distance))
  ii, jj = [], []
  for start in range(0, n - 1, rows):
    block = padded[start:start + rows]
    for chunk_start in range(start // cols * cols, n, cols):
      chunk = padded[chunk_start:chunk_start + cols]
      found = np.flatnonzero(np.asarray(fn(block, start, chunk, chunk_start, n)))
      if not len(found):
        continue
      dist = np.bitwise_count(block[found, None, :] ^ chunk[None, :, :]).sum(-1)
      i, j = np.nonzero(dist <= max_distance)
      i, j = found[i] + start, j + chunk_start
      keep = (j > i) & (j < n)
      ii.append(i[keep])
      jj.append(j[keep])
  if not ii:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  i, j = np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)
  order = np.lexsort((j, i))
  return i[order], j[order]


def deduplicate(meta: dict[str, np.ndarray], max_distance: int) -> dict:
  """Finds duplicate images across every source before any split.

  Exact duplicates share the file's SHA-1; perceptual duplicates have 256-bit pHashes at most
  `max_distance` bits apart (the same picture re-encoded, resized or re-windowed, e.g. an
  ieee8023 image also in COVIDx, or one submitted under two patient ids).

  Returns:
    keep: bool per image. Of a set of exact copies the first (by position) is kept; if the
      copies disagree on their label, none is kept (the truth is unknown).
    group: split-group id per image: patients joined by a duplicate form one group, so a
      grouped split never puts two copies of a picture in different partitions.
    report: what was found, dropped and merged (JSON-ready).
  """
  from scipy.sparse import coo_matrix
  from scipy.sparse.csgraph import connected_components

  n = len(meta["image_id"])
  ident = [f"{meta['source'][k]}:{meta['image_id'][k]}" for k in range(n)]
  keep = np.ones(n, bool)
  report = {"max_distance": int(max_distance), "images": int(n), "exact_sets": [],
            "dropped": [], "merged_patients": []}
  by_sha = collections.defaultdict(list)
  for k, s in enumerate(meta["file_sha1"]):
    by_sha[s].append(k)
  src, dst = [], []
  for members in by_sha.values():
    if len(members) < 2:
      continue
    labels = sorted({str(meta["label"][k]) for k in members})
    conflict = len(labels) > 1
    dropped = members if conflict else members[1:]
    keep[dropped] = False
    report["exact_sets"].append({"images": [ident[k] for k in members], "labels": labels,
                                 "kept": None if conflict else ident[members[0]]})
    report["dropped"].extend({"image": ident[k], "reason": "conflicting labels on exact copies"
                              if conflict else f"exact copy of {ident[members[0]]}"}
                             for k in dropped)
    src += members[:-1]
    dst += members[1:]
  # Every process gets process 0's answer (one search per job, not one per process).
  i, j = sharding.from_process_0("near_pairs", lambda: near_pairs(meta["phash"], max_distance))
  report["perceptual_pairs"] = [[ident[a], ident[b]] for a, b in zip(i, j)
                                if meta["file_sha1"][a] != meta["file_sha1"][b]]
  # Images of one patient are linked too, so components are the merged patient groups.
  patients = meta["patient_id"]
  first = {}
  for k, p in enumerate(patients):
    if p in first:
      src.append(first[p])
      dst.append(k)
    first.setdefault(p, k)
  src = np.concatenate([np.asarray(src, np.int64), i])
  dst = np.concatenate([np.asarray(dst, np.int64), j])
  graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
  _, component = connected_components(graph, directed=False)
  group = np.empty(n, dtype=object)
  for c in np.unique(component):
    members = np.flatnonzero(component == c)
    names = sorted(set(patients[members]))
    group[members] = names[0]
    if len(names) > 1:
      report["merged_patients"].append(names)
  report["summary"] = {"exact_sets": len(report["exact_sets"]),
                       "perceptual_pairs": len(report["perceptual_pairs"]),
                       "dropped": len(report["dropped"]),
                       "merged_patient_groups": len(report["merged_patients"])}
  return {"keep": keep, "group": group, "report": report}

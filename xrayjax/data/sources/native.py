"""What every builder of a source in its native layout shares.

- Decoding: decode.py's `read_image` (PNG, JPEG, DICOM; also `python -m xrayjax.predict`'s).
- Skipping: a file that is missing, unreadable, truncated or blank raises `decode.SkippedImage`
  with the reason; the build goes on and lists it (`skipped`, then `build_report.json`).
  Rows are skipped the same way, with their metadata line, when they repeat an image
  another row lists (`duplicate row`) or hold bytes that are not UTF-8 (`undecodable`).
- Where rows go per task: the build report counts, for every task of data/tasks.py, the
  built rows whose label the task leaves out (per label, with their first lines) and the
  skipped rows each class lost, so a run can say why a class is empty.
- Hashes for duplicate detection before splitting (data/splits.py): decode.py's SHA-1 of the
  file's bytes and perceptual hash of the decoded image.
- Resumable builds with progress: rows are decoded in chunks; each finished chunk is kept in
  a cache beside the data dir, so a killed build restarts where it stopped. The log shows
  images done, rate and time left. The cache is removed when the build completes.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from xrayjax import files
from xrayjax.data import tasks
from xrayjax.data.sources import decode

CHUNK = 256


EXAMPLES = 5  # rows shown per label / class in build reports


def open_text(path: str):
  """A metadata file as text: UTF-8, with any other byte kept as a surrogate escape so that the
  rows holding it can be skipped with their line (`undecodable`) instead of the whole file
  failing to read."""
  return open(path, newline="", encoding="utf-8", errors="surrogateescape")


def printable(text: str) -> str:
  """`text` with non-UTF-8 bytes (surrogate escapes) shown as \\xNN, safe for logs and JSON."""
  return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def where(line) -> str:
  """A row's place in its metadata file, for messages: "line 3" or "train.txt:3"."""
  return f"line {line}" if isinstance(line, int) else str(line)


class LayoutError(ValueError):
  """A directory that does not look like the source's native layout."""


# --- rows and examples ------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  """One image as the source's metadata lists it (before decoding).

  `fields` holds the schema's label fields (label, findings names, patient_id, source, site,
  view); `boxes` are (x, y, w, h, finding) in the original image's pixels.
  """
  key: str
  path: str
  label: str
  patient_id: str
  source: str
  view: str = ""
  findings: tuple[str, ...] = ()
  site: str = ""
  boxes: tuple[tuple[float, float, float, float, str], ...] = ()
  line: int | str = ""  # where the row came from, for the build report

  def undecodable(self) -> str | None:
    """Why the row cannot be stored (a field with bytes that are not UTF-8), or None."""
    for name, value in (("path", self.key), ("label", self.label),
                        ("patient_id", self.patient_id), ("source", self.source),
                        ("view", self.view)):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
        return (f"undecodable {name}: {raw!r} is not UTF-8 (re-save the metadata file as "
                "UTF-8, or rename the file)")
    return None


def split_repeats(rows: list[Row]) -> tuple[list[Row], list[tuple[Row, str]]]:
  """(rows with one row per key, the repeats with their reasons).

  A key listed twice with the same label and patient keeps its first row; when the rows
  disagree on either, which one is right is unknown, so every row of that key is left out
  (as duplicate detection leaves out exact copies with conflicting labels).
  """
  by_key: dict[str, list[Row]] = {}
  for r in rows:
    by_key.setdefault(r.key, []).append(r)
  kept, rejected = [], []
  for key, group in by_key.items():
    first = group[0]
    if len(group) == 1:
      kept.append(first)
      continue
    if all(isinstance(r.line, int) for r in group):
      places = "lines " + ", ".join(str(r.line) for r in group)
    else:
      places = ", ".join(where(r.line) for r in group)
    if len({(r.label, r.patient_id) for r in group}) > 1:
      told = "; ".join(f"{where(r.line)}: label {r.label!r}, patient {r.patient_id!r}"
                       for r in group)
      rejected += [(r, f"duplicate row with conflicting labels or patients: {printable(key)!r} "
                       f"is listed at {places} ({told}); fix the metadata") for r in group]
    else:
      kept.append(first)
      rejected += [(r, f"duplicate row: {printable(key)!r} is already listed at "
                       f"{where(first.line)}") for r in group[1:]]
  return kept, rejected


def keep_if_present(row: Row, images: dict | None, key: str, rows: list, rejected: list) -> None:
  """Adds `row` to `rows`, or to `rejected` as missing when `images` (an index of the files on
  disk; None: metadata-only reading) lacks `key`."""
  if images is not None and key not in images:
    rejected.append((row, decode.MISSING))
  else:
    rows.append(row)


def findings_vector(names) -> np.ndarray:
  out = np.zeros(len(tasks.FINDINGS), np.bool_)
  for n in names:
    if n in tasks.FINDINGS:
      out[tasks.FINDINGS.index(n)] = True
  return out


@dataclasses.dataclass(eq=False)
class NativeConfig(tfds.core.BuilderConfig):
  root: str = ""
  image_size: int = 256


def walk(root: str) -> list[str]:
  """Every file under `root`, relative to it, sorted."""
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, _, names in os.walk(root) for n in names)


def stats(root: str, paths: list[str]) -> dict[str, list[int] | None]:
  """{path: [size, modification time (s)], or None when absent} of `paths` under `root`."""
  out = {}
  for p in paths:
    try:
      st = os.stat(os.path.join(root, p))
      out[p] = [st.st_size, int(st.st_mtime)]
    except OSError:
      out[p] = None  # listed but absent
  return out


def listing_digest(root: str, paths: list[str] | None = None) -> str:
  """A digest of the files under `root` (or of `paths`, relative to it): each one's path,
  size and modification time. Builds are keyed by it, so a collection whose files were
  added, removed or changed is built again, not read from the old build."""
  listed = stats(root, walk(root) if paths is None else sorted(paths))
  return hashlib.sha1(repr(sorted(listed.items())).encode()).hexdigest()[:10]


def config_name(root: str, image_size: int, *options) -> str:
  """A name that encodes the directory and options, so two collections never collide."""
  digest = hashlib.sha1(repr((os.path.abspath(root),) + options).encode()).hexdigest()[:10]
  return f"s{image_size}_{digest}"


def check_root(root: str, source: str) -> str:
  if not root:
    raise ValueError(f"data source {source} needs its directory: set "
                     f"--config.data.{source}.root or ${env_var(source)}")
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise LayoutError(f"{source}: {root} is not a directory")
  return root


def make_config(cls, source: str, root: str, image_size: int, metadata_path,
                **options) -> NativeConfig:
  """A builder config of `cls` for `root`, after checking the layout (`metadata_path(root)`
  raises LayoutError naming what was expected); the name encodes root, options and the
  listing of its files (listing_digest)."""
  root = check_root(root, source)
  metadata_path(root)
  shown = "".join(f", {k}={v!r}" for k, v in options.items())
  return cls(name=config_name(root, image_size, listing_digest(root), *options.values()),
             root=root,
             image_size=image_size, description=f"{root}, {image_size}px{shown}", **options)


def env_var(source: str) -> str:
  return f"XRAYJAX_{source.upper()}"


def listing(root: str, limit: int = 12) -> list[str]:
  """What a directory holds (for layout errors)."""
  try:
    names = sorted(os.listdir(root))
  except OSError as e:
    return [f"<cannot list: {e}>"]
  return names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])


def index_files(root: str, suffixes: tuple[str, ...]) -> dict[str, str]:
  """basename -> path for every file under `root` with one of the suffixes."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      if n.lower().endswith(suffixes):
        out.setdefault(n, os.path.join(dirpath, n))
  return out


class NativeBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of the native-layout builders: subclasses list `Row`s; this decodes and writes them.

  Subclasses set SOURCE, implement `rows()` (returning the rows to build and the rows
  already rejected from the metadata, as (Row, reason)), and may add features with
  `extra_features()`.
  """

  SOURCE = ""
  HAS_BOXES = False

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.skipped: list[dict] = []
    self.converted: dict[str, int] = {}  # how many images of each odd mode were converted
    self.tasks: dict = {}  # tasks.where_rows_went of the last build

  @abc.abstractmethod
  def rows(self) -> tuple[list[Row], list[tuple[Row, str]]]:
    """(rows to build, rows rejected from the metadata with their reasons)."""

  def metadata_file(self) -> str:
    """The file whose lines `Row.line` counts ("" when lines name their own file)."""
    return ""

  def _info(self) -> tfds.core.DatasetInfo:
    from xrayjax.data.sources import schema
    extra = {}
    if self.HAS_BOXES:
      extra["boxes"] = tfds.features.Sequence({"bbox": tfds.features.BBoxFeature(),
                                               "finding": tfds.features.Text()})
    return schema.dataset_info(self, self.builder_config.image_size, self.__doc__, **extra)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {"train": self._generate_examples()}

  def cache_dir(self) -> str:
    return os.path.join(self._data_dir_root, "_xrayjax_build_cache", self.name,
                        self.builder_config.name, str(self.version))

  def _rows_to_build(self) -> tuple[list[Row], list[tuple[Row, str]]]:
    """(the rows to decode, sorted by key; the rows rejected before decoding, with their
    reasons): the same in every process, so chunk k is the same rows everywhere."""
    rows, rejected = self.rows()
    keep = []
    for r in rows:
      why = r.undecodable()
      if why:
        rejected.append((r, why))
      else:
        keep.append(r)
    rows, repeats = split_repeats(keep)
    return sorted(rows, key=lambda r: r.key), rejected + repeats

  def _chunks(self, rows: list[Row]):
    """(number, rows, resume-cache file) of every chunk of CHUNK rows."""
    cache = self.cache_dir()
    os.makedirs(cache, exist_ok=True)
    for c in range(0, len(rows), CHUNK):
      yield c // CHUNK, rows[c:c + CHUNK], os.path.join(cache, f"chunk_{c // CHUNK:06d}.npz")

  def decode_share(self, index: int, count: int) -> None:
    """Decodes the chunks k with k % count == index that the resume cache lacks, into it: one
    process's share of a build decoded by `count` processes at once (sources.builder); the
    build then reads every chunk from the cache. Chunks are written whole (a rename), so a
    killed process leaves only finished ones."""
    rows, _ = self._rows_to_build()
    mine = [(k, chunk, path) for k, chunk, path in self._chunks(rows) if k % count == index]
    start, done = time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      for j, (_, chunk, path) in enumerate(mine):
        keys = [r.key for r in chunk]
        if not (os.path.exists(path) and _load_chunk(path, keys) is not None):
          _save_chunk(path, list(pool.map(self._decode, chunk)), keys)
          done += len(chunk)
        logging.info("%s: process %d of %d: %d of its %d chunks in the cache, %.1f img/s",
                     self.SOURCE, index, count, j + 1, len(mine),
                     done / max(time.time() - start, 1e-9))

  def _generate_examples(self):
    rows, rejected = self._rows_to_build()
    self.skipped = [self._skip_entry(r, why) for r, why in rejected]
    self.converted = {}
    built: list[Row] = []
    if not rows:
      kinds: dict[str, int] = {}
      for _, why in rejected:
        kinds[tasks.reason_kind(why)] = kinds.get(tasks.reason_kind(why), 0) + 1
      raise LayoutError(f"{self.SOURCE}: none of the images listed in "
                        f"{self.metadata_file() or 'the metadata'} can be built "
                        f"({len(rejected)} rows rejected: {kinds}; e.g. {self.skipped[:3]}); "
                        f"check the directory {self.builder_config.root} and the metadata")
    start, done, resumed = time.time(), 0, 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      for _, chunk, path in self._chunks(rows):
        keys = [r.key for r in chunk]
        decoded = _load_chunk(path, keys) if os.path.exists(path) else None
        if decoded is not None:
          resumed += len(chunk)
        else:
          decoded = list(pool.map(self._decode, chunk))
          _save_chunk(path, decoded, keys)
        for row, item in zip(chunk, decoded):
          if isinstance(item, str):
            self.skipped.append(self._skip_entry(row, item))
            rejected.append((row, item))
            continue
          built.append(row)
          if item["converted"]:
            self.converted[item["converted"]] = self.converted.get(item["converted"], 0) + 1
          yield row.key, self._example(row, item)
        done += len(chunk)
        rate = (done - resumed) / max(time.time() - start, 1e-9)
        left = (len(rows) - done) / rate if rate else 0.0
        logging.info("%s: %d/%d images decoded (%.1f%%, %d from the resume cache), %.1f img/s, "
                     "%.0f s left, %d skipped", self.SOURCE, done, len(rows),
                     100 * done / len(rows), resumed, rate, left, len(self.skipped))
    self.tasks = tasks.where_rows_went(
        [(r.label, r.findings, r.source, self._place(r)) for r in built],
        [(r.label, r.findings, r.source, self._place(r), why) for r, why in rejected],
        EXAMPLES)

  def _place(self, row: Row) -> dict:
    return {"line": row.line, "path": printable(os.path.relpath(row.path, self.builder_config.root)
                                                if row.path else row.key)}

  def _skip_entry(self, row: Row, reason: str) -> dict:
    return {**self._place(row), "label": printable(row.label), "reason": reason}

  def _decode(self, row: Row):
    """-> dict of image and hashes, or the reason (str) the row is skipped."""
    try:
      image, extra, data = decode.read_image(row.path)
    except decode.SkippedImage as e:
      return str(e)
    return {"image": decode.resize(image, self.builder_config.image_size),
            "sha1": decode.sha1(data), "phash": decode.perceptual_hash(image),
            "height": image.shape[0], "width": image.shape[1],
            "view": extra.get("view", ""), "converted": extra.get("converted", "")}

  def _example(self, row: Row, item: dict) -> dict:
    ex = {"image": item["image"][..., None], "label": row.label,
          "findings": findings_vector(row.findings), "patient_id": row.patient_id,
          "image_id": row.key, "source": row.source, "site": row.site or row.source,
          "view": row.view or item["view"], "file_sha1": item["sha1"], "phash": item["phash"]}
    if self.HAS_BOXES:
      h, w = float(item["height"]), float(item["width"])
      ex["boxes"] = [{"bbox": tfds.features.BBox(
          ymin=_clip(y / h), xmin=_clip(x / w), ymax=_clip((y + bh) / h),
          xmax=_clip((x + bw) / w)), "finding": f} for x, y, bw, bh, f in row.boxes]
    return ex


def _clip(v: float) -> float:
  return float(min(max(v, 0.0), 1.0))


STANDARD = ("image", "sha1", "phash", "view", "converted", "height", "width")


def _save_chunk(path: str, decoded: list, keys: list[str] | None = None) -> None:
  ok = [d for d in decoded if not isinstance(d, str)]
  arrays = {"reasons": np.array([d if isinstance(d, str) else "" for d in decoded], dtype=str),
            "keys": np.array(keys if keys is not None else [], dtype=str)}
  if ok:
    arrays["images"] = np.stack([d["image"] for d in ok])
    for k in ("sha1", "phash", "view", "converted"):
      arrays[k] = np.array([d[k] for d in ok], dtype=str)
    arrays["hw"] = np.array([[d["height"], d["width"]] for d in ok], np.int64)
    for k in set(ok[0]) - set(STANDARD):  # what a subclass's _decode adds (arrays)
      arrays[f"x_{k}"] = np.stack([d[k] for d in ok])
  files.write_with(path, lambda tmp: np.savez(tmp, **arrays))


def _load_chunk(path: str, keys: list[str] | None = None) -> list | None:
  """The decoded rows of a cached chunk, or None when it holds other rows than `keys` (a
  cache left by a build of other rows, or by a version that kept no keys): decode again.
  `keys=None` loads without checking."""
  with np.load(path) as z:
    if keys is not None and ("keys" not in z.files or z["keys"].tolist() != keys):
      return None
    out, j = [], 0
    for reason in z["reasons"]:
      if reason:
        out.append(str(reason))
        continue
      out.append({"image": z["images"][j], "sha1": str(z["sha1"][j]),
                  "phash": str(z["phash"][j]), "view": str(z["view"][j]),
                  "converted": str(z["converted"][j]),
                  "height": int(z["hw"][j, 0]), "width": int(z["hw"][j, 1]),
                  **{k[2:]: z[k][j] for k in z.files if k.startswith("x_")}})
      j += 1
  return out


def remove_cache(builder) -> None:
  if isinstance(builder, NativeBuilder):
    shutil.rmtree(builder.cache_dir(), ignore_errors=True)

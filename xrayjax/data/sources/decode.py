"""Image files to 2-D uint8 grey arrays: what every native builder and `python -m
xrayjax.predict` decode with, and the hashes duplicate detection compares.

`read_image` turns a PNG, JPEG or DICOM file (or anything Pillow opens) into a 2-D uint8 grey
image. DICOM goes through pydicom: modality LUT (rescale), VOI LUT or window, MONOCHROME1
inversion, any bit depth, and compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000 through
pylibjpeg). Odd raster modes are converted, not skipped: 16-bit and float images are windowed
to their own min..max; RGB, RGBA, palette, CMYK and 1-bit images become grey. A file that is
missing, unreadable, truncated or blank raises `SkippedImage` with the reason.

Hashes: the SHA-1 of the file's bytes (exact copies) and a 256-bit perceptual hash
(imagehash.phash, hash_size 16) of the decoded image (the same picture re-encoded, resized or
re-windowed; the 64-bit pHash is too coarse for chest X-rays, docs/data.md).
"""

from __future__ import annotations

import hashlib
import io
import os

import imagehash
import numpy as np
from PIL import Image

PHASH_SIZE = 16  # 16x16 = 256 bits
DICOM_SUFFIXES = (".dcm", ".dicom")
MISSING = "missing file (listed in the metadata but not on disk)"


class SkippedImage(Exception):
  """An image that cannot be used; the message is the reason."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
  """Any numeric 2-D array -> uint8, windowed to its own min..max."""
  arr = np.asarray(arr, np.float64)
  lo, hi = float(arr.min()), float(arr.max())
  if hi <= lo:
    return np.zeros(arr.shape, np.uint8)
  return np.round((arr - lo) / (hi - lo) * 255).astype(np.uint8)


def _decode_raster(data: bytes) -> tuple[np.ndarray, dict]:
  with Image.open(io.BytesIO(data)) as im:
    im.load()
    extra = {} if im.mode == "L" else {"converted": f"{im.format} mode {im.mode}"}
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
      return _to_uint8(np.asarray(im)), extra
    return np.asarray(im.convert("L")), extra


def _decode_dicom(data: bytes) -> tuple[np.ndarray, dict]:
  import pydicom  # imported here: only DICOM sources need it
  from pydicom import pixels

  ds = pydicom.dcmread(io.BytesIO(data))
  if "PixelData" not in ds:
    raise SkippedImage("unreadable DICOM: no pixel data (truncated, or not an image)")
  arr = ds.pixel_array
  if arr.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:  # multi-frame: the first frame
    arr = arr[0]
  if arr.ndim == 3:  # colour DICOM (rare for radiographs)
    arr = np.asarray(Image.fromarray(_to_uint8(arr.mean(-1))))
  arr = pixels.apply_modality_lut(arr, ds)
  arr = pixels.apply_voi_lut(arr, ds)  # VOI LUT, else the first window; else unchanged
  arr = _to_uint8(arr)
  if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
    arr = 255 - arr  # MONOCHROME1: high values are dark
  return arr, {"view": str(ds.get("ViewPosition", "") or ""),
               "converted": f"DICOM {ds.get('PhotometricInterpretation', '')} "
                            f"{ds.get('BitsStored', '')}-bit"}


def is_dicom(path: str, data: bytes) -> bool:
  return path.lower().endswith(DICOM_SUFFIXES) or data[128:132] == b"DICM"


def read_image(path: str) -> tuple[np.ndarray, dict, bytes]:
  """-> (2-D uint8 grey image, file fields, file bytes).

  File fields: `view` (DICOM), `converted` (how a non-8-bit-grey file was brought to 8-bit
  grey, e.g. "PNG mode I;16", "DICOM MONOCHROME1 15-bit").
  """
  if not os.path.isfile(path):
    raise SkippedImage(MISSING)
  with open(path, "rb") as f:
    data = f.read()
  try:
    if is_dicom(path, data):
      image, extra = _decode_dicom(data)
    else:
      image, extra = _decode_raster(data)
  except SkippedImage:
    raise
  except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt files
    kind = "DICOM" if is_dicom(path, data) else "image"
    raise SkippedImage(f"unreadable {kind}: {type(e).__name__}: {e}") from None
  if image.ndim != 2 or min(image.shape) < 2:
    raise SkippedImage(f"not a 2-D image (shape {image.shape})")
  if image.max() == image.min():
    raise SkippedImage("blank image (every pixel is the same)")
  return image, extra, data


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Squashes to size x size (antialiased), as the shared benchmark was made."""
  if image.shape == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def perceptual_hash(image: np.ndarray) -> str:
  return str(imagehash.phash(Image.fromarray(image), hash_size=PHASH_SIZE))


def sha1(data: bytes) -> str:
  return hashlib.sha1(data).hexdigest()

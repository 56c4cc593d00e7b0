"""Writes small DICOM files the way scanners and archives do (for tests)."""

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom import uid


def write(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
          syntax: str = "explicit", window: tuple[float, float] | None = None,
          view: str = "PA", rescale: tuple[float, float] | None = None) -> str:
  """pixels: 2-D unsigned ints of `bits` bits. syntax: explicit | j2k (JPEG 2000 lossless) |
  jpeg (8-bit JPEG baseline, encapsulated). window: (center, width); rescale: (slope, icpt)."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
  ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientID, ds.ViewPosition = "CR", "test", view
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated = 8 if bits <= 8 else 16
  ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
  if window:
    ds.WindowCenter, ds.WindowWidth = window
  if rescale:
    ds.RescaleSlope, ds.RescaleIntercept = rescale
  dtype = np.uint8 if bits <= 8 else np.uint16
  if syntax == "jpeg":
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=95)
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
  else:
    ds.PixelData = pixels.astype(dtype).tobytes()
    if syntax == "j2k":
      ds.compress(uid.JPEG2000Lossless)
  ds.save_as(str(path), enforce_file_format=True)
  return str(path)

"""Read a radiograph from a PNG, JPEG or DICOM file, or take an array, as (H, W) uint8 with white =
dense (bone), the convention the model is trained on.

DICOM goes through pydicom: the modality LUT (rescale slope/intercept), then the VOI LUT or the
stored window when the file has one (else the pixel range), scaled from the file's bit depth to
8 bits; MONOCHROME1 (where the smallest value is white) is inverted. A compressed transfer syntax
that no installed pixel-data plugin decodes is refused with the syntax's name and what to install.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


class ImageReadError(ValueError):
  """The input is not a radiograph this module can read; the message names the file or value."""


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
  a = np.asarray(a, np.float64)
  return np.round(np.clip((a - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 255).astype(np.uint8)


def array_to_uint8(a: Any, what: str = "array") -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) numbers -> (H, W) uint8. uint8 passes through;
  anything else is stretched over its own min..max; colour is averaged to gray."""
  a = np.asarray(a)
  if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
    a = a[..., 0] if a.shape[-1] == 1 else a[..., :3].astype(np.float64).mean(axis=-1)
  if a.ndim != 2 or min(a.shape) < 2:
    raise ImageReadError(f"{what}: expected an image of shape (H, W) or (H, W, 1|3|4), got {a.shape}")
  if a.dtype == np.uint8:
    return a
  if a.dtype == bool:
    return a.astype(np.uint8) * 255
  if not np.issubdtype(a.dtype, np.number):
    raise ImageReadError(f"{what}: dtype {a.dtype} is not numeric")
  a = a.astype(np.float64)
  if not np.all(np.isfinite(a)):
    raise ImageReadError(f"{what}: holds NaN or infinite values")
  return _stretch(a, float(a.min()), float(a.max()))


def is_dicom(path: str) -> bool:
  if path.lower().endswith(DICOM_SUFFIXES):
    return True
  with open(path, "rb") as f:
    head = f.read(132)
  return len(head) == 132 and head[128:] == b"DICM"


def read_dicom(path: str) -> np.ndarray:
  import pydicom
  from pydicom.errors import InvalidDicomError
  from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

  try:
    ds = pydicom.dcmread(path)
  except (InvalidDicomError, OSError, ValueError, EOFError) as e:
    raise ImageReadError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from e
  if "PixelData" not in ds:
    raise ImageReadError(f"{path}: the DICOM file holds no pixel data")
  ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  if ts is None:
    raise ImageReadError(f"{path}: the DICOM file states no transfer syntax")
  name = f"{ts.name} ({ts})"
  try:
    decoder = get_decoder(ts)
  except NotImplementedError:
    raise ImageReadError(f"{path}: unsupported DICOM transfer syntax {name}: pydicom has no decoder "
                         "for it; convert the file to an uncompressed syntax") from None
  if not decoder.is_available:
    missing = "; ".join(decoder.missing_dependencies)
    raise ImageReadError(f"{path}: unsupported DICOM transfer syntax {name}: no installed plugin decodes "
                         f"it ({missing}); install one of them or convert the file to an uncompressed syntax")
  try:
    pixels = ds.pixel_array
  except Exception as e:  # plugins raise many types on corrupt or inconsistent data
    raise ImageReadError(f"{path}: DICOM pixel data ({name}) does not decode ({type(e).__name__}: {e})") from e
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    pixels = pixels[0]  # a radiograph series: the first frame
  if int(ds.get("SamplesPerPixel", 1)) > 1:
    return array_to_uint8(pixels, path)
  values = apply_modality_lut(pixels, ds)
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  if "WindowCenter" in ds or "VOILUTSequence" in ds:
    values = apply_voi_lut(values, ds)
    bits = int(ds.get("BitsStored", 16))
    # apply_voi_lut maps into the stored bit depth's range: [0, 2^bits - 1] (signed: centred on 0).
    lo = -(2 ** (bits - 1)) if int(ds.get("PixelRepresentation", 0)) == 1 else 0
    out = _stretch(values, lo, lo + 2 ** bits - 1)
  else:
    values = np.asarray(values, np.float64)
    out = _stretch(values, float(values.min()), float(values.max()))
  if photometric == "MONOCHROME1":
    out = 255 - out
  elif photometric != "MONOCHROME2":
    raise ImageReadError(f"{path}: photometric interpretation {photometric!r}; expected MONOCHROME1/2")
  return out


def read_radiograph(source: Any) -> np.ndarray:
  """A path (PNG, JPEG, DICOM, anything PIL reads) or an array -> (H, W) uint8."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise ImageReadError(f"{path}: no such file")
    if is_dicom(path):
      return read_dicom(path)
    try:
      with Image.open(path) as im:
        im.load()
        from data_pipelines.input_pipeline import to_uint8_gray
        return to_uint8_gray(im)
    except Exception as e:  # PIL raises many types on corrupt or unknown files
      raise ImageReadError(f"{path}: not a readable PNG, JPEG or DICOM image ({type(e).__name__}: {e})") from e
  if isinstance(source, Image.Image):
    from data_pipelines.input_pipeline import to_uint8_gray
    return to_uint8_gray(source)
  if isinstance(source, np.ndarray) or hasattr(source, "__array__"):
    return array_to_uint8(source)
  raise ImageReadError(f"cannot read an image from a {type(source).__name__}; pass a path or an array")

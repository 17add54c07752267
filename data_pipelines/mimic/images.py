"""Source JPEG -> stored image bytes, and scene-graph boxes -> boxes in the stored image's pixels.

The stored image has its longer side at `image_size` (aspect kept). With `pad` it is centred on a
black `image_size` square, as the input pipeline's letterbox does; otherwise it keeps its shape.
JPEG decoding asks libjpeg for a reduced-size decode first (`draft`), which is most of the speed:
MIMIC-CXR-JPG images are ~2500-3000 px on a side and the stored ones a few hundred.
"""

from __future__ import annotations

import collections
import dataclasses
import io

import numpy as np
from PIL import Image

from data_pipelines.mimic import bad_input

FORMATS = ("png", "jpeg")
JPEG_QUALITY = 95
# zlib level 3: ~3x faster than PIL's default 6 for ~8 % larger files (BENCHMARKS.md).
PNG_COMPRESS_LEVEL = 3


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where the original image went: scaled to (new_w, new_h), placed at (left, top) of out_w×out_h."""
  orig_w: int
  orig_h: int
  new_w: int
  new_h: int
  left: int
  top: int
  out_w: int
  out_h: int


def geometry(orig_w: int, orig_h: int, image_size: int, pad: bool) -> Geometry:
  scale = image_size / max(orig_w, orig_h)
  new_w, new_h = max(1, round(orig_w * scale)), max(1, round(orig_h * scale))
  if pad:
    return Geometry(orig_w, orig_h, new_w, new_h, (image_size - new_w) // 2, (image_size - new_h) // 2,
                    image_size, image_size)
  return Geometry(orig_w, orig_h, new_w, new_h, 0, 0, new_w, new_h)


def decode_resized(path: str, image_size: int, pad: bool) -> tuple[Image.Image, Geometry]:
  """Read, check and resize one source JPEG; BadInput naming `path` when it is missing, truncated
  or does not decode."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise bad_input.BadInput(bad_input.MISSING_IMAGE, path, "image file does not exist") from None
  # A JPEG ends with the EOI marker; a cut-off download or copy does not (PIL would pad it with grey).
  if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
    raise bad_input.BadInput(bad_input.CORRUPT_IMAGE, path, f"JPEG is truncated ({len(data)} bytes, no end marker)")
  try:
    with Image.open(io.BytesIO(data)) as im:
      geo = geometry(im.width, im.height, image_size, pad)
      im.draft("L", (geo.new_w, geo.new_h))  # DCT-domain downscale: decodes at >= the target size
      im = im.convert("L") if im.mode != "L" else im
      im.load()
      resized = im.resize((geo.new_w, geo.new_h), Image.Resampling.BILINEAR)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise bad_input.BadInput(bad_input.CORRUPT_IMAGE, path,
                             f"JPEG does not decode ({type(e).__name__}: {e})") from None
  if pad:
    canvas = Image.new("L", (geo.out_w, geo.out_h), 0)
    canvas.paste(resized, (geo.left, geo.top))
    resized = canvas
  return resized, geo


def encode(image: Image.Image, fmt: str) -> bytes:
  if fmt not in FORMATS:
    raise ValueError(f"image format {fmt!r}; expected one of {FORMATS}")
  buf = io.BytesIO()
  if fmt == "png":
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
  else:
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
  return buf.getvalue()


def load_resized(path: str, image_size: int, fmt: str, pad: bool) -> tuple[bytes, Geometry]:
  """`decode_resized` then `encode`: the stored bytes and where the original went."""
  image, geo = decode_resized(path, image_size, pad)
  return encode(image, fmt), geo


def transform_boxes(boxes: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray, collections.Counter]:
  """(R, 4) xyxy in original pixels (NaN rows: no box) -> (R, 4) float32 in stored pixels, (R,) present,
  and counts of what was done: 'dropped_zero_area' (x2 <= x1 or y2 <= y1), 'dropped_outside_image'
  (no overlap with the image), 'clipped' (partly outside: cut to the image edge)."""
  stats: collections.Counter = collections.Counter()
  out = np.zeros(boxes.shape, np.float32)
  present = np.zeros(len(boxes), bool)
  sx, sy = geo.new_w / geo.orig_w, geo.new_h / geo.orig_h  # exact per-axis factors after rounding
  for i, (x1, y1, x2, y2) in enumerate(boxes):
    if np.isnan(x1):
      continue
    if x2 <= x1 or y2 <= y1:
      stats["dropped_zero_area"] += 1
      continue
    cx1, cy1 = min(max(x1, 0.0), geo.orig_w), min(max(y1, 0.0), geo.orig_h)
    cx2, cy2 = min(max(x2, 0.0), geo.orig_w), min(max(y2, 0.0), geo.orig_h)
    if cx2 <= cx1 or cy2 <= cy1:
      stats["dropped_outside_image"] += 1
      continue
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
      stats["clipped"] += 1
    out[i] = (cx1 * sx + geo.left, cy1 * sy + geo.top, cx2 * sx + geo.left, cy2 * sy + geo.top)
    present[i] = True
  return out, present, stats

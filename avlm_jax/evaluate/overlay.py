"""A cheap overlay picture of one interpreted radiograph, drawn with PIL (~4 ms per image,
where a matplotlib figure takes a tenth of a second: batch interpretation draws one per image).

Every region's box is outlined in its colour (the tab20 colours of the evaluation pictures); the
`top` regions with the highest finding probability are drawn thick and labelled with that
finding; a band under the image lists the top image-level findings.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colors
from PIL import Image, ImageDraw, ImageFont

from avlm_jax import anatomy
from avlm_jax.evaluate import pictures

# The overlay's long side at most, in pixels: big enough to read the boxes, small enough that a
# folder of thousands stays light (the JSON holds the boxes at full resolution).
OVERLAY_PIXELS = 512


def shrink(image: np.ndarray, max_pixels: int = OVERLAY_PIXELS) -> np.ndarray:
  """(H, W) uint8 -> the same picture with its long side at most `max_pixels`."""
  h, w = image.shape
  scale = max_pixels / max(h, w)
  if scale >= 1.0:
    return image
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType
  except (TypeError, OSError):
    return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color, font,
           bounds: tuple[int, int], taken: list[tuple[float, float, float, float]]) -> None:
  """Text on a dark box just above `xy`, kept inside `bounds` (width, height), moved down past the
  labels already drawn (`taken`, which it joins): overlapping boxes must not hide each other's labels."""
  x1, y1, x2, y2 = draw.textbbox((0, 0), text, font=font)
  w, h = x2 - x1 + 4, y2 - y1 + 4
  width, height = bounds
  x = min(max(0.0, xy[0]), max(0.0, width - w))
  y = min(max(0.0, xy[1] - h), max(0.0, height - h))
  while any(x < tx2 and tx1 < x + w and y < ty2 and ty1 < y + h for tx1, ty1, tx2, ty2 in taken):
    y += h
  taken.append((x, y, x + w, y + h))
  draw.rectangle((x, y, x + w, y + h), fill=(0, 0, 0))
  draw.text((x + 2 - x1, y + 2 - y1), text, fill=color, font=font)


def overlay_image(display: np.ndarray, boxes: np.ndarray, region_probs: np.ndarray, image_probs: np.ndarray,
                  findings: Sequence[str], scale: float, top: int = 3) -> Image.Image:
  """`display` (h, w) uint8: the radiograph as drawn; `boxes` (R, 4) xyxy in the input's pixels,
  `scale` display pixels per input pixel; `region_probs` (R, F), `image_probs` (F,)."""
  font_size = max(10, round(max(display.shape) / 40))
  font = _font(font_size)
  h, w = display.shape
  order = np.argsort(-np.asarray(image_probs))[:top]
  lines = ["image level: " + ", ".join(f"{findings[c]} {image_probs[c]:.2f}" for c in order)]
  band = (font_size + 6) * len(lines) + 6
  canvas = Image.new("RGB", (w, h + band), (0, 0, 0))
  canvas.paste(Image.fromarray(display).convert("RGB"), (0, 0))
  draw = ImageDraw.Draw(canvas)
  b = np.asarray(boxes, np.float64).reshape(-1, 4) * scale
  if len(b):
    region_top = np.asarray(region_probs).max(axis=1)
    suspicious = np.argsort(-region_top)[:top]
    for r in range(len(b)):
      if r not in suspicious:
        draw.rectangle(tuple(b[r]), outline=_rgb(r), width=1)
    for r in suspicious:
      draw.rectangle(tuple(b[r]), outline=_rgb(r), width=3)
    taken = []
    for r in suspicious:  # the most suspicious labelled first, where its box starts
      c = int(np.argmax(region_probs[r]))
      _label(draw, (b[r, 0], b[r, 1]), f"{anatomy.REGION_NAMES[r]}: {findings[c]} {region_probs[r, c]:.2f}",
             _rgb(r), font, (w, h), taken)
  for i, line in enumerate(lines):
    draw.text((4, h + 4 + i * (font_size + 6)), line, fill=(255, 255, 255), font=font)
  return canvas


def _rgb(region: int) -> tuple[int, int, int]:
  return tuple(round(255 * v) for v in colors.to_rgb(pictures._region_color(region)))

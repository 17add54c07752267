"""The dataset card's example figure: a SynthCXR radiograph with its 29 boxes and finding outlines.

Drawn with PIL (no plotting dependency): boxes in per-side colours, each finding's footprint
outlined in red with its name.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from avlm_jax import anatomy

_SIDE_COLOUR = {"right": (80, 170, 255), "left": (255, 200, 60), "midline": (120, 230, 120)}


def draw(image: np.ndarray, boxes: np.ndarray, present: np.ndarray, footprints: dict[str, np.ndarray],
         scale: int = 2) -> Image.Image:
  rgb = np.repeat(image[..., None], 3, -1)
  for mask in footprints.values():
    edge = mask & ~ndimage.binary_erosion(mask)
    rgb[edge] = (255, 40, 40)
  img = Image.fromarray(rgb).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
  d = ImageDraw.Draw(img)
  for i, name in enumerate(anatomy.REGION_NAMES):
    if present[i]:
      x1, y1, x2, y2 = (boxes[i] * scale).tolist()
      colour = _SIDE_COLOUR[anatomy.REGIONS[i].side]
      d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=1)
  for name, mask in footprints.items():
    ys, xs = np.nonzero(mask)
    if ys.size:
      d.text((int(xs.mean() * scale), int(ys.min() * scale) - 12), name, fill=(255, 60, 60))
  return img


def save_example_figure(path: str, seed: int, split: str, opts, max_tries: int = 200) -> str:
  """Save the first record of `split` with at least two findings (or the first one) as a PNG."""
  from data_pipelines.synthcxr.corpus import make_sample

  chosen = None
  for i in range(max_tries):
    sample, _ = make_sample(seed, split, i, opts)
    if chosen is None or len(sample.findings) >= 2:
      chosen = sample
    if len(sample.findings) >= 2:
      break
  foot = {spec.name: chosen.footprints[k] for k, spec in enumerate(chosen.findings) if chosen.footprints[k].any()}
  draw(chosen.image, chosen.boxes, chosen.box_present, foot, scale=max(1, 512 // chosen.image.shape[0])).save(path)
  return path


def save_patient_grid(path: str, seed: int, split: str, opts, columns: int = 3, rows: int = 3,
                      max_tries: int = 200) -> str:
  """Save the first records of `split` with distinct patients as a grid, each with its boxes and
  finding outlines: how the anatomy varies from patient to patient."""
  from data_pipelines.synthcxr.corpus import make_sample

  tiles, seen = [], set()
  for i in range(max_tries):
    sample, _ = make_sample(seed, split, i, opts)
    patient = sample.params.get("patient", -1)
    if patient in seen:
      continue
    seen.add(patient)
    foot = {spec.name: sample.footprints[k] for k, spec in enumerate(sample.findings) if sample.footprints[k].any()}
    tile = draw(sample.image, sample.boxes, sample.box_present, foot, scale=max(1, 256 // sample.image.shape[0]))
    ImageDraw.Draw(tile).text((4, 4), f"{split} {i}, CTR {sample.ctr:.2f}", fill=(255, 255, 255))
    tiles.append(tile)
    if len(tiles) == columns * rows:
      break
  w, h = tiles[0].size
  grid = Image.new("RGB", (columns * w, rows * h))
  for k, tile in enumerate(tiles):
    grid.paste(tile, ((k % columns) * w, (k // columns) * h))
  grid.save(path)
  return path

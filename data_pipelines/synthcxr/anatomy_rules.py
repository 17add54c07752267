"""The 29 Chest ImaGenome regions, derived from the projected CT labelmap.

Each rule turns the projected structures (`ct_volume.STRUCTURES`, base frame: rows superior →
inferior, columns patient right → left, square pixels of `px_mm`) into a 2-D region mask. A region
whose rule finds no pixels is absent: nothing is invented. The masks are packed into one uint32
bit set per pixel (bit i = region i of `avlm_jax.anatomy`), which is what the renderer warps, so
every augmentation moves boxes and masks exactly as it moves the pixels.

`H`/`W` are the height/width of the lung on that side; "lateral" is away from the midline.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from avlm_jax import anatomy
from data_pipelines.synthcxr.ct_volume import STRUCTURE_BIT

# region → how it is derived (the documentation of record; `derive_regions` implements it).
RULES: dict[str, str] = {
    "right lung": "projected right lung lobes (upper, middle, lower)",
    "right upper lung zone": "right lung, upper third of its height",
    "right mid lung zone": "right lung, middle third of its height",
    "right lower lung zone": "right lung, lower third of its height",
    "right hilar structures": "right lung, medial 35% of W, rows from 30% to 55% of H",
    "right apical zone": "right lung above the lowest row of the right clavicle (top H/6 if no clavicle)",
    "right costophrenic angle": "right lung, lateral 30% of W, lowest 15% of H in those columns",
    "right hemidiaphragm": "±6 mm band around the top of the abdominal organs (median over 20 mm of columns), under the right lung",
    "left lung": "projected left lung lobes (upper, lower)",
    "left upper lung zone": "left lung, upper third of its height",
    "left mid lung zone": "left lung, middle third of its height",
    "left lower lung zone": "left lung, lower third of its height",
    "left hilar structures": "left lung, medial 35% of W, rows from 30% to 55% of H",
    "left apical zone": "left lung above the lowest row of the left clavicle (top H/6 if no clavicle)",
    "left costophrenic angle": "left lung, lateral 30% of W, lowest 15% of H in those columns",
    "left hemidiaphragm": "±6 mm band around the top of the abdominal organs (median over 20 mm of columns), under the left lung",
    "trachea": "projected trachea above the carina (the label runs on into the main bronchi)",
    "right clavicle": "projected right clavicle",
    "left clavicle": "projected left clavicle",
    "aortic arch": "projected aorta within 30 mm of its top",
    "right atrium": "cardiac silhouette, patient-right 35% of its width, below its upper 30%",
    "spine": "projected vertebrae",
    "svc": "projected superior vena cava",
    "cardiac silhouette": "projected heart and left atrial appendage",
    "cavoatrial junction": "20 × 20 mm square centred on the lowest point of the SVC",
    "carina": "24 × 14 mm box centred on the bifurcation: the first row where the airway splits in two",
    "mediastinum": "heart, aorta, SVC, trachea, oesophagus, brachiocephalic vessels; rows from the lung apex to the heart's base",
    "upper mediastinum": "mediastinum above the top of the heart",
    "abdomen": "projected abdominal organs below the highest point of the hemidiaphragms",
}
assert tuple(RULES) == tuple(sorted(RULES, key=anatomy.region_id)) or set(RULES) == set(anatomy.REGION_NAMES)


def structure_mask(structures: np.ndarray, name: str) -> np.ndarray:
  return ((structures >> np.uint32(STRUCTURE_BIT[name])) & 1).astype(bool)


def extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
  """(top, bottom, left, right) inclusive pixel extent, or None when empty."""
  rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
  if not rows.size:
    return None
  return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _rect(shape: tuple[int, int], top: float, bottom: float, left: float, right: float) -> np.ndarray:
  m = np.zeros(shape, bool)
  t, b = max(int(round(top)), 0), min(int(round(bottom)) + 1, shape[0])
  l, r = max(int(round(left)), 0), min(int(round(right)) + 1, shape[1])
  if t < b and l < r:
    m[t:b, l:r] = True
  return m


def _bifurcation_row(airway: np.ndarray, min_length: int) -> int | None:
  """First row, at least `min_length` below the top, from which the airway runs as two branches."""
  ext = extent(airway)
  if ext is None:
    return None
  for r in range(ext[0] + min_length, ext[1] + 1):
    runs = [int(np.count_nonzero(np.diff(airway[k].astype(np.int8)) == 1) + airway[k, 0]) for k in range(r, min(r + 3, ext[1] + 1))]
    if min(runs) >= 2:
      return r
  return ext[1]


def derive_regions(structures: np.ndarray, px_mm: float) -> dict[str, np.ndarray]:
  """Region name → boolean mask over the base frame (an empty mask means absent)."""
  shape = structures.shape
  rows = np.arange(shape[0])[:, None]
  cols = np.arange(shape[1])[None, :]
  m = {name: structure_mask(structures, name) for name in STRUCTURE_BIT}
  out: dict[str, np.ndarray] = {}
  empty = np.zeros(shape, bool)

  abdominal = m["abdominal organs"]
  # Top of the abdominal organs per column = the diaphragm dome under that column.
  has_abd = abdominal.any(0)
  dome = np.where(has_abd, np.argmax(abdominal, axis=0), shape[0])
  # A smooth dome (median over ~20 mm of columns): no one-column spikes from organ edges.
  dome = np.where(has_abd, ndimage.median_filter(dome, size=int(round(20.0 / px_mm)) | 1, mode="nearest"), shape[0])
  for side in ("right", "left"):
    lung = m[f"{side} lung"]
    ext = extent(lung)
    if ext is None:
      for zone in ("lung", "upper lung zone", "mid lung zone", "lower lung zone", "hilar structures",
                   "apical zone", "costophrenic angle", "hemidiaphragm"):
        out[f"{side} {zone}"] = empty
      continue
    top, bottom, left, right = ext
    h, w = bottom - top + 1, right - left + 1
    out[f"{side} lung"] = lung
    for k, zone in enumerate(("upper", "mid", "lower")):
      out[f"{side} {zone} lung zone"] = lung & (rows >= top + k * h / 3) & (rows < top + (k + 1) * h / 3)
    # Patient right is image left: the right lung's medial edge is its right edge in the image.
    medial = (cols >= right - 0.35 * w) if side == "right" else (cols <= left + 0.35 * w)
    lateral = (cols <= left + 0.3 * w) if side == "right" else (cols >= right - 0.3 * w)
    out[f"{side} hilar structures"] = lung & medial & (rows >= top + 0.3 * h) & (rows <= top + 0.55 * h)
    clav = extent(m[f"{side} clavicle"])
    apex_limit = clav[1] if clav is not None and clav[1] > top else top + h / 6
    out[f"{side} apical zone"] = lung & (rows <= apex_limit)
    lat_lung = lung & lateral
    lat_ext = extent(lat_lung)
    out[f"{side} costophrenic angle"] = (lat_lung & (rows >= lat_ext[1] - 0.15 * h)) if lat_ext else empty
    under = np.zeros(shape[1], bool)
    under[left:right + 1] = True
    under &= has_abd
    band = int(round(6.0 / px_mm))
    out[f"{side} hemidiaphragm"] = under[None, :] & (np.abs(rows - dome[None, :]) <= band)

  for name in ("right clavicle", "left clavicle", "spine", "svc"):
    out[name] = m[name]
  carina_row = _bifurcation_row(m["trachea"], int(round(20.0 / px_mm)))
  out["trachea"] = m["trachea"] & (rows <= carina_row) if carina_row is not None else empty
  aorta = extent(m["aorta"])
  out["aortic arch"] = m["aorta"] & (rows <= aorta[0] + 30.0 / px_mm) if aorta else empty
  out["cardiac silhouette"] = heart = m["heart"]
  hx = extent(heart)
  if hx is not None:
    ht, hb, hl, hr = hx
    out["right atrium"] = heart & (cols <= hl + 0.35 * (hr - hl)) & (rows >= ht + 0.3 * (hb - ht))
  else:
    out["right atrium"] = empty

  def box_at(mask: np.ndarray, row: int | None, half_w_mm: float, up_mm: float, down_mm: float):
    if row is None:
      return empty
    c = float(np.nonzero(mask[max(row - 2, 0):row + 1].any(0))[0].mean())
    return _rect(shape, row - up_mm / px_mm, row + down_mm / px_mm, c - half_w_mm / px_mm, c + half_w_mm / px_mm)

  svc = extent(m["svc"])
  out["cavoatrial junction"] = box_at(m["svc"], svc[1] if svc else None, 10.0, 10.0, 10.0)
  out["carina"] = box_at(m["trachea"], carina_row, 12.0, 8.0, 6.0)
  lung_top = min((extent(m[f"{s} lung"]) or (shape[0],))[0] for s in ("right", "left"))
  mediastinal = m["heart"] | m["aorta"] | m["svc"] | m["trachea"] | m["esophagus"] | m["great vessels"]
  heart_bottom = hx[1] if hx is not None else shape[0]
  out["mediastinum"] = mediastinal & (rows >= lung_top) & (rows <= heart_bottom)
  out["upper mediastinum"] = out["mediastinum"] & (rows < hx[0]) if hx is not None else empty
  lung_cols = (m["right lung"] | m["left lung"]).any(0)
  dome_top = int(dome[lung_cols & has_abd].min()) if (lung_cols & has_abd).any() else shape[0]
  out["abdomen"] = abdominal & (rows > dome_top)
  return {name: out[name] for name in anatomy.REGION_NAMES}


def pack(regions: dict[str, np.ndarray]) -> np.ndarray:
  """Region masks → one uint32 bit set per pixel (bit i = anatomy region i)."""
  shape = next(iter(regions.values())).shape
  bits = np.zeros(shape, np.uint32)
  for name, mask in regions.items():
    bits[mask] |= np.uint32(1 << anatomy.region_id(name))
  return bits


def unpack(bits: np.ndarray) -> np.ndarray:
  """uint32 (..., H, W) bit set → bool (..., H, W, 32); channel i = anatomy region i."""
  as_bytes = np.ascontiguousarray(bits.astype("<u4")).view(np.uint8).reshape(*bits.shape, 4)
  return np.unpackbits(as_bytes, axis=-1, bitorder="little").astype(bool)


# The layout every study must keep, whatever patient its anatomy is warped onto (checked by
# `layout_violations` on each patient of the bank before it is accepted; image coordinates).
LAYOUT_RULES: dict[str, str] = {
    "laterality": "the right lung's centre lies left of the left lung's centre in the image (PA view)",
    "heart between the lungs": "the cardiac silhouette's centre lies between the two lungs' centres, and "
                               "within the rows of the lungs",
    "costophrenic angles at the bases": "each costophrenic angle lies in the lowest quarter of its lung's "
                                        "height, lateral of the lung's centre",
    "zones top to bottom": "each lung's upper, mid and lower zone centres run top to bottom",
    "trachea midline": "the trachea's centre column lies within 10 % of the thorax width of the midpoint "
                       "between the lungs' lateral edges on the trachea's rows",
}
_LAYOUT_NEEDS = ("right lung", "left lung", "cardiac silhouette", "trachea", "right costophrenic angle",
                 "left costophrenic angle") + tuple(f"{s} {z} lung zone" for s in ("right", "left")
                                                    for z in ("upper", "mid", "lower"))


def layout_violations(regions: np.ndarray, tolerance: float = 1.0) -> list[str]:
  """The `LAYOUT_RULES` that (H, W, 32) region masks break ('missing <region>' when a region the
  rules need is absent); empty when the layout holds. `tolerance` < 1 tightens the two numeric
  limits (the bank checks patients with a margin, so every pose and image size keeps the rules)."""
  def centre(name):
    ys, xs = np.nonzero(regions[..., anatomy.region_id(name)])
    return (float(ys.mean()), float(xs.mean())) if ys.size else None

  missing = [f"missing {n}" for n in _LAYOUT_NEEDS if centre(n) is None]
  if missing:
    return missing
  out = []
  right, left = centre("right lung"), centre("left lung")
  if not right[1] < left[1]:
    out.append("laterality")
  heart = centre("cardiac silhouette")
  lungs = regions[..., anatomy.region_id("right lung")] | regions[..., anatomy.region_id("left lung")]
  top, bottom, lat_r, lat_l = extent(lungs)
  if not (min(right[1], left[1]) < heart[1] < max(right[1], left[1]) and top <= heart[0] <= bottom):
    out.append("heart between the lungs")
  for side, c in (("right", right), ("left", left)):
    t, b, _, _ = extent(regions[..., anatomy.region_id(f"{side} lung")])
    cp_y, cp_x = centre(f"{side} costophrenic angle")
    lateral = cp_x < c[1] if side == "right" else cp_x > c[1]
    if not (cp_y >= b - 0.25 * tolerance * (b - t + 1) and lateral):
      out.append("costophrenic angles at the bases")
      break
  for side in ("right", "left"):
    rows = [centre(f"{side} {z} lung zone")[0] for z in ("upper", "mid", "lower")]
    if not rows[0] < rows[1] < rows[2]:
      out.append("zones top to bottom")
      break
  # Lateral edges on the trachea's own rows: an in-plane roll shifts them with the trachea.
  t_top, t_bottom, _, _ = extent(regions[..., anatomy.region_id("trachea")])
  band = lungs[t_top:t_bottom + 1]
  if band.any():
    _, _, band_r, band_l = extent(band)
    midpoint = (band_r + band_l) / 2
  else:
    midpoint = (lat_r + lat_l) / 2
  if abs(centre("trachea")[1] - midpoint) > 0.1 * tolerance * (lat_l - lat_r + 1):
    out.append("trachea midline")
  return out

"""Many patients' anatomy for SynthCXR: the CT warped onto real lung shapes.

The `torchxrayvision` wheel ships 517 lung masks drawn on real chest radiographs (V7 Labs COVID-19
annotations, `data/semantic_masks_v7labs_lungs.zip`). The zip is read from site-packages without
importing the package (it pulls torch). The wheel states no licence for the masks: they are used
only as shape targets while the bank is built on this machine, and no mask is ever written into the
repository or into a corpus.

Each usable mask becomes a patient:
  * its film (the radiograph's frame, letterboxed to a square of `FILM` pixels) and its two lungs,
    split in radiological orientation (the patient's right lung is on the image's left);
  * matched outline landmarks on each lung (`lung_landmarks`: lateral and medial edges at fixed
    fractions of the lung's height, the apex dome, the diaphragm, the apex, the costophrenic angle
    and the cardiophrenic corner), found the same way on the CT's projected lungs;
  * a thin-plate spline from the film onto the CT's base frame through those landmarks, sampled on a
    grid (`GRID_*`). The renderer's inverse map bilinearly interpolates that grid, so the map is
    piecewise bilinear, and it is invertible exactly when every grid cell keeps a positive Jacobian
    at its four corners (a bilinear map's Jacobian is affine in the cell's coordinates);
  * its measurements: lung areas, the lung-height-to-width ratio, the costophrenic angles' positions.

The heart, mediastinum, diaphragm and bones go through the same map as the lungs, so the heart
follows the space between the patient's lungs; the renderer still scales it to the cardiothoracic
ratio its findings ask for. A mask is unusable (skipped, counted) when it is empty, holds one lung
or lungs that touch, is fragmented, or its lungs are not side by side. A usable mask is rejected
(counted, never rendered) when its warp folds, when its warped anatomy breaks a layout rule
(`anatomy_rules.LAYOUT_RULES`, with a margin) at a neutral pose at any of three CT rotations, or when the heart
scales cannot reach both ends of the cardiothoracic ratio ranges.

Patients are split between train / validation / test by a hash of their mask's name, masks whose
lungs are near-identical (the same radiograph twice) share a split, so the test split holds anatomy
never seen in training. The bank is cached beside the CT projection bank, keyed by the zip's and the
CT's checksums.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile

import numpy as np
from scipy import ndimage

from avlm_jax.paths import file_sha256
from data_pipelines.synthcxr import ct_volume
from data_pipelines.synthcxr.anatomy_rules import extent

PACKAGE = "torchxrayvision"
MASKS_FILE = os.path.join("data", "semantic_masks_v7labs_lungs.zip")
INSTALL_HINT = ("pip install --no-deps torchxrayvision==1.5.7  (the wheel carries the lung masks; it is never "
                "imported), or build the single-CT corpus with synthcxr.patients='ct'")
LICENCE_NOTE = ("The lung masks come from the torchxrayvision 1.5.7 wheel (V7 Labs COVID-19 annotations), "
                "which states no licence for them. They are used only as shape targets while the patient "
                "bank is built; no mask is stored in the corpus or in the repository, and the images hold "
                "only the CT's anatomy, warped.")
BANK_VERSION = 1
FILM = 256  # side of the square film (pixels) each mask is letterboxed and resized to
# The warp grid covers the film and a margin wide enough for every pose the renderer draws
# (zoom ≥ 0.92, roll ≤ 5°, aspect ≤ 6 %, shift ≤ 4 % reach 0.67 film sides from the centre).
GRID_LO, GRID_STEP, GRID_NODES = -0.25 * FILM, 6.0, 65
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
TPS_SMOOTHING = 0.02  # thin-plate spline regularisation, in film-side units
CHECK_YAWS = (0, 2, 4)  # CT rotations (bank indices: -6°, 0°, +6°) the layout rules are checked at
CHECK_SIZE = 64  # image side of the layout check
# The bank checks the layout rules' numeric limits tightened by this factor, so that every pose
# (roll, shift, zoom) and image size the renderer draws keeps them (tests check rendered studies).
LAYOUT_TOLERANCE = 0.8
CTR_SIZE = 96  # image side of the cardiothoracic ratio measurements
CTR_MARGIN = 0.01  # the heart scales must reach this far past the CTR ranges (room for roll)
DUPLICATE_IOU = 0.9  # lungs this alike (at 32 × 32) are taken as the same radiograph

UNUSABLE = ("empty", "one lung or touching lungs", "fragmented", "lungs not side by side")
REJECTED = ("warp folds", "layout rule broken", "heart size out of reach")

# Landmark placement, as fractions of a lung's height (rows) or width (columns, from the lateral edge).
ROW_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75)
TOP_FRACTIONS = (0.35, 0.65)
BOTTOM_FRACTIONS = (0.4, 0.6)
LANDMARKS_PER_LUNG = 2 * len(ROW_FRACTIONS) + len(TOP_FRACTIONS) + len(BOTTOM_FRACTIONS) + 3


def masks_zip_path() -> str:
  """The mask zip inside the installed torchxrayvision wheel (found without importing it)."""
  path = os.path.join(ct_volume.installed_package_dir(PACKAGE, INSTALL_HINT), MASKS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing from the installed wheel; reinstall it: {INSTALL_HINT}")
  return path


def _film(data: bytes, where: str) -> tuple[np.ndarray, tuple[int, int]]:
  """A mask file → (FILM × FILM bool, letterboxed about its centre; the original (height, width))."""
  from PIL import Image

  try:
    img = Image.open(io.BytesIO(data))
    size = img.size
    img.draft("L", (FILM, FILM))  # JPEG: decode at a reduced scale, still at least FILM pixels
    gray = np.asarray(img.convert("L"))
  except Exception as e:  # PIL raises many unrelated types on a damaged image
    raise ValueError(f"{where} is not a readable image ({type(e).__name__}: {e})") from e
  h, w = gray.shape
  side = max(h, w)
  square = np.zeros((side, side), np.uint8)
  square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = gray
  film = np.asarray(Image.fromarray(square).resize((FILM, FILM), Image.BILINEAR)) > 127
  return film, (size[1], size[0])


def read_masks(zip_path: str) -> list[tuple[str, np.ndarray, tuple[int, int]]]:
  """(member name, film mask, original (height, width)) of every image in the zip, by name."""
  if not os.path.exists(zip_path):
    raise FileNotFoundError(f"{zip_path} is missing; {INSTALL_HINT}")
  try:
    with zipfile.ZipFile(zip_path) as z:
      names = sorted(n for n in z.namelist() if not n.endswith("/"))
      out = [(n, *_film(z.read(n), f"{zip_path}: {n}")) for n in names]
  except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
    raise ValueError(f"{zip_path} is not a readable zip of lung masks ({type(e).__name__}: {e})") from e
  if not out:
    raise ValueError(f"{zip_path} holds no mask images")
  return out


def split_lungs(film: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
  """(right lung, left lung) of a film mask in radiological orientation (the right lung is the one
  on the image's left), holes filled; or the `UNUSABLE` reason."""
  total = int(film.sum())
  if total < 0.005 * film.size:
    return "empty"
  labels, n = ndimage.label(film)
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  order = np.argsort(-sizes, kind="stable")
  if n < 2 or sizes[order[1]] < 0.15 * (sizes[order[0]] + sizes[order[1]]):
    return "one lung or touching lungs"
  if sizes[order[0]] + sizes[order[1]] < 0.9 * total:
    return "fragmented"
  a, b = (ndimage.binary_fill_holes(labels == order[k] + 1) for k in (0, 1))
  (_, _, al, ar), (_, _, bl, br) = extent(a), extent(b)
  if min(ar, br) - max(al, bl) > 0.5 * min(ar - al, br - bl):  # columns overlap: one above the other
    return "lungs not side by side"
  return (a, b) if np.nonzero(a)[1].mean() < np.nonzero(b)[1].mean() else (b, a)


def _edge_col(mask: np.ndarray, row: int, lateral_left: bool, lateral: bool) -> tuple[float, float]:
  """(row, column) of the lateral or medial edge of a lung on `row` (the nearest row with pixels)."""
  rows = np.nonzero(mask.any(1))[0]
  row = int(rows[np.argmin(np.abs(rows - row))])
  cols = np.nonzero(mask[row])[0]
  return float(row), float(cols[0] if lateral == lateral_left else cols[-1])


def _edge_row(mask: np.ndarray, col: int, top: bool) -> tuple[float, float]:
  cols = np.nonzero(mask.any(0))[0]
  col = int(cols[np.argmin(np.abs(cols - col))])
  rows = np.nonzero(mask[:, col])[0]
  return float(rows[0] if top else rows[-1]), float(col)


def lung_landmarks(mask: np.ndarray, side: str) -> np.ndarray:
  """(LANDMARKS_PER_LUNG, 2) matched (row, col) points on one lung's outline.

  Lateral and medial edges at `ROW_FRACTIONS` of the height; the apex dome (top edge) and the
  diaphragm (bottom edge) at `TOP_FRACTIONS` / `BOTTOM_FRACTIONS` of the width from the lateral
  edge; the apex (top row); the costophrenic angle (lowest pixel of the lateral 30 % of the width,
  as `anatomy_rules` defines it); the cardiophrenic corner (lowest of the medial 30 %).
  """
  top, bottom, left, right = extent(mask)
  h, w = bottom - top, right - left
  lateral_left = side == "right"  # patient right = image left
  lat_col = left if lateral_left else right
  inward = 1 if lateral_left else -1
  pts = [_edge_col(mask, round(top + t * h), lateral_left, True) for t in ROW_FRACTIONS]
  pts += [_edge_col(mask, round(top + t * h), lateral_left, False) for t in ROW_FRACTIONS]
  pts += [_edge_row(mask, round(lat_col + inward * s * w), True) for s in TOP_FRACTIONS]
  pts += [_edge_row(mask, round(lat_col + inward * s * w), False) for s in BOTTOM_FRACTIONS]
  pts.append((float(top), float(np.nonzero(mask[top])[0].mean())))
  cols = np.arange(mask.shape[1])
  for near_lateral in (True, False):
    from_lateral = (cols - lat_col) * inward
    band = mask & ((from_lateral <= 0.3 * w) if near_lateral else (from_lateral >= 0.7 * w))[None, :]
    row = int(np.nonzero(band.any(1))[0][-1])
    pts.append((float(row), float(np.nonzero(band[row])[0].mean())))
  return np.asarray(pts, np.float64)


def _tps_kernel(d2: np.ndarray) -> np.ndarray:
  """The thin-plate radial function r² log r, written in r² (0 at r = 0)."""
  return 0.5 * d2 * np.log(np.where(d2 > 0, d2, 1.0))


def fit_tps(src: np.ndarray, dst: np.ndarray, smoothing: float = TPS_SMOOTHING):
  """Thin-plate spline coefficients taking `src` (n, 2) film points near `dst` (n, 2); film
  coordinates are scaled by 1/FILM for conditioning."""
  x = src / FILM
  n = len(x)
  k = _tps_kernel(((x[:, None] - x[None]) ** 2).sum(-1)) + smoothing * np.eye(n)
  p = np.concatenate([np.ones((n, 1)), x], axis=1)
  system = np.block([[k, p], [p.T, np.zeros((3, 3))]])
  coef = np.linalg.solve(system, np.concatenate([dst, np.zeros((3, 2))]))
  return x, coef


def eval_tps(tps, points: np.ndarray) -> np.ndarray:
  x, coef = tps
  q = points / FILM
  d2 = ((q[:, None] - x[None]) ** 2).sum(-1)
  return _tps_kernel(d2) @ coef[:len(x)] + coef[len(x)] + q @ coef[len(x) + 1:]


def grid_nodes() -> np.ndarray:
  return GRID_LO + GRID_STEP * np.arange(GRID_NODES)


def warp_grid(tps) -> np.ndarray:
  """The spline at the grid's nodes: (GRID_NODES, GRID_NODES, 2) CT base-frame (row, col), float32."""
  g = grid_nodes()
  rr, cc = np.meshgrid(g, g, indexing="ij")
  return eval_tps(tps, np.stack([rr.ravel(), cc.ravel()], 1)).reshape(GRID_NODES, GRID_NODES, 2).astype(np.float32)


def cell_jacobians(grid: np.ndarray) -> np.ndarray:
  """(4, N-1, N-1) Jacobian determinants of the piecewise-bilinear map at each cell's corners,
  per unit of grid step. A bilinear map's Jacobian is affine in the cell, so the map is
  orientation-preserving (no fold) on the whole grid exactly when all are positive."""
  g = grid.astype(np.float64)
  a, b, c, d = g[:-1, :-1], g[:-1, 1:], g[1:, :-1], g[1:, 1:]  # (row, col) corners: a b / c d

  def det(e_row, e_col):
    return e_row[..., 0] * e_col[..., 1] - e_row[..., 1] * e_col[..., 0]
  return np.stack([det(c - a, b - a), det(d - b, b - a), det(c - a, d - c), det(d - b, d - c)])


def _signature(film: np.ndarray) -> np.ndarray:
  from PIL import Image

  return np.asarray(Image.fromarray(film.astype(np.uint8) * 255).resize((32, 32), Image.BILINEAR)).ravel() > 127


def assign_splits(names: list[str], films: list[np.ndarray]) -> np.ndarray:
  """Split code (index into SPLITS) per mask: a hash of its name, shared by near-identical masks
  (the lowest name of each group decides), so no radiograph is in two splits."""
  sig = np.stack([_signature(f) for f in films]).astype(np.float32)
  inter = sig @ sig.T
  area = sig.sum(1)
  iou = inter / np.maximum(area[:, None] + area[None] - inter, 1.0)
  group = np.arange(len(names))
  for i, j in zip(*np.nonzero(np.triu(iou > DUPLICATE_IOU, 1))):  # union-find on the pairs
    ri, rj = group[i], group[j]
    while group[ri] != ri:
      ri = group[ri]
    while group[rj] != rj:
      rj = group[rj]
    group[max(ri, rj)] = min(ri, rj)
  codes = np.zeros(len(names), np.int8)
  edges = np.cumsum(SPLIT_FRACTIONS)
  for i in range(len(names)):
    root = i
    while group[root] != root:
      root = group[root]
    u = int.from_bytes(hashlib.sha256(names[root].encode()).digest()[:8], "big") / 2 ** 64
    codes[i] = int(np.searchsorted(edges, u, side="right"))
  return np.minimum(codes, len(SPLITS) - 1)


def ct_landmarks(bank: dict[str, np.ndarray]) -> np.ndarray:
  """Landmarks of the CT's projected lungs at no rotation (bank index of yaw 0°), right then left."""
  from avlm_jax import anatomy
  from data_pipelines.synthcxr.anatomy_rules import unpack

  y0 = int(np.argmin(np.abs(bank["yaws_deg"])))
  regions = unpack(bank["regions"][y0])
  return np.concatenate([lung_landmarks(regions[..., anatomy.region_id(f"{s} lung")], s) for s in ("right", "left")])


def _measure(right: np.ndarray, left: np.ndarray) -> dict[str, np.ndarray]:
  lungs = right | left
  top, bottom, l, r = extent(lungs)
  marks = [lung_landmarks(m, s) for m, s in ((right, "right"), (left, "left"))]
  return {"areas": np.array([right.mean(), left.mean()]),
          "height_width": (bottom - top + 1) / (r - l + 1),
          "lung_box": np.array([top, bottom + 1, l, r + 1]) / FILM,  # rows then columns, film fractions
          "cp_angles": np.stack([m[-2] for m in marks]) / FILM,  # (right, left) (row, col), film fractions
          "landmarks": np.concatenate(marks)}


def _check(anat, grid: np.ndarray, scale: float) -> tuple[str | None, np.ndarray]:
  """(rejection reason or None, CTR at heart scale 1 per CT rotation) of one warp grid."""
  from data_pipelines.synthcxr import anatomy_rules, findings, render

  if cell_jacobians(grid).min() <= 0:
    return "warp folds", np.zeros(anat.num_yaws, np.float32)
  neutral = {"roll_deg": 0.0, "zoom": 1.0, "aspect": 0.0, "shift": [0.0, 0.0]}
  r, c, _ = render.film_coords(grid, scale, neutral, CHECK_SIZE)
  for y in CHECK_YAWS:
    regions = anatomy_rules.unpack(render._nearest(anat.regions[y], r, c))
    if anatomy_rules.layout_violations(regions, LAYOUT_TOLERANCE):
      return "layout rule broken", np.zeros(anat.num_yaws, np.float32)
  ctr1 = np.zeros(anat.num_yaws, np.float32)
  r, c, _ = render.film_coords(grid, scale, neutral, CTR_SIZE)
  for y in range(anat.num_yaws):
    geo = anat.geometry[y]
    polar = render._polar(geo, r, c)
    scales = (1.0,) + (render.PATIENT_HEART_SCALE_LIMITS if y in CHECK_YAWS else ())
    ctrs = []
    for k in scales:
      bits = render._nearest(anat.ctr_bits[y], *render._heart_warp(geo, k, *polar))
      ctrs.append(render.cardiothoracic_ratio(bits & 1, bits & 2))
    ctr1[y] = ctrs[0]
    if y in CHECK_YAWS and not (ctrs[1] <= findings.NORMAL_CTR[0] - CTR_MARGIN
                                and ctrs[2] >= findings.CARDIOMEGALY_CTR[1] + CTR_MARGIN):
      return "heart size out of reach", ctr1
  return None, ctr1


def build(ct_bank: dict[str, np.ndarray], zip_path: str) -> dict[str, np.ndarray]:
  """The patient bank's arrays (see `PatientBank`) from the masks in `zip_path`."""
  from data_pipelines.synthcxr.render import Anatomy

  start = time.time()
  masks = read_masks(zip_path)
  names = [m[0] for m in masks]
  codes = assign_splits(names, [m[1] for m in masks])
  anat = Anatomy(ct_bank)
  target = ct_landmarks(ct_bank)
  keep = {k: [] for k in ("names", "split", "warps", "scale", "ctr1", "areas", "height_width", "lung_box",
                          "cp_angles", "landmarks", "film_hw")}
  dropped_names, dropped_split, dropped_reason = [], [], []
  for (name, film, hw), code in zip(masks, codes):
    lungs = split_lungs(film)
    if isinstance(lungs, str):
      dropped_names.append(name), dropped_split.append(code), dropped_reason.append(lungs)
      continue
    m = _measure(*lungs)
    tps = fit_tps(m["landmarks"], target)
    affine = tps[1][len(tps[0]) + 1:] / FILM  # CT pixels per film pixel (rows of d(row, col))
    scale = float(np.sqrt(abs(np.linalg.det(affine))))
    grid = warp_grid(tps)
    reason, ctr1 = _check(anat, grid, scale)
    if reason is not None:
      dropped_names.append(name), dropped_split.append(code), dropped_reason.append(reason)
      continue
    for key, value in (("names", name), ("split", code), ("warps", grid), ("scale", scale), ("ctr1", ctr1),
                       ("film_hw", hw)):
      keep[key].append(value)
    for key in ("areas", "height_width", "lung_box", "cp_angles", "landmarks"):
      keep[key].append(m[key])
  if not keep["names"]:
    raise ValueError(f"{zip_path}: none of its {len(masks)} masks gave a usable patient")
  out = {k: np.asarray(v) for k, v in keep.items()}
  out["names"] = out["names"].astype(str)
  out["split"] = out["split"].astype(np.int8)
  out["warps"] = out["warps"].astype(np.float32)
  for k in ("scale", "ctr1", "areas", "height_width", "lung_box", "cp_angles", "landmarks"):
    out[k] = out[k].astype(np.float32)
  out["dropped_names"] = np.asarray(dropped_names, str)
  out["dropped_split"] = np.asarray(dropped_split, np.int8)
  out["dropped_reason"] = np.asarray(dropped_reason, str)
  out["ct_landmarks"] = target.astype(np.float32)
  out["build_seconds"] = np.float64(time.time() - start)
  return out


def load(ct_bank: dict[str, np.ndarray], zip_path: str | None = None) -> "PatientBank":
  """The patient bank, from the on-disk cache when it matches this zip and CT, else built and cached."""
  zip_path = zip_path or masks_zip_path()
  if not os.path.exists(zip_path):
    raise FileNotFoundError(f"{zip_path} is missing; {INSTALL_HINT}")
  ct_key = hashlib.sha256(np.ascontiguousarray(ct_bank["regions"]).tobytes()).hexdigest()[:16]
  path = os.path.join(ct_volume.cache_dir(),
                      f"synthcxr-patients-v{BANK_VERSION}-{file_sha256(zip_path)[:16]}-{ct_key}.npz")
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        return PatientBank({k: z[k] for k in z.files})
    except Exception:  # A torn cache file (killed writer) is rebuilt, never trusted.
      pass
  arrays = build(ct_bank, zip_path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  with np.load(path) as z:  # what every worker process will load: the same bytes
    return PatientBank({k: z[k] for k in z.files})


class PatientBank:
  """The accepted patients (arrays indexed by patient) and what was dropped, with the counts."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self.names = arrays["names"]
    self.split = arrays["split"]
    self.warps = arrays["warps"]  # (P, N, N, 2) CT (row, col) at the grid nodes
    self.scale = arrays["scale"]  # (P,) CT pixels per film pixel
    self.ctr1 = arrays["ctr1"]  # (P, yaws) CTR at heart scale 1, neutral pose
    self._pools = {s: np.nonzero(self.split == i)[0] for i, s in enumerate(SPLITS)}

  def __len__(self) -> int:
    return len(self.names)

  def pool(self, split: str) -> np.ndarray:
    """Indices of the patients of `split`."""
    if split not in self._pools:
      raise ValueError(f"split {split!r}; expected one of {SPLITS}")
    if not len(self._pools[split]):
      raise ValueError(f"the patient bank has no {split} patients")
    return self._pools[split]

  def counts(self) -> dict:
    """Masks read, patients accepted per split and dropped per reason and split."""
    a = self.arrays
    accepted = {s: int((self.split == i).sum()) for i, s in enumerate(SPLITS)}
    dropped = {reason: {s: int(((a["dropped_reason"] == reason) & (a["dropped_split"] == i)).sum())
                        for i, s in enumerate(SPLITS)} for reason in UNUSABLE + REJECTED}
    return {"masks": len(self.names) + len(a["dropped_names"]), "accepted": accepted,
            "unusable": {r: dropped[r] for r in UNUSABLE}, "rejected": {r: dropped[r] for r in REJECTED},
            "build_seconds": round(float(a["build_seconds"]), 1)}

  def stats(self) -> dict:
    """Spread of the accepted patients' lungs (mean, 5th and 95th percentile), in film fractions."""
    def spread(v):
      v = np.asarray(v, np.float64)
      return {"mean": float(v.mean()), "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95))}
    box = self.arrays["lung_box"]
    cp = self.arrays["cp_angles"]
    return {"lung height / width": spread(self.arrays["height_width"]),
            "right lung area": spread(self.arrays["areas"][:, 0]),
            "left lung area": spread(self.arrays["areas"][:, 1]),
            "lung span, width": spread(box[:, 3] - box[:, 2]), "lung span, height": spread(box[:, 1] - box[:, 0]),
            "right costophrenic angle, row": spread(cp[:, 0, 0]), "left costophrenic angle, row": spread(cp[:, 1, 0])}

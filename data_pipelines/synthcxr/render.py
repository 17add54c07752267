"""Render one SynthCXR sample: a PA radiograph, its 29 exact region boxes, masks and findings.

One inverse map takes every output pixel to the base frame of the projection bank:
output → pose (zoom, in-plane rotation, aspect, shift; the CT rotation about its long axis picks
the bank entry) → [patient warp] → anatomical deformation (heart size) → base frame. With
`patients='v7_masks'` each study draws a patient of its split from the patient bank
(`patients.py`): the pose frames that patient's film, and the patient's warp (a thin-plate spline
through matched lung outlines, sampled on a grid and interpolated bilinearly) takes the film onto
the CT, so the CT's lungs take the patient's shape and everything else follows. With
`patients='ct'` (the single-CT corpus) the pose frames the CT's thorax directly. Attenuation channels are
sampled bilinearly, the region bit set by nearest neighbour, so the boxes (extents of the warped
region bits) and masks follow every augmentation exactly. Findings are added to the projected
attenuation in the output frame; then windowing, gamma, blur and detector noise.

Heart size is a label (cardiomegaly), so it is set on the image, not on the CT: each sample draws a
target cardiothoracic ratio (`findings.NORMAL_CTR` or `findings.CARDIOMEGALY_CTR`) and
`sample_params` solves for the heart scale whose rendered masks, after the whole map and at the
output size, measure that ratio with `cardiothoracic_ratio`; the result always lies in the range
(for images of at least 24 px, where the range spans a whole pixel of heart width).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from avlm_jax import anatomy
from data_pipelines.synthcxr import anatomy_rules, findings as findings_lib, patients as patients_lib
from data_pipelines.synthcxr.ct_volume import VOXEL_MM

MAX_IMAGE_SIZE = 1024
# Bumped when the same (seed, split, index) renders differently; part of a corpus's params, so
# `corpus.ensure` never reuses a corpus from an older renderer. 2: heart solved for a measured CTR.
RENDER_VERSION = 2
PATIENT_MODES = ("ct", "v7_masks")  # one CT's anatomy | the CT warped onto real patients' lungs
MASK_NAMES = ("heart", "left lung", "right lung")
_MASK_REGION = {"heart": "cardiac silhouette", "left lung": "left lung", "right lung": "right lung"}
_CHANNELS = ("soft", "bone", "lung_mu", "lung_len")


@dataclasses.dataclass(frozen=True)
class RenderOptions:
  image_size: int = 256
  p_normal: float = 0.4  # probability of a study with no finding
  findings: tuple[str, ...] = findings_lib.FINDINGS  # which may be drawn
  max_findings: int = 3
  deform: bool = True  # anatomical variation (heart size, lung aspect)
  patients: str = "ct"  # one of PATIENT_MODES

  def __post_init__(self):
    if not isinstance(self.image_size, (int, np.integer)) or not 0 < self.image_size <= MAX_IMAGE_SIZE:
      raise ValueError(f"SynthCXR image_size={self.image_size!r}: must be an int in 1..{MAX_IMAGE_SIZE}")
    if not isinstance(self.p_normal, (int, float)) or not 0.0 <= self.p_normal <= 1.0:
      raise ValueError(f"SynthCXR p_normal={self.p_normal!r}: a prevalence must lie in [0, 1]")
    if self.max_findings < 1:
      raise ValueError(f"SynthCXR max_findings={self.max_findings!r}: must be >= 1")
    object.__setattr__(self, "findings", findings_lib.check_names(self.findings))
    if self.patients not in PATIENT_MODES:
      raise ValueError(f"SynthCXR patients={self.patients!r}: expected one of {PATIENT_MODES}")


@dataclasses.dataclass
class Sample:
  image: np.ndarray          # (S, S) uint8
  boxes: np.ndarray          # (29, 4) float32 xyxy pixels
  box_present: np.ndarray    # (29,) bool
  masks: dict[str, np.ndarray]  # MASK_NAMES → (S, S) bool
  regions: np.ndarray        # (S, S, 32) bool region masks (bit i = region i)
  findings: list[findings_lib.FindingSpec]
  footprints: dict[int, np.ndarray]  # index into findings → (S, S) bool where it changed the image
  ctr: float                 # measured cardiothoracic ratio
  params: dict


class Anatomy:
  """The projection bank plus what the renderer derives from it once (centres, ratios), and the
  patient bank when patients are drawn (`patients.PatientBank`, else None)."""

  def __init__(self, bank: dict[str, np.ndarray], patients=None):
    self.bank = bank
    self.patients = patients
    channels = np.stack([bank[c] for c in _CHANNELS], axis=-1).astype(np.float32)  # (Y, H, W, 4)
    # A zero border (1 before, 2 after) lets `_bilinear` gather without bounds masks.
    self.padded_channels = np.pad(channels, ((0, 0), (1, 2), (1, 2), (0, 0)))
    self.channels = self.padded_channels[:, 1:-2, 1:-2]
    self.regions = bank["regions"]
    self.num_yaws, self.height, self.width = self.regions.shape
    unpacked = anatomy_rules.unpack(self.regions)
    self.geometry = [self._geometry(unpacked[y]) for y in range(self.num_yaws)]
    # Heart (bit 0) and lungs (bit 1) alone: all the heart-scale solver samples.
    heart = unpacked[..., anatomy.region_id("cardiac silhouette")]
    lungs = unpacked[..., anatomy.region_id("right lung")] | unpacked[..., anatomy.region_id("left lung")]
    self.ctr_bits = heart.astype(np.uint8) | (lungs.astype(np.uint8) << 1)

  def window(self, yaw: int, bone_boost: float) -> tuple[float, float]:
    """Display window (low, high) of P for this pose and bone contrast: body edge to dense bone."""
    sub = self.channels[yaw, ::4, ::4]
    p = sub[..., 0] + bone_boost * sub[..., 1]
    lo, hi = np.percentile(p[p > 1.0], [2.0, 99.7])
    return float(lo), float(hi)

  @staticmethod
  def _geometry(regions: np.ndarray) -> dict:
    lungs = regions[..., anatomy.region_id("right lung")] | regions[..., anatomy.region_id("left lung")]
    heart = regions[..., anatomy.region_id("cardiac silhouette")]
    lr, lc = np.nonzero(lungs)
    hr, hc = np.nonzero(heart)
    hy, hx = float(hr.mean()), float(hc.mean())
    # The heart warp's support: an ellipse about the heart reaching the nearer lateral lung edge and
    # the nearer of apex/base, so the widest thorax (the CTR's denominator) is never moved.
    ty, tx = min(hy - lr.min(), lr.max() - hy), min(hx - lc.min(), lc.max() - hx)
    return {
        "thorax": (lr.min(), lr.max(), lc.min(), lc.max()),
        "heart_centre": (hy, hx),
        "warp_radius": (float(ty), float(tx)),
        "heart_rho": float(np.sqrt(((hr - hy) / ty) ** 2 + ((hc - hx) / tx) ** 2).max()),
        # Each row's outermost pixels: under a small roll they hold the widest extents.
        "heart_rim": Anatomy._row_extremes(heart), "lung_rim": Anatomy._row_extremes(lungs),
    }

  @staticmethod
  def _row_extremes(mask: np.ndarray) -> np.ndarray:
    rows = np.nonzero(mask.any(1))[0]
    first = np.argmax(mask[rows], 1)
    last = mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], 1)
    return np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)]).astype(np.float64)


def cardiothoracic_ratio(heart: np.ndarray, lungs: np.ndarray) -> float:
  """The cardiothoracic ratio as read on a PA film, in image pixels.

  Numerator: the heart's maximal transverse width, from its rightmost to its leftmost point (they
  may lie on different rows: MRD + MLD). Denominator: the maximal inner width of the thorax, taken
  as the span from one lung's lateral edge to the other's. Both are column spans of the masks
  (inclusive, in pixels). Takes (rows, cols) masks or (cols,) column occupancies; NaN if one is empty.
  """
  heart_cols = np.asarray(heart, bool).reshape(-1, np.shape(heart)[-1]).any(0)
  lung_cols = np.asarray(lungs, bool).reshape(-1, np.shape(lungs)[-1]).any(0)
  if not heart_cols.any() or not lung_cols.any():
    return float("nan")
  hc, lc = np.nonzero(heart_cols)[0], np.nonzero(lung_cols)[0]
  return float((hc[-1] - hc[0] + 1) / (lc[-1] - lc[0] + 1))


def _bilinear(padded: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
  """Bilinear samples of an (H, W, C) image at float coords, 0 outside; `padded` is the image
  with a zero border of 1 pixel before and 2 after (Anatomy.padded_channels)."""
  hp, wp = padded.shape[:2]
  # Clamping onto the zero border changes nothing: every corner outside the image reads 0.
  r, c = np.clip(r, -1.0, hp - 3.0), np.clip(c, -1.0, wp - 3.0)
  r0, c0 = np.floor(r), np.floor(c)
  fr, fc = (r - r0)[..., None], (c - c0)[..., None]
  idx = (r0.astype(np.int64) + 1) * wp + (c0.astype(np.int64) + 1)
  flat = padded.reshape(-1, padded.shape[-1])
  out = 0.0
  for off, wt in ((0, (1 - fr) * (1 - fc)), (1, (1 - fr) * fc), (wp, fr * (1 - fc)), (wp + 1, fr * fc)):
    out = out + wt * flat[idx + off]
  return out.astype(np.float32)


def _nearest(img: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
  h, w = img.shape
  rr, cc = np.round(r).astype(np.int64), np.round(c).astype(np.int64)
  ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
  return np.where(ok, img[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)], 0).astype(img.dtype)


def boxes_from_regions(regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(S, S, 32) bool → (29, 4) xyxy pixel boxes (pixel edges) and presence."""
  r = anatomy.NUM_REGIONS
  rows, cols = regions.any(1)[:, :r], regions.any(0)[:, :r]  # (S, 29) each
  present = rows.any(0)
  s_r, s_c = rows.shape[0], cols.shape[0]
  y1 = np.argmax(rows, 0)
  y2 = s_r - np.argmax(rows[::-1], 0)
  x1 = np.argmax(cols, 0)
  x2 = s_c - np.argmax(cols[::-1], 0)
  boxes = np.stack([x1, y1, x2, y2], -1).astype(np.float32)
  return np.where(present[:, None], boxes, 0.0).astype(np.float32), present


def _draw_params(anat: Anatomy, rng: np.random.Generator, opts: RenderOptions,
                 specs: list[findings_lib.FindingSpec], split: str = "train") -> dict:
  """Every random choice of a sample; `heart_scale` is left for `solve_heart_scale`. With
  `opts.patients='v7_masks'` the patient is drawn (last) from the patients of `split`."""
  yaw = int(rng.integers(anat.num_yaws))
  enlarged = any(s.name == "cardiomegaly" for s in specs)
  ctr_range = findings_lib.CARDIOMEGALY_CTR if enlarged else findings_lib.NORMAL_CTR
  target_ctr = rng.uniform(*ctr_range)
  if not (opts.deform or enlarged):
    target_ctr = sum(ctr_range) / 2  # no anatomical variation, but still a normal heart (the CT's is ~0.52)
  params = {
      "yaw_index": yaw, "yaw_deg": float(anat.bank["yaws_deg"][yaw]),
      "roll_deg": float(rng.uniform(-5, 5)), "zoom": float(rng.uniform(0.92, 1.1)),
      "aspect": float(rng.uniform(-0.06, 0.06)) if opts.deform else 0.0,
      "shift": rng.uniform(-0.04, 0.04, size=2).tolist(),
      "heart_scale": 1.0, "target_ctr": float(target_ctr), "ctr_range": list(ctr_range),
      "bone_boost": float(rng.uniform(0.9, 1.5)), "window": rng.uniform(-0.06, 0.06, size=2).tolist(),
      "gamma": float(rng.uniform(1.1, 1.7)), "blur_px": float(rng.uniform(0.2, 0.9)),
      "noise": float(rng.uniform(0.005, 0.025)),
  }
  if opts.patients == "v7_masks":
    if anat.patients is None:
      raise ValueError("RenderOptions(patients='v7_masks') needs an Anatomy with the patient bank "
                       "(corpus._anatomy('v7_masks') loads it)")
    pool = anat.patients.pool(split)
    params["patient"] = int(pool[rng.integers(len(pool))])
    params["patient_name"] = str(anat.patients.names[params["patient"]])
  return params


def sample_params(anat: Anatomy, rng: np.random.Generator, opts: RenderOptions,
                  specs: list[findings_lib.FindingSpec], split: str = "train") -> dict:
  """A sample's parameters, with the heart scale solved for its target CTR at `opts.image_size`."""
  params = _draw_params(anat, rng, opts, specs, split)
  params["heart_scale"] = solve_heart_scale(anat, params, opts.image_size)
  return params


def _pose_coords(anat: Anatomy, params: dict, size: int) -> tuple[np.ndarray, np.ndarray, float]:
  """Base-frame (row, col) of every output pixel before the heart warp, and the pixel size in mm."""
  if "patient" in params:
    p = params["patient"]
    return film_coords(anat.patients.warps[p], float(anat.patients.scale[p]), params, size)
  geo = anat.geometry[params["yaw_index"]]
  top, bottom, left, right = geo["thorax"]
  centre = np.array([(top + bottom) / 2 + 0.06 * (bottom - top), (left + right) / 2])
  side = 1.18 * max(bottom - top, right - left) / params["zoom"]
  r, c = _frame(centre, side, params, size)
  return r, c, float(side * VOXEL_MM[0] / size)


def _frame(centre, side: float, params: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) of every output pixel in the frame it is cut from: a square of `side` about
  `centre`, under the pose's shift, aspect and in-plane roll."""
  n = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  v, u = np.meshgrid(n, n, indexing="ij")  # v: down, u: right (normalised output coords)
  sy, sx = side * (1 + params["aspect"]), side * (1 - params["aspect"])
  a = np.deg2rad(params["roll_deg"])
  r = centre[0] + params["shift"][0] * side + np.cos(a) * v * sy + np.sin(a) * u * sx
  c = centre[1] + params["shift"][1] * side - np.sin(a) * v * sy + np.cos(a) * u * sx
  return r, c


def _grid_sample(grid: np.ndarray, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear interpolation of a patient's warp grid (N, N, 2) at film coordinates."""
  n = grid.shape[0]
  gr = np.clip((r - patients_lib.GRID_LO) / patients_lib.GRID_STEP, 0.0, n - 1.000001)
  gc = np.clip((c - patients_lib.GRID_LO) / patients_lib.GRID_STEP, 0.0, n - 1.000001)
  r0, c0 = np.floor(gr), np.floor(gc)
  fr, fc = (gr - r0)[..., None], (gc - c0)[..., None]
  idx = r0.astype(np.int64) * n + c0.astype(np.int64)
  flat = grid.reshape(-1, 2)
  out = ((1 - fr) * (1 - fc) * flat[idx] + (1 - fr) * fc * flat[idx + 1]
         + fr * (1 - fc) * flat[idx + n] + fr * fc * flat[idx + n + 1])
  return out[..., 0], out[..., 1]


def film_coords(warp_grid: np.ndarray, scale: float, params: dict, size: int
                ) -> tuple[np.ndarray, np.ndarray, float]:
  """Base-frame (row, col) of every output pixel of a patient's film under the pose (before the
  heart warp), and the pixel size in mm. The pose frames the whole film (letterboxed square) as
  `_pose_coords` frames the CT's thorax; `scale`: CT pixels per film pixel (the warp's affine part)."""
  side = patients_lib.FILM / params["zoom"]
  film_centre = (patients_lib.FILM - 1) / 2
  r, c = _grid_sample(warp_grid, *_frame((film_centre, film_centre), side, params, size))
  return r, c, float(side * scale * VOXEL_MM[0] / size)


HEART_SCALE_LIMITS = (0.6, 1.45)  # the warp is invertible here at every yaw (Jacobian > 0, checked)
# With patients: the patient's warp narrows or widens the heart against its thorax, so the scale
# must reach further to hit both CTR ranges; the heart warp stays invertible here (checked).
PATIENT_HEART_SCALE_LIMITS = (0.55, 1.8)
_CORE_MAX = 0.9  # the scaled core never reaches the thorax wall


def _polar(geo: dict, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Offsets from the heart centre and the elliptic radius ρ (1 on the warp's boundary)."""
  (hy, hx), (ty, tx) = geo["heart_centre"], geo["warp_radius"]
  dr, dc = r - hy, c - hx
  return dr, dc, np.sqrt((dr / ty) ** 2 + (dc / tx) ** 2)


def _heart_warp(geo: dict, k: float, dr: np.ndarray, dc: np.ndarray, rho: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Inverse heart deformation: transverse scale k, vertical 1 + (k - 1)/2 (cardiomegaly widens more
  than it lengthens), inside the ellipse ρ < 1 of `warp_radius`. Radially, source ρ = g(ρ): ρ/k on
  the core ρ ≤ k·(heart's ρ), so the heart is scaled exactly and keeps its shape; then the C¹ cubic
  (Hermite) to the identity at ρ = 1, monotone for k in HEART_SCALE_LIMITS: the lung between heart
  and chest wall takes up the change, and nothing at ρ ≥ 1 moves, the widest thorax included.
  Elementwise +, ×, / and where only, so a subset of pixels gets bit-identical coordinates."""
  (hy, hx) = geo["heart_centre"]
  rho1 = min(k * geo["heart_rho"], _CORE_MAX)
  h = 1.0 - rho1
  u = np.clip((rho - rho1) / h, 0.0, 1.0)
  core, outside = rho <= rho1, rho >= 1.0
  inv_rho = 1.0 / np.maximum(rho, rho1)
  out = []
  for kk in (1 + 0.5 * (k - 1), k):
    p0, m0 = rho1 / kk, h / kk  # g and its slope (per unit u) at the core's edge; 1 and h at ρ = 1
    c2, c3 = 3 * (1 - p0) - 2 * m0 - h, 2 * (p0 - 1) + m0 + h
    g = p0 + u * (m0 + u * (c2 + u * c3))
    out.append(np.where(core, 1.0 / kk, np.where(outside, 1.0, g * inv_rho)))
  return hy + dr * out[0], hx + dc * out[1]


def source_coords(anat: Anatomy, params: dict, size: int) -> tuple[np.ndarray, np.ndarray, float]:
  """Base-frame (row, col) of every output pixel, and the output pixel size in mm."""
  r, c, px_mm = _pose_coords(anat, params, size)
  geo = anat.geometry[params["yaw_index"]]
  r, c = _heart_warp(geo, params["heart_scale"], *_polar(geo, r, c))
  return r, c, px_mm


def _predicted_ctr(geo: dict, params: dict, k: float) -> float:
  """CTR of the heart scaled by k under the pose, from the rims, without sampling (a first guess)."""
  a = np.deg2rad(params["roll_deg"])
  # A base-frame point's output column is (sin a·row + cos a·col)/(side·(1 - aspect)) + offset:
  # the factor is common to heart and lungs, so only the roll changes the ratio.
  proj = np.array([np.sin(a), np.cos(a)])
  hy, hx = geo["heart_centre"]
  heart = (geo["heart_rim"] - (hy, hx)) * (1 + 0.5 * (k - 1), k) @ proj
  lung = geo["lung_rim"] @ proj
  return float((np.ptp(heart) + 1) / (np.ptp(lung) + 1))


def solve_heart_scale(anat: Anatomy, params: dict, size: int, polar=None, max_evals: int = 10) -> float:
  """The heart scale k whose rendered masks measure `params['target_ctr']`, in `params['ctr_range']`.

  The CTR is measured as `render` measures it: `cardiothoracic_ratio` of the nearest-neighbour
  heart and lung masks of the full map (pose, then warp) at `size`. Pixels outside the warp's
  ellipse do not depend on k and are sampled once; each trial samples only the ellipse. The first
  trial is the k the rims predict; the heart is scaled exactly and the widest thorax is fixed, so
  CTR ∝ k nearly and a proportional step (bisection once the target is bracketed) corrects the
  pixel quantisation. Returns the first k within a pixel of the target and in range, else the best.
  `polar`: `_polar` of the pose coordinates, when the caller has it.
  """
  lo, hi = params["ctr_range"]
  target = params["target_ctr"]
  geo = anat.geometry[params["yaw_index"]]
  plane = anat.ctr_bits[params["yaw_index"]]
  dr, dc, rho = polar if polar is not None else _polar(geo, *_pose_coords(anat, params, size)[:2])
  inside = rho < 1.0  # the warp's support
  outside = ~inside
  cols = np.broadcast_to(np.arange(size, dtype=np.int32), (size, size))
  (hy, hx) = geo["heart_centre"]
  fixed = _nearest(plane, hy + dr[outside], hx + dc[outside])  # == the warp there (its factor is 1.0)
  fixed_heart, fixed_lung = np.zeros(size, bool), np.zeros(size, bool)
  fixed_cols = cols[outside]
  fixed_heart[fixed_cols[(fixed & 1) > 0]] = True
  fixed_lung[fixed_cols[(fixed & 2) > 0]] = True
  dr, dc, rho, cols = dr[inside], dc[inside], rho[inside], cols[inside]

  def measure(k: float) -> tuple[float, int]:
    bits = _nearest(plane, *_heart_warp(geo, k, dr, dc, rho))
    heart, lung = fixed_heart.copy(), fixed_lung.copy()
    heart[cols[(bits & 1) > 0]] = True
    lung[cols[(bits & 2) > 0]] = True
    return cardiothoracic_ratio(heart, lung), (int(np.ptp(np.nonzero(lung)[0])) + 1 if lung.any() else 1)

  k_min, k_max = PATIENT_HEART_SCALE_LIMITS if "patient" in params else HEART_SCALE_LIMITS
  k = 1.0
  if "patient" in params:  # the patient's CTR at k = 1 (neutral pose): the CTR is nearly ∝ k
    k = float(np.clip(target / anat.patients.ctr1[params["patient"], params["yaw_index"]], k_min, k_max))
  else:
    for _ in range(3):  # the prediction is nearly, not exactly, proportional to k (ky != k)
      k = float(np.clip(k * target / _predicted_ctr(geo, params, k), k_min, k_max))
  tried: dict[float, float] = {}
  for _ in range(max_evals):
    m, lung_px = measure(k)
    if not np.isfinite(m):
      return k
    tried[k] = m
    if lo <= m <= hi and abs(m - target) <= 1.0 / lung_px:  # within one pixel of heart width
      return k
    below = [x for x, v in tried.items() if v < target]
    above = [x for x, v in tried.items() if v >= target]
    if below and above and max(below) < min(above):
      ka, kb = max(below), min(above)
      if kb - ka < 1e-4:
        break
      k_next = (ka + kb) / 2
    else:
      aim = target
      if "patient" in params:  # half a pixel past the target: a crude first guess still brackets it
        aim = target + (0.5 if m < target else -0.5) / lung_px
      k_next = float(np.clip(k * aim / m, k_min, k_max))
    if k_next in tried:
      break
    k = k_next

  def miss(x):  # otherwise the closest to the target among those in range, else to the range
    v = tried[x]
    return (0.0, abs(v - target)) if lo <= v <= hi else (1.0, min(abs(v - lo), abs(v - hi)))
  return min(tried, key=miss)


def render(anat: Anatomy, rng: np.random.Generator, opts: RenderOptions,
           specs: list[findings_lib.FindingSpec] | None = None, split: str = "train") -> Sample:
  """One study; `split` picks the patients it may be drawn from (patients='v7_masks')."""
  if specs is None:
    specs = findings_lib.sample(rng, opts.findings, opts.p_normal, opts.max_findings)
  params = _draw_params(anat, rng, opts, specs, split)
  size = opts.image_size
  y = params["yaw_index"]
  # source_coords, with the pose computed once for the solver and the warp.
  r, c, px_mm = _pose_coords(anat, params, size)
  polar = _polar(anat.geometry[y], r, c)
  params["heart_scale"] = solve_heart_scale(anat, params, size, polar)
  r, c = _heart_warp(anat.geometry[y], params["heart_scale"], *polar)
  if "patient" in params:
    # A patient's film reaches past the CT's field of view: extend the CT's edge there instead
    # of cutting to black along a warped rectangle (regions stay absent outside it).
    ch = _bilinear(anat.padded_channels[y], np.clip(r, 0, anat.height - 1), np.clip(c, 0, anat.width - 1))
  else:
    ch = _bilinear(anat.padded_channels[y], r, c)
  soft, bone, lung_mu, lung_len = (ch[..., i] for i in range(4))
  regions = anatomy_rules.unpack(_nearest(anat.regions[y], r, c))
  frame = findings_lib.Frame(regions=regions, lung_len=lung_len, lung_mu=lung_mu, px_mm=px_mm)

  p = soft + params["bone_boost"] * bone
  footprints = {}
  for i, spec in enumerate(specs):
    d = findings_lib.render(spec, frame, rng)
    footprints[i] = np.abs(d) > 0.5
    p = p + d

  # Display: a log-detector image is linear in P; window it, then gamma, blur and noise.
  lo, hi = anat.window(y, params["bone_boost"])
  lo, hi = lo + params["window"][0] * (hi - lo), hi + params["window"][1] * (hi - lo)
  img = np.clip((p - lo) / (hi - lo), 0, 1) ** params["gamma"]
  img = ndimage.gaussian_filter(img, params["blur_px"] * size / 256)
  img = img + rng.normal(0, params["noise"], img.shape) * np.sqrt(img + 0.05)
  image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

  boxes, present = boxes_from_regions(regions)
  masks = {m: regions[..., anatomy.region_id(_MASK_REGION[m])] for m in MASK_NAMES}
  params["px_mm"] = px_mm
  return Sample(image=image, boxes=boxes, box_present=present, masks=masks, regions=regions,
                findings=specs, footprints=footprints,
                ctr=cardiothoracic_ratio(masks["heart"], masks["left lung"] | masks["right lung"]),
                params=params)

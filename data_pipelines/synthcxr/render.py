"""Render one SynthCXR sample: a PA radiograph, its 29 exact region boxes, masks and findings.

One inverse map takes every output pixel to the base frame of the projection bank:
output → pose (zoom, in-plane rotation, aspect, shift; the CT rotation about its long axis picks
the bank entry) → anatomical deformation (heart size) → base frame. Attenuation channels are
sampled bilinearly, the region bit set by nearest neighbour, so the boxes (extents of the warped
region bits) and masks follow every augmentation exactly. Findings are added to the projected
attenuation in the output frame; then windowing, gamma, blur and detector noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from avlm_jax import anatomy
from data_pipelines.synthcxr import anatomy_rules, findings as findings_lib
from data_pipelines.synthcxr.ct_volume import VOXEL_MM

MAX_IMAGE_SIZE = 1024
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

  def __post_init__(self):
    if not isinstance(self.image_size, (int, np.integer)) or not 0 < self.image_size <= MAX_IMAGE_SIZE:
      raise ValueError(f"SynthCXR image_size={self.image_size!r}: must be an int in 1..{MAX_IMAGE_SIZE}")
    if not isinstance(self.p_normal, (int, float)) or not 0.0 <= self.p_normal <= 1.0:
      raise ValueError(f"SynthCXR p_normal={self.p_normal!r}: a prevalence must lie in [0, 1]")
    if self.max_findings < 1:
      raise ValueError(f"SynthCXR max_findings={self.max_findings!r}: must be >= 1")
    object.__setattr__(self, "findings", findings_lib.check_names(self.findings))


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
  """The projection bank plus what the renderer derives from it once (centres, ratios)."""

  def __init__(self, bank: dict[str, np.ndarray]):
    self.bank = bank
    self.channels = np.stack([bank[c] for c in _CHANNELS], axis=-1).astype(np.float32)  # (Y, H, W, 4)
    self.regions = bank["regions"]
    self.num_yaws, self.height, self.width = self.regions.shape
    unpacked = anatomy_rules.unpack(self.regions)
    self.geometry = [self._geometry(unpacked[y]) for y in range(self.num_yaws)]

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
    return {
        "thorax": (lr.min(), lr.max(), lc.min(), lc.max()),
        "heart_centre": (float(hr.mean()), float(hc.mean())),
        "heart_half": ((hr.max() - hr.min()) / 2, (hc.max() - hc.min()) / 2),
        "ctr": (hc.max() - hc.min() + 1) / (lc.max() - lc.min() + 1),
    }


def cardiothoracic_ratio(regions: np.ndarray) -> float:
  """Widest heart extent over widest lung-to-lung extent, measured in the image."""
  heart = regions[..., anatomy.region_id("cardiac silhouette")].any(0)
  lungs = (regions[..., anatomy.region_id("right lung")] | regions[..., anatomy.region_id("left lung")]).any(0)
  if not heart.any() or not lungs.any():
    return float("nan")
  hc, lc = np.nonzero(heart)[0], np.nonzero(lungs)[0]
  return float((hc[-1] - hc[0] + 1) / (lc[-1] - lc[0] + 1))


def _bilinear(img: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
  """img (H, W, C) at float coords; 0 outside."""
  h, w = img.shape[:2]
  r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
  fr, fc = (r - r0)[..., None], (c - c0)[..., None]
  out = 0.0
  for dr, dc, wt in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
    rr, cc = r0 + dr, c0 + dc
    ok = ((rr >= 0) & (rr < h) & (cc >= 0) & (cc < w))[..., None]
    out = out + wt * np.where(ok, img[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)], 0.0)
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


def sample_params(anat: Anatomy, rng: np.random.Generator, opts: RenderOptions,
                  specs: list[findings_lib.FindingSpec]) -> dict:
  yaw = int(rng.integers(anat.num_yaws))
  geo = anat.geometry[yaw]
  enlarged = any(s.name == "cardiomegaly" for s in specs)
  target_ctr = rng.uniform(0.55, 0.66) if enlarged else rng.uniform(0.40, 0.47)
  heart_scale = target_ctr / geo["ctr"] if (opts.deform or enlarged) else 1.0
  return {
      "yaw_index": yaw, "yaw_deg": float(anat.bank["yaws_deg"][yaw]),
      "roll_deg": float(rng.uniform(-5, 5)), "zoom": float(rng.uniform(0.92, 1.1)),
      "aspect": float(rng.uniform(-0.06, 0.06)) if opts.deform else 0.0,
      "shift": rng.uniform(-0.04, 0.04, size=2).tolist(),
      "heart_scale": float(heart_scale), "target_ctr": float(target_ctr),
      "bone_boost": float(rng.uniform(0.9, 1.5)), "window": rng.uniform(-0.06, 0.06, size=2).tolist(),
      "gamma": float(rng.uniform(1.1, 1.7)), "blur_px": float(rng.uniform(0.2, 0.9)),
      "noise": float(rng.uniform(0.005, 0.025)),
  }


def source_coords(anat: Anatomy, params: dict, size: int) -> tuple[np.ndarray, np.ndarray, float]:
  """Base-frame (row, col) of every output pixel, and the output pixel size in mm."""
  geo = anat.geometry[params["yaw_index"]]
  top, bottom, left, right = geo["thorax"]
  centre = np.array([(top + bottom) / 2 + 0.06 * (bottom - top), (left + right) / 2])
  side = 1.18 * max(bottom - top, right - left) / params["zoom"]
  n = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  v, u = np.meshgrid(n, n, indexing="ij")  # v: down, u: right (normalised output coords)
  sy, sx = side * (1 + params["aspect"]), side * (1 - params["aspect"])
  a = np.deg2rad(params["roll_deg"])
  r = centre[0] + params["shift"][0] * side + np.cos(a) * v * sy + np.sin(a) * u * sx
  c = centre[1] + params["shift"][1] * side - np.sin(a) * v * sy + np.cos(a) * u * sx
  k = params["heart_scale"]
  if k != 1.0:
    # Inverse radial warp about the heart: scale 1/k inside, identity far away (monotone for k in
    # [0.7, 1.5]); transverse growth is twice the vertical, as in cardiomegaly.
    (hy, hx), (ry, rx) = geo["heart_centre"], geo["heart_half"]
    rho = np.sqrt(((r - hy) / (1.1 * ry)) ** 2 + ((c - hx) / (1.1 * rx)) ** 2)
    w = np.exp(-(rho / 1.2) ** 4)
    kx, ky = k, 1 + 0.5 * (k - 1)
    r = hy + (r - hy) * (1 + (1 / ky - 1) * w)
    c = hx + (c - hx) * (1 + (1 / kx - 1) * w)
  return r, c, float(side * VOXEL_MM[0] / size)


def render(anat: Anatomy, rng: np.random.Generator, opts: RenderOptions,
           specs: list[findings_lib.FindingSpec] | None = None) -> Sample:
  if specs is None:
    specs = findings_lib.sample(rng, opts.findings, opts.p_normal, opts.max_findings)
  params = sample_params(anat, rng, opts, specs)
  size = opts.image_size
  r, c, px_mm = source_coords(anat, params, size)
  y = params["yaw_index"]
  ch = _bilinear(anat.channels[y], r, c)
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
                findings=specs, footprints=footprints, ctr=cardiothoracic_ratio(regions), params=params)

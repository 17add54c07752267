"""Findings rendered into a SynthCXR image, each bound to the regions it sits in.

A finding changes the projected attenuation `P` (water-equivalent voxel lengths along the ray)
in the output frame, using the warped region masks and two per-pixel maps of the lungs:
`lung_len` (how many lung voxels the ray crosses: how much air a process can replace) and
`lung_mu` (the lung tissue's own attenuation: the vascular "lung markings").

| finding          | appearance                                                                  |
|------------------|------------------------------------------------------------------------------|
| consolidation    | lumpy airspace opacity filling part of one lung zone, sharp at the lung edge   |
| nodule / mass    | a sphere (nodule < 30 mm; mass 30–60 mm, lobulated) inside one lung zone       |
| pleural effusion | dependent fluid at one base: blunted costophrenic angle, meniscus rising laterally |
| pneumothorax     | apical or lateral rim of air without lung markings, with a visible pleural line |
| cardiomegaly     | the heart enlarged by the renderer's deformation: measured CTR 0.55–0.66 (normals 0.40–0.47) |
| atelectasis      | plate-like band of opacity in one lower zone                                   |
| pulmonary edema  | bilateral perihilar haze fading towards the periphery                          |
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from avlm_jax import anatomy
from data_pipelines.synthcxr.anatomy_rules import extent

FINDINGS = ("consolidation", "nodule", "mass", "pleural effusion", "pneumothorax", "cardiomegaly",
            "atelectasis", "pulmonary edema")
# What is drawn: nodule and mass are one kind, told apart by size.
_KINDS = ("consolidation", "nodule or mass", "pleural effusion", "pneumothorax", "cardiomegaly",
          "atelectasis", "pulmonary edema")
SEVERITIES = ("small", "moderate", "large")
# Cardiothoracic ratio (`render.cardiothoracic_ratio` of the rendered masks) of every study: a normal
# heart, and cardiomegaly clear of the 0.5 cut-off. The renderer solves for the heart size that hits it.
NORMAL_CTR = (0.40, 0.47)
CARDIOMEGALY_CTR = (0.55, 0.66)
_ZONES = ("upper", "mid", "lower")


@dataclasses.dataclass(frozen=True)
class FindingSpec:
  name: str          # one of FINDINGS
  side: str          # 'right' | 'left' | 'bilateral' | 'midline'
  zone: str = ""     # 'upper' | 'mid' | 'lower' where it sits in one zone
  severity: str = "moderate"
  size_mm: float = 0.0
  location: str = ""  # pneumothorax: 'apical' | 'lateral'

  def regions(self) -> tuple[str, ...]:
    """The Chest ImaGenome regions this finding is bound to (its report sentence goes there)."""
    s = self.side
    if self.name in ("consolidation", "nodule", "mass"):
      return (f"{s} {self.zone} lung zone", f"{s} lung")
    if self.name == "atelectasis":
      return (f"{s} lower lung zone", f"{s} lung")
    if self.name == "pleural effusion":
      return (f"{s} costophrenic angle", f"{s} lower lung zone", f"{s} hemidiaphragm", f"{s} lung")
    if self.name == "pneumothorax":
      if self.location == "apical":
        return (f"{s} apical zone", f"{s} upper lung zone", f"{s} lung")
      return (f"{s} upper lung zone", f"{s} mid lung zone", f"{s} lung")
    if self.name == "cardiomegaly":
      return ("cardiac silhouette",)
    if self.name == "pulmonary edema":
      return tuple(f"{side} {part}" for side in ("right", "left")
                   for part in ("lung", "hilar structures", "mid lung zone"))
    raise ValueError(f"unknown finding {self.name!r}")


def check_names(names) -> tuple[str, ...]:
  names = tuple(names)
  unknown = [n for n in names if n not in FINDINGS]
  if unknown:
    raise ValueError(f"unknown SynthCXR finding(s) {unknown}; known: {list(FINDINGS)}")
  return names


def sample(rng: np.random.Generator, allowed: tuple[str, ...], p_normal: float,
           max_findings: int = 3) -> list[FindingSpec]:
  """A random set of co-occurring findings (empty with probability `p_normal`)."""
  kinds = [k for k in _KINDS if any(n in allowed for n in k.split(" or "))]
  if not kinds or rng.random() < p_normal:
    return []
  n = int(rng.integers(1, min(max_findings, len(kinds)) + 1))
  specs: list[FindingSpec] = []
  for kind in rng.choice(kinds, size=n, replace=False):
    kind = str(kind)
    side = str(rng.choice(["right", "left"]))
    severity = str(rng.choice(SEVERITIES))
    if kind == "nodule or mass":
      choices = [k for k in ("nodule", "mass") if k in allowed]
      name = str(rng.choice(choices))
      size = rng.uniform(8, 28) if name == "nodule" else rng.uniform(32, 60)
      specs.append(FindingSpec(name, side, str(rng.choice(_ZONES)), "", float(size)))
    elif kind == "consolidation":
      specs.append(FindingSpec(kind, side, str(rng.choice(_ZONES)), severity))
    elif kind == "pneumothorax":
      specs.append(FindingSpec(kind, side, severity=severity, location=str(rng.choice(["apical", "lateral"]))))
    elif kind == "cardiomegaly":
      specs.append(FindingSpec(kind, "midline", severity=str(rng.choice(["mild", "moderate"]))))
    elif kind == "pulmonary edema":
      specs.append(FindingSpec(kind, "bilateral", severity=str(rng.choice(["mild", "moderate"]))))
    else:  # pleural effusion, atelectasis
      specs.append(FindingSpec(kind, side, "lower", severity))
  return specs


@dataclasses.dataclass
class Frame:
  """What a finding renderer sees: the warped anatomy of one sample in output pixels."""
  regions: np.ndarray   # (S, S, 32) bool, channel i = anatomy region i
  lung_len: np.ndarray  # (S, S) lung voxels on the ray
  lung_mu: np.ndarray   # (S, S) lung tissue attenuation on the ray
  px_mm: float          # mm per output pixel

  def region(self, name: str) -> np.ndarray:
    return self.regions[..., anatomy.region_id(name)]


_AIR_TO_FLUID = 0.85  # attenuation gained per lung voxel when air is replaced by fluid/tissue


def _grid(shape):
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  return yy.astype(np.float32), xx.astype(np.float32)


def _point_in(mask: np.ndarray, rng: np.random.Generator, margin_px: float = 0.0) -> tuple[float, float] | None:
  """A random pixel of `mask`, at least `margin_px` from its edge when possible."""
  inner = mask
  if margin_px >= 1:
    eroded = ndimage.binary_erosion(mask, iterations=int(margin_px))
    inner = eroded if eroded.any() else mask
  ys, xs = np.nonzero(inner)
  if not ys.size:
    return None
  i = int(rng.integers(ys.size))
  return float(ys[i]), float(xs[i])


def render(spec: FindingSpec, frame: Frame, rng: np.random.Generator) -> np.ndarray:
  """ΔP for one finding (zero where it is not). Cardiomegaly is geometric: ΔP = 0 here."""
  shape = frame.lung_len.shape
  delta = np.zeros(shape, np.float32)
  if spec.name == "cardiomegaly":
    return delta
  yy, xx = _grid(shape)
  fill = _AIR_TO_FLUID * frame.lung_len
  mm = frame.px_mm
  if spec.name == "pulmonary edema":
    strength = {"mild": 0.3, "moderate": 0.45}.get(spec.severity, 0.35)
    for side in ("right", "left"):
      lung, hilum = frame.region(f"{side} lung"), frame.region(f"{side} hilar structures")
      ext = extent(lung)
      if ext is None or not hilum.any():
        continue
      hy, hx = [float(v.mean()) for v in np.nonzero(hilum)]
      sigma = 0.5 * (ext[3] - ext[2] + 1)
      delta += lung * strength * fill * np.exp(-((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * sigma ** 2))
    return delta
  lung = frame.region(f"{spec.side} lung")
  ext = extent(lung)
  if ext is None:
    return delta
  top, bottom, left, right = ext
  h, w = bottom - top + 1, right - left + 1
  lateral_is_left = spec.side == "right"  # patient right = image left
  if spec.name == "consolidation":
    zone = frame.region(f"{spec.side} {spec.zone} lung zone")
    strength = {"small": 0.6, "moderate": 0.8, "large": 1.0}[spec.severity]
    extent_px = {"small": 14, "moderate": 22, "large": 32}[spec.severity] / mm
    blob = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(3, 7))):
      p = _point_in(zone, rng)
      if p is None:
        return delta
      s = extent_px * rng.uniform(0.5, 1.0)
      blob += np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * s * s))
    return (lung * strength * fill * np.clip(blob, 0, 1)).astype(np.float32)
  if spec.name in ("nodule", "mass"):
    zone = frame.region(f"{spec.side} {spec.zone} lung zone")
    r = spec.size_mm / 2 / mm
    c = _point_in(zone & lung, rng, margin_px=r)
    if c is None:
      return delta
    lobes = [(c, r)] if spec.name == "nodule" else [(c, r * 0.8)] + [
        ((c[0] + rng.uniform(-0.4, 0.4) * r, c[1] + rng.uniform(-0.4, 0.4) * r), r * rng.uniform(0.5, 0.7))
        for _ in range(2)]
    chord = np.zeros(shape, np.float32)
    for (cy, cx), rr in lobes:
      d2 = (yy - cy) ** 2 + (xx - cx) ** 2
      # Chord through a sphere, in voxels (0.703 mm): tissue replaces air along it.
      chord = np.maximum(chord, 2 * np.sqrt(np.clip(rr * rr - d2, 0, None)) * mm / 0.703125)
    # Solid lesions are denser than the water-equivalent fill (and the lung behind them is compressed).
    return (1.6 * _AIR_TO_FLUID * chord).astype(np.float32)
  if spec.name == "atelectasis":
    zone = frame.region(f"{spec.side} lower lung zone")
    c = _point_in(zone, rng)
    if c is None:
      return delta
    length = rng.uniform(30, 60) / mm
    thick = rng.uniform(3, 7) / mm
    theta = np.deg2rad(rng.uniform(-20, 20))
    u = (xx - c[1]) * np.cos(theta) + (yy - c[0]) * np.sin(theta)
    v = -(xx - c[1]) * np.sin(theta) + (yy - c[0]) * np.cos(theta)
    band = np.exp(-(v / thick) ** 2) * np.clip(1.2 - np.abs(u) / (length / 2), 0, 1)
    return (lung * rng.uniform(0.8, 1.0) * (fill + 10.0) * band).astype(np.float32)
  if spec.name == "pleural effusion":
    # Fluid height above the lateral costophrenic angle; the meniscus rises towards the chest wall.
    height = {"small": 0.12, "moderate": 0.22, "large": 0.35}[spec.severity] * h
    cp = frame.region(f"{spec.side} costophrenic angle")
    cp_ext = extent(cp)
    base = cp_ext[1] if cp_ext is not None else bottom
    lat = (right - xx) / w if not lateral_is_left else (xx - left) / w  # 0 at the chest wall
    top_line = base - height - 0.6 * height * np.clip(1 - 2 * lat, 0, 1) ** 2
    depth = yy - top_line
    ramp = np.clip(depth / (6.0 / mm), 0, 1)
    # Layered fluid also fills the posterior recess below the lung: denser with depth.
    layer = np.clip(depth * mm / 40.0, 0, 1) * 8.0
    return (lung * ramp * (fill + layer)).astype(np.float32)
  if spec.name == "pneumothorax":
    width = {"small": 6, "moderate": 12, "large": 20}[spec.severity] / mm
    dist = ndimage.distance_transform_edt(lung)
    if spec.location == "apical":
      where = yy <= top + 0.3 * h
    else:
      lat = (xx - left) / w if lateral_is_left else (right - xx) / w
      where = (lat <= 0.45) & (yy <= top + 0.75 * h)
    rim = lung & where & (dist <= width)
    line = lung & where & (np.abs(dist - width) <= max(0.6 / mm, 0.7))
    # Air without lung markings in the rim; a thin visceral pleural line at its inner edge.
    return (line * 6.0 - rim * frame.lung_mu).astype(np.float32)
  raise ValueError(f"unknown finding {spec.name!r}")

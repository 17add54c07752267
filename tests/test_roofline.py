"""The roofline estimator: which resource bounds the step, by how much, and the MFU it implies."""

import pytest

from avlm_jax import roofline

CHIP = roofline.Chip("test", peak_flops=100e12, hbm_bytes_per_s=1e12, ici_bytes_per_s=100e9, dcn_bytes_per_s=10e9)


def test_each_resource_can_bound():
  est = roofline.estimate(flops=50e12, hbm_bytes=0.1e12, ici_bytes=10e9, chip=CHIP)
  assert est.bound_by == "compute" and est.bound_s == pytest.approx(0.5)
  assert est.mfu_bound == pytest.approx(1.0)
  est = roofline.estimate(flops=10e12, hbm_bytes=0.4e12, ici_bytes=10e9, chip=CHIP)
  assert est.bound_by == "hbm" and est.bound_s == pytest.approx(0.4)
  assert est.mfu_bound == pytest.approx(0.25)
  est = roofline.estimate(flops=10e12, hbm_bytes=0.1e12, ici_bytes=60e9, chip=CHIP)
  assert (est.bound_by, est.ici_s) == ("ici", pytest.approx(0.6))
  est = roofline.estimate(flops=10e12, hbm_bytes=0.1e12, ici_bytes=0, dcn_bytes=9e9, chip=CHIP)
  assert (est.bound_by, est.dcn_s) == ("dcn", pytest.approx(0.9))


def test_model_flops_set_the_mfu_bound():
  # Remat: the chip executes 4/3 of the model's FLOPs, so the bound on MFU is 3/4.
  est = roofline.estimate(flops=40e12, hbm_bytes=0, ici_bytes=0, chip=CHIP, model_flops=30e12)
  assert est.bound_s == pytest.approx(0.4) and est.mfu_bound == pytest.approx(0.75)


def test_missing_figures_and_bad_input():
  no_dcn = roofline.Chip("x", 1e12, 1e12, 1e9, None)
  est = roofline.estimate(flops=1e12, hbm_bytes=0, ici_bytes=0, dcn_bytes=1e9, chip=no_dcn)
  assert est.dcn_s is None and est.bound_by == "compute"
  with pytest.raises(ValueError):
    roofline.estimate(flops=-1, hbm_bytes=0, ici_bytes=0, chip=CHIP)
  with pytest.raises(ValueError):
    roofline.estimate(flops=1, hbm_bytes=0, ici_bytes=1, chip=roofline.Chip("y", 1, 1, None, None))


def test_chip_table():
  assert roofline.chip_for("TPU v5 lite") is roofline.CHIPS["v5e"]
  assert roofline.chip_for("TPU v5") is roofline.CHIPS["v5p"]
  assert roofline.chip_for("NVIDIA H100 80GB HBM3") is roofline.CHIPS["h100"]
  assert roofline.chip_for("NVIDIA H200") is roofline.CHIPS["h200"]
  assert roofline.chip_for("TPU v6 lite") is roofline.CHIPS["v6e"]
  assert roofline.chip_for("cpu") is None
  for chip in roofline.CHIPS.values():
    assert chip.peak_flops > 1e14 and chip.hbm_bytes_per_s > 5e11 and chip.ici_bytes_per_s > 1e11

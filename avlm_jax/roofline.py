"""Roofline lower bound of a step time from a compiled program's costs and published chip figures.

  estimate(flops=…, hbm_bytes=…, ici_bytes=…, dcn_bytes=…, chip=CHIPS["v5e"])

All inputs are per chip (one SPMD partition). The bound is the slowest of the three resources run
at its peak with perfect overlap, so a real step is at least this long; the implied MFU bound is
model FLOPs / (bound × peak FLOP/s).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes_per_s: float
  ici_bytes_per_s: float | None  # what one chip can receive over its chip-to-chip links, one direction
  dcn_bytes_per_s: float | None  # per chip, across slices / nodes


# Per chip. ICI is the published bidirectional figure halved (what one chip can receive), which
# matches each Pod's published all-reduce bandwidth divided by its chips.
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, HBM2 1200 GBps; ICI per chip is not listed:
    # all-reduce bandwidth per Pod 1.1 PB/s over 4096 chips.
    "v4": Chip("TPU v4", 275e12, 1200e9, 1.1e15 / 4096, None),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 819 GBps HBM, 400 GBps bidirectional ICI per
    # chip (all-reduce 51.2 TB/s per 256-chip Pod), DCN 6.4 Tbps per Pod of 256 chips.
    "v5e": Chip("TPU v5e", 197e12, 819e9, 200e9, 6.4e12 / 8 / 256),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 2765 GBps HBM2e, 1200 GBps bidirectional ICI
    # per chip, DCN 50 Gbps per chip.
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 600e9, 50e9 / 8),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 1638 GBps HBM, 800 GBps bidirectional ICI per
    # chip (all-reduce 102.4 TB/s per 256-chip Pod); DCN per chip is not listed.
    "v6e": Chip("TPU v6e", 918e12, 1638e9, 400e9, None),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1979 with sparsity), HBM3 3.35 TB/s,
    # NVLink 900 GB/s bidirectional; across nodes one 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100).
    "h100": Chip("H100 SXM", 989e12, 3.35e12, 450e9, 400e9 / 8),
    # NVIDIA H100 PCIe datasheet: 756 TFLOP/s dense BF16, HBM2e 2.0 TB/s, NVLink bridge 600 GB/s.
    "h100_pcie": Chip("H100 PCIe", 756e12, 2.0e12, 300e9, 400e9 / 8),
    # NVIDIA A100 SXM 80GB datasheet: 312 TFLOP/s dense BF16, HBM2e 2039 GB/s, NVLink 600 GB/s.
    "a100": Chip("A100 SXM", 312e12, 2039e9, 300e9, 200e9 / 8),
    # NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16, HBM3e 4.8 TB/s, NVLink 900 GB/s; same NIC.
    "h200": Chip("H200 SXM", 989e12, 4.8e12, 450e9, 400e9 / 8),
}

# `device.device_kind` -> CHIPS key (first match wins: the more specific names first).
_KINDS = (("h200", "h200"), ("h100 pcie", "h100_pcie"), ("h100", "h100"), ("a100", "a100"), ("tpu v5 lite", "v5e"),
          ("tpu v5e", "v5e"), ("tpu v5p", "v5p"), ("tpu v5", "v5p"), ("tpu v4", "v4"), ("tpu v6 lite", "v6e"), ("tpu v6e", "v6e"))


def chip_for(device_kind: str) -> Chip | None:
  kind = device_kind.lower()
  for name, key in _KINDS:
    if name in kind:
      return CHIPS[key]
  return None


@dataclasses.dataclass(frozen=True)
class Estimate:
  compute_s: float
  hbm_s: float
  ici_s: float
  dcn_s: float | None  # None: traffic across slices but no published DCN figure
  bound_s: float  # the largest of the above
  bound_by: str  # "compute" | "hbm" | "ici" | "dcn"
  mfu_bound: float | None  # model FLOPs at the bound / peak; None without model FLOPs

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def estimate(*, flops: float, hbm_bytes: float, ici_bytes: float, chip: Chip, dcn_bytes: float = 0.0,
             model_flops: float | None = None) -> Estimate:
  """Lower-bound step time per chip: max(FLOPs / peak, HBM bytes / bandwidth, ICI and DCN bytes / theirs).

  `flops` is what the chip executes (XLA's count, remat included); `model_flops` the model's own
  FLOPs per chip, for the MFU bound (defaults to `flops`).
  """
  if min(flops, hbm_bytes, ici_bytes, dcn_bytes) < 0:
    raise ValueError("costs must be >= 0")
  times = {"compute": flops / chip.peak_flops, "hbm": hbm_bytes / chip.hbm_bytes_per_s}
  if ici_bytes and chip.ici_bytes_per_s is None:
    raise ValueError(f"{chip.name}: collective traffic but no ICI bandwidth figure")
  times["ici"] = ici_bytes / chip.ici_bytes_per_s if ici_bytes else 0.0
  dcn_s = 0.0
  if dcn_bytes:
    dcn_s = dcn_bytes / chip.dcn_bytes_per_s if chip.dcn_bytes_per_s else None
  if dcn_s is not None:
    times["dcn"] = dcn_s
  bound_by = max(times, key=times.get)
  bound = times[bound_by]
  mf = flops if model_flops is None else model_flops
  mfu = mf / (bound * chip.peak_flops) if bound > 0 else None
  return Estimate(times["compute"], times["hbm"], times["ici"], dcn_s, bound, bound_by, mfu)

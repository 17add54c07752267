"""launch/gpu_benchmark.sh: the CPU dry run writes its JSON and table; without a GPU it says so in one line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, *args, dry: bool):
  env = {**os.environ, "AVLM_VENV": os.path.dirname(os.path.dirname(sys.executable)),
         "AVLM_GPU_BENCHMARK_DRY": "1" if dry else "0", "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a GPU machine has one GPU here
  return subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_benchmark.sh"), str(out), *args], env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_writes_json_and_markdown(tmp_path):
  # One batch size and one timed step: the path a GPU run takes (build, compile, time, MFU,
  # memory, roofline, files), on the tiny config.
  proc = _run(tmp_path / "out", "--batches=2", "--steps=1", "--warmup=0", f"--workdir={tmp_path / 'w'}", dry=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "out" / "gpu_benchmark.json").read_text())
  assert result["dry"] is True and result["steps"] == 1 and result["device"] == "cpu"
  (row,) = result["rows"]
  assert row["batch"] == 2 and row["attention"] == "cudnn"  # asked for; the CPU falls back to XLA
  assert row["median_step_s"] > 0 and row["examples_per_s"] == pytest.approx(2 / row["median_step_s"], rel=0.01)
  assert row["flops_per_example"] > 0 and row["mfu"] is None  # no published peak for a CPU
  assert row["peak_bytes_in_use"] is None and row["total_mib_per_device"] > 0
  table = (tmp_path / "out" / "gpu_benchmark.md").read_text()
  assert table.startswith("Dry run (CPU, tiny config) on cpu")
  lines = [ln for ln in table.splitlines() if ln.startswith("| 2 |")]
  assert len(lines) == 1 and "n/a (no peak for this device)" in lines[0]


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
  proc = _run(tmp_path / "out", dry=False)
  assert proc.returncode == 2
  assert proc.stdout.strip().splitlines() == [
      "benchmark_gpu: no GPU here (jax sees cpu); run on a GPU machine, or set AVLM_GPU_BENCHMARK_DRY=1 for the "
      "CPU dry run"]
  assert not (tmp_path / "out").exists()


def test_gpu_sweep_config():
  # What a GPU run builds: avlm_b16 in bf16 with cuDNN attention on one device, on drawn shapes
  # whose findings are the labels (CheXpert's would stop the reader at the first record).
  from configs import common
  from avlm_jax.train.benchmarking import gpu_sweep_config

  c = gpu_sweep_config(128, dry=False, res=224, attention="cudnn")
  assert (c.batch_size, c.data.image_size, c.data.synthetic.image_size) == (128, 224, 224)
  assert (c.model.dtype, c.model.attention, c.model.image.width, c.model.image.depth) == ("bfloat16", "cudnn", 768, 12)
  assert c.data.kind == "synthetic_shapes" and tuple(c.labels) == tuple(common.SYNTHETIC_LABELS)
  assert dict(c.mesh) == {"data": 1, "fsdp": 1, "tensor": 1}

r"""The avlm_b16 train step on one GPU (bf16, cuDNN flash attention) over a batch sweep.

  bash launch/gpu_benchmark.sh [OUT]                  # one H100/H200: batches 64,128,256, < 8 min
  python -m launch.benchmark_gpu --out=workdir/gpu_benchmark --batches=64,128,256 --steps=10
  AVLM_GPU_BENCHMARK_DRY=1 bash launch/gpu_benchmark.sh   # CPU dry run: tiny config, batches 2,4

Per batch size: compile s, median step s (each step blocked on, after `--warmup` steps, on one
batch reused so the input pipeline is not timed), examples/s, MFU (analytic model FLOPs ×
examples/s / the chip's peak bf16 FLOP/s, as launch/benchmark_presets.py), peak device memory in
use (`device.memory_stats()`, since the start of the process: the sweep runs from the smallest
batch up, so each row's peak is its own unless a smaller batch peaked higher), the compiled
memory (arguments + temporaries + outputs − donated) and the roofline lower bound of the step.
A batch that runs out of memory gives a row saying so, and the sweep goes on.

Writes <out>/gpu_benchmark.json and <out>/gpu_benchmark.md. Without a GPU (and not dry) it exits
with one line. The data are drawn shapes at the config's resolution (data.kind=synthetic_shapes):
the step's cost does not depend on what the pixels show.
"""

import json
import os
import sys
import tempfile

from absl import app, flags

_OUT = flags.DEFINE_string("out", "workdir/gpu_benchmark", "Folder for gpu_benchmark.json and gpu_benchmark.md.")
_BATCHES = flags.DEFINE_list("batches", [], "Batch sizes, smallest first (default 64,128,256; dry: 2,4).")
_RES = flags.DEFINE_integer("res", 224, "Image resolution (avlm_b16's res argument).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per batch size (dry: 2).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation (dry: 1).")
_ATTENTION = flags.DEFINE_string("attention", "cudnn", "model.attention: xla | cudnn | auto.")
_DRY = flags.DEFINE_bool("dry", os.environ.get("AVLM_GPU_BENCHMARK_DRY", "") not in ("", "0"),
                         "The same code path on the CPU with the tiny config (default from AVLM_GPU_BENCHMARK_DRY).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the drawn data go (default: a temp dir).")


def _peak_bytes(device) -> int | None:
  stats = device.memory_stats()  # None on the CPU
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def run_batch(batch: int, dry: bool, workdir: str, steps: int, warmup: int) -> dict:
  import jax

  from avlm_jax.roofline import chip_for
  from avlm_jax.train.benchmarking import (analytic_flops_per_example, gpu_sweep_config, memory_fields, peak_flops,
                                           roofline_fields)
  from avlm_jax.train.loop import build_trainer
  from avlm_jax.train.step_timer import time_steps

  config = gpu_sweep_config(batch, dry, _RES.value, _ATTENTION.value)
  device = jax.devices()[0]
  row = {"batch": batch, "device": device.device_kind, "dtype": config.model.dtype,
         "attention": config.model.attention, "res": config.data.image_size}
  trainer = None
  try:
    trainer = build_trainer(config, workdir, devices=[device])
    compiled = trainer.step_fn
    flops = analytic_flops_per_example(config, len(config.labels))
    state = trainer.plan.initialize(jax.random.key(config.seed))
    trainer.start(state)
    _, times = time_steps(trainer, state, warmup, steps, fixed_batch=True)
  except Exception as e:  # noqa: BLE001: an out-of-memory batch is a result; anything else is raised
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    return {**row, "skipped": f"out of memory: {str(e).splitlines()[0][:200]}"}
  finally:
    if trainer is not None:
      trainer.data_iter.close()
  median = times.median_s
  ex_s = batch / median
  peak = peak_flops(device.device_kind)
  row.update({"compile_s": round(trainer.compile_s, 2), "median_step_s": round(median, 5),
              "examples_per_s": round(ex_s, 1), "flops_per_example": flops,
              "mfu": round(flops * ex_s / peak, 4) if peak else None,
              "peak_bytes_in_use": _peak_bytes(device), **memory_fields(compiled)})
  fields = roofline_fields(compiled, chip_for(device.device_kind), flops * batch)
  if "roofline_s" in fields:
    row.update({"roofline_s": fields["roofline_s"], "bound_by": fields["bound_by"], "mfu_bound": fields["mfu_bound"]})
  return row


def markdown(rows: list[dict]) -> str:
  cols = ("batch", "device", "attention", "compile s", "step s (median)", "examples/s", "MFU",
          "peak GiB in use", "compiled MiB", "roofline ms (bound by)", "MFU bound")
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['batch']} | {r['device']} | {r['attention']} | {r['skipped']} |")
      continue
    total = r.get("total_mib_per_device")
    roof = f"{r['roofline_s'] * 1e3:.3g} ({r['bound_by']})" if "roofline_s" in r else "n/a"
    mfu = "n/a (no peak for this device)" if r["mfu"] is None else f"{r['mfu']:.1%}"
    lines.append("| " + " | ".join(str(x) for x in (
        r["batch"], r["device"], r["attention"], r["compile_s"], r["median_step_s"], r["examples_per_s"], mfu,
        gib(r["peak_bytes_in_use"]), "n/a" if total is None else total, roof,
        r.get("mfu_bound", "n/a"))) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  dry = _DRY.value
  platform = jax.devices()[0].platform
  if not dry and platform != "gpu":
    print(f"benchmark_gpu: no GPU here (jax sees {platform}); run on a GPU machine, or set "
          "AVLM_GPU_BENCHMARK_DRY=1 for the CPU dry run", flush=True)
    sys.exit(2)
  batches = [int(b) for b in _BATCHES.value] or ([2, 4] if dry else [64, 128, 256])
  # The dry run's defaults keep it fast; explicit flags still win.
  steps = 2 if dry and not _STEPS.present else _STEPS.value
  warmup = 1 if dry and not _WARMUP.present else _WARMUP.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="avlm_gpu_bench_")
  rows = []
  for batch in sorted(batches):
    rows.append(run_batch(batch, dry, workdir, steps, warmup))  # one drawn corpus for all
    print(json.dumps(rows[-1]), flush=True)
  table = markdown(rows)
  print(table)
  os.makedirs(_OUT.value, exist_ok=True)
  meta = {"dry": dry, "jax": jax.__version__, "device": jax.devices()[0].device_kind, "steps": steps,
          "warmup": warmup}
  with open(os.path.join(_OUT.value, "gpu_benchmark.json"), "w") as f:
    json.dump({**meta, "rows": rows}, f, indent=1)
  with open(os.path.join(_OUT.value, "gpu_benchmark.md"), "w") as f:
    f.write(f"{'Dry run (CPU, tiny config)' if dry else 'avlm_b16 train step'} on {meta['device']}, "
            f"jax {meta['jax']}, {meta['steps']} timed steps after {meta['warmup']}:\n\n{table}\n")


if __name__ == "__main__":
  app.run(main)

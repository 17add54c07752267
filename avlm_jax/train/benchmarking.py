"""What the benchmark scripts share: model FLOPs, peak FLOP/s, compiled memory and costs, a roofline.

launch/benchmark_presets.py (sharding presets, ahead-of-time pod compiles) and
launch/benchmark_gpu.py (the GPU batch sweep) both report through these.
"""

import time

from avlm_jax import hlo_collectives, roofline


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one chip of `device_kind` (None where unknown, e.g. a CPU)."""
  chip = roofline.chip_for(device_kind)
  return chip.peak_flops if chip else None


def _transformer_macs(tokens: int, width: int, depth: int, mlp: int) -> float:
  """Multiply-adds of `depth` encoder layers over one sequence: projections, MLP, attention."""
  return depth * tokens * (4 * width * width + 2 * width * mlp + 2 * tokens * width)


def analytic_flops_per_example(config, num_prompts: int) -> float:
  """Model FLOPs of one training example: 2 × multiply-adds × 3 (forward + backward), matmuls only.

  Counts the image tower, its heads, the text tower on the 58 slot texts per image (each
  region's true and false statement; only the text projection when a frozen tower's features
  come from the cache), the label prompts (shared by the batch) and the (B·29) × (B·58) region
  logits. Remat recomputation is not model FLOPs. (Before issue 15 the count had 29 texts and
  (B·29)² logits, from before the false statements joined the candidates.)
  """
  m, b = config.model, config.batch_size
  r = 29 if m.image.anatomy_tokens else 0  # the holistic ablation has no anatomy tokens
  img, txt, e = m.image, m.text, m.embed_dim
  grid = (config.data.image_size // img.patch_size) ** 2
  macs = _transformer_macs(1 + r + grid, img.width, img.depth, img.mlp_dim)
  macs += grid * img.patch_size ** 2 * img.width  # patch embedding (1 channel)
  macs += r * (2 * img.width * img.width + 4 * img.width)  # box head
  macs += r * 2 * img.width * e + img.width * e  # region and image projections
  text_macs = lambda n_texts, length: n_texts * (_transformer_macs(length, txt.width, txt.depth, txt.mlp_dim)
                                                 if not txt.frozen else 0)
  texts = 2 * r  # slot texts: a true and a false statement per region
  macs += text_macs(texts, config.data.max_phrase_len) + texts * txt.width * e
  macs += (text_macs(num_prompts, config.data.max_prompt_len) + num_prompts * txt.width * e) / b
  macs += r * (texts * b) * e + num_prompts * e  # region–phrase and image–label logits
  return 2 * 3 * macs


def clip_flops_per_example(image_size: int, patch_size: int, channels: int, width: int, depth: int, mlp_dim: int,
                           text_len: int, text_width: int, text_depth: int, text_mlp: int, embed_dim: int,
                           batch: int) -> float:
  """Model FLOPs of one CLIP training example (both towers trained), counted as
  `analytic_flops_per_example` counts ours: image tower on CLS + patches, patch embedding, text
  tower on one caption, both projections and the image–text logits (B per example)."""
  grid = (image_size // patch_size) ** 2
  macs = _transformer_macs(1 + grid, width, depth, mlp_dim) + grid * patch_size ** 2 * channels * width
  macs += _transformer_macs(text_len, text_width, text_depth, text_mlp)
  macs += width * embed_dim + text_width * embed_dim + batch * embed_dim
  return 2 * 3 * macs


def memory_fields(compiled) -> dict:
  """Compiled memory per device in MiB: arguments, temporaries, and their total with outputs − donated."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  mib = lambda x: round(x / 2**20, 1)
  total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return {"args_mib_per_device": mib(mem.argument_size_in_bytes), "temp_mib_per_device": mib(mem.temp_size_in_bytes),
          "total_mib_per_device": mib(total)}


def xla_costs(compiled) -> tuple[float | None, float | None]:
  """(FLOPs, bytes accessed) of one device's program, from XLA's cost analysis (None where absent)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost:
    return None, None
  return (float(cost["flops"]) if "flops" in cost else None,
          float(cost["bytes accessed"]) if "bytes accessed" in cost else None)


def measure_host_chip(seconds: float = 1.0):
  """This CPU as a roofline `Chip`: peak from an f32 matmul, bandwidth from a large array copy.

  Measured, not looked up: the best of a few repeats, on whatever else the machine is running.
  """
  import jax
  import jax.numpy as jnp

  def best(fn, *args):
    out = fn(*args)
    out.block_until_ready()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
      t0 = time.perf_counter()
      fn(*args).block_until_ready()
      times.append(time.perf_counter() - t0)
    return min(times)

  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  peak = 2 * n ** 3 / best(jax.jit(lambda x: x @ x), a)
  big = jnp.ones((64 * 2**20 // 4,), jnp.float32)  # 64 MiB, well past the caches
  copy_s = best(jax.jit(lambda x: x + 1.0), big)  # one read + one write per element
  return roofline.Chip(f"{jax.devices()[0].device_kind} (measured)", peak, 2 * big.nbytes / copy_s, None, None)


def roofline_fields(compiled, chip, model_flops_per_chip: float, devices_per_slice: int | None = None) -> dict:
  """FLOPs, HBM bytes, collective bytes by kind and the roofline bound of one compiled step, per chip."""
  flops, hbm = xla_costs(compiled)
  return roofline_from_hlo(compiled.as_text(), flops, hbm, chip, model_flops_per_chip, devices_per_slice)


def roofline_from_hlo(hlo_text: str, xla_flops: float | None, hbm_bytes: float | None, chip,
                      model_flops_per_chip: float, devices_per_slice: int | None = None) -> dict:
  """`roofline_fields` from a program's HLO text and XLA's costs (e.g. a saved AOT compile's)."""
  coll = hlo_collectives.collective_stats(hlo_text, devices_per_slice)
  matmul = hlo_collectives.matmul_flops(hlo_text)
  out = {"xla_flops_per_chip": xla_flops, "hlo_matmul_flops_per_chip": matmul, "hbm_bytes_per_chip": hbm_bytes,
         "collective_bytes_per_chip": {k: v for k, v in coll.result_bytes.items() if v},
         "collective_wire_bytes_per_chip": coll.total_wire_bytes, "dcn_wire_bytes_per_chip": coll.total_dcn_wire_bytes,
         "unknown_trip_loops": coll.unknown_trip_loops}
  if chip is None or xla_flops is None or hbm_bytes is None:
    return {**out, "roofline": "n/a (no chip figures or no XLA costs)"}
  # XLA's cost analysis counts a while loop's body once (scan over layers); the HLO's matmuls
  # counted per iteration (remat included) are the better figure there. Both are lower bounds
  # of what the chip executes, and so is the model's own count.
  est = roofline.estimate(flops=max(xla_flops, matmul, model_flops_per_chip), hbm_bytes=hbm_bytes,
                          # the ICI phases of a collective that also crosses slices still run: all of it
                          ici_bytes=coll.total_wire_bytes,
                          dcn_bytes=coll.total_dcn_wire_bytes, chip=chip, model_flops=model_flops_per_chip)
  return {**out, "chip": chip.name, "roofline_s": est.bound_s, "bound_by": est.bound_by,
          "roofline_parts_s": {"compute": est.compute_s, "hbm": est.hbm_s, "ici": est.ici_s, "dcn": est.dcn_s},
          "mfu_bound": round(est.mfu_bound, 4) if est.mfu_bound is not None else None}


def gpu_sweep_config(batch: int, dry: bool, res: int, attention: str):
  """launch/benchmark_gpu.py's config: avlm_b16 (or, dry, the tiny config) at `batch` on one device,
  on drawn shapes."""
  from configs import avlm_b16, common, tiny

  if dry:
    c = tiny.get_config(f"batch={batch},data=shapes")
    # avlm_b16's structure at tiny size: bf16, scanned image layers with remat, frozen text tower.
    c.model.dtype = "bfloat16"
    c.model.image.update(dict(scan=True, remat_policy="dots"))
    c.model.text.update(dict(scan=True, frozen=True))
  else:
    c = avlm_b16.get_config(f"res={res},batch={batch},preset=dp")
    c.data.kind = "synthetic_shapes"
    c.labels = common.base_config().labels  # the drawn corpus' findings (CheXpert's 13 are not in it)
    c.data.synthetic.image_size = res
    c.data.synthetic.num_train = 512  # enough for the largest default batch; one batch is reused
    c.data.synthetic.num_val = 8
  c.model.attention = attention
  c.mesh.update({"data": 1, "fsdp": 1, "tensor": 1})
  c.log_grad_signal = False
  return c

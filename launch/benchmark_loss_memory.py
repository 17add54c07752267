r"""Compiled per-device memory of the region–phrase loss (value and gradients): global vs ring.

  python -m launch.benchmark_loss_memory
  python -m launch.benchmark_loss_memory --devices=8,64 --local_batch=2,8,32,64 --embed=512 --chunk=256

Compiles (does not run) `value_and_grad` of `contrastive.region_phrase_loss` (GSPMD on the global
(B·29) × (2·B·29) logits: a true and a false text per slot) and of `ring.region_phrase_loss` on a mesh of D fake CPU devices, for each local
batch b (global batch D·b, N = 29·D·b region slots), and prints one Markdown row per case from
`compiled.memory_analysis()`: the temporary buffers per device. The global version's temporaries
grow with b · D·b (quadratically in the global batch at a fixed D); the ring's grow with b only
(linearly), whatever D is.
"""

import os
import sys

_MAX_DEVICES = 64
if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_MAX_DEVICES}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

from absl import app, flags  # noqa: E402

_DEVICES = flags.DEFINE_list("devices", ["8", "64"], f"Mesh sizes (data axis), each <= {_MAX_DEVICES}.")
_LOCAL = flags.DEFINE_list("local_batch", ["2", "8", "32", "64"], "Images per device.")
_EMBED = flags.DEFINE_integer("embed", 512, "Joint embedding width.")
_CHUNK = flags.DEFINE_integer("chunk", 256, "Ring logit tile width (config.loss.ring_chunk).")
_JSON = flags.DEFINE_string("json", "", "Also write the rows here as JSON.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from avlm_jax import anatomy, sharding
  from avlm_jax.losses import contrastive, ring

  def compiled_temp_mib(fn, n, mesh, **kw):
    # Each region slot has a true and a false text: 2N candidates, as in training.
    def loss(r, t, ids, valid, scale, tf, ids_f, valid_f):
      return fn(r, t, ids, valid, scale, tf, ids_f, valid_f, **kw)["loss"]

    rows = sharding.batch_sharding(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
    texts = (spec((n, _EMBED.value), jnp.float32), spec((n, 2), jnp.int32), spec((n,), jnp.bool_))
    args = (spec((n, _EMBED.value), jnp.float32), *texts,
            jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh)), *texts)
    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 4, 5))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20

  results = []
  print("| devices | local batch | global batch | region slots N | global: temp MiB/device | "
        "ring: temp MiB/device | global / ring |")
  print("|---|---|---|---|---|---|---|")
  for d in map(int, _DEVICES.value):
    mesh = sharding.make_mesh({"data": d}, jax.devices()[:d])
    for b in map(int, _LOCAL.value):
      n = anatomy.NUM_REGIONS * b * d
      glob = compiled_temp_mib(contrastive.region_phrase_loss, n, mesh)
      rng = compiled_temp_mib(ring.region_phrase_loss, n, mesh, chunk=_CHUNK.value)
      row = {"devices": d, "local_batch": b, "global_batch": b * d, "slots": n,
             "global_temp_mib": round(glob, 2), "ring_temp_mib": round(rng, 2)}
      results.append(row)
      print(f"| {d} | {b} | {b * d} | {n} | {glob:.2f} | {rng:.2f} | {glob / max(rng, 1e-9):.1f}× |",
            flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"embed": _EMBED.value, "chunk": _CHUNK.value, "rows": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)

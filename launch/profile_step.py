r"""Profile a config's train step: where its time goes, op by op and by model part.

  python -m launch.profile_step --config=configs/clip_shapes.py --steps=20
  python -m launch.profile_step --config=configs/tiny.py:data=shapes --steps=20 --top=30 --out=workdir/profile

Compiles the step, runs `--warmup` steps on one batch, then traces `--steps` steps with
`jax.profiler` (the trace stays in <out>/trace for TensorBoard/XProf/Perfetto) and sums the time of
every executed HLO op (avlm_jax/train/op_profile.py). Prints the median step time, the `--top` ops
(ms per step, share of all op time, opcode, the JAX operation they come from) and the op time
summed by model part (`--depth` path components: 'image/block_0', 'bwd image/block_0', ...).
Writes <out>/profile.json. Ops run on parallel threads, so shares are of summed op time.
"""

import json
import os
import statistics
import tempfile

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Traced steps.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps before the trace.")
_TOP = flags.DEFINE_integer("top", 25, "How many ops to list.")
_DEPTH = flags.DEFINE_integer("depth", 2, "Path components of the by-part summary.")
_OUT = flags.DEFINE_string("out", None, "Folder for trace/ and profile.json (default: a temp dir).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from avlm_jax.train import op_profile
  from avlm_jax.train.step_timer import started_trainer

  config = _CONFIG.value
  out = _OUT.value or tempfile.mkdtemp(prefix="avlm_profile_")
  trainer, state = started_trainer(config, os.path.join(out, "work"))
  try:
    compiled = trainer.step_fn
    state, step_s, xplane = op_profile.trace_steps(trainer, state, _STEPS.value, _WARMUP.value,
                                                   os.path.join(out, "trace"))
  finally:
    trainer.data_iter.close()
  info = op_profile.hlo_op_info(compiled.as_text())
  seconds = op_profile.op_seconds(xplane, "jit_train_step")
  if not seconds:
    raise SystemExit(f"profile_step: the trace {xplane} has no op of jit_train_step (no hlo_op events)")
  steps = _STEPS.value
  top = op_profile.top_ops(seconds, info, steps, _TOP.value)
  parts = op_profile.by_source(seconds, info, _DEPTH.value)
  total = sum(s for s, _ in seconds.values())
  median = statistics.median(step_s)
  print(f"{jax.devices()[0].device_kind}: median step {median * 1e3:.1f} ms over {steps} traced steps; "
        f"op time {total / steps * 1e3:.1f} ms per step (summed over threads)")
  print("\n| op | ms/step | share | opcode | from |\n|---|---|---|---|---|")
  for r in top:
    print(f"| {r['op']} | {r['ms_per_step']:.2f} | {r['share']:.1%} | {r['opcode']} | {r['source']} |")
  print("\n| part | ms/step | share |\n|---|---|---|")
  for name, s in list(parts.items())[:_TOP.value]:
    print(f"| {name} | {s / steps * 1e3:.2f} | {s / total:.1%} |")
  result = {"device": jax.devices()[0].device_kind, "median_step_s": median, "op_s_per_step": total / steps,
            "steps": steps, "top_ops": top,
            "by_part": {k: v / steps for k, v in parts.items()}, "trace": xplane}
  with open(os.path.join(out, "profile.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {os.path.join(out, 'profile.json')}; trace in {os.path.join(out, 'trace')}")


if __name__ == "__main__":
  app.run(main)

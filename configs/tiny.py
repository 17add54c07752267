r"""Tiny Anatomy-VLM on the built-in synthetic shapes: the Quick-start job, tests and CI.

2-layer ViT (32 px, patch 8, width 32) with 29 anatomy tokens, 2-layer BERT-style text tower,
batch 16. Generates its data into <workdir>/data on first use.

  python -m launch.train --config=configs/tiny.py --workdir=workdir/tiny
  python -m launch.train --config=configs/tiny.py:steps=300,preset=fsdp --workdir=workdir/tiny_fsdp

Expect (2-core CPU, one device): data generation ~1 s, compile ~10 s, then ~12 steps/s; about
35 s in all. The total loss falls from ~9.6 (step 20) to ~2.8 (step 200); the box terms fall
fastest (GIoU loss 1.1 -> 0.3), the region-phrase loss 3.2 -> 1.3. Checkpoints go to
<workdir>/checkpoints, metrics to <workdir>/metrics.jsonl. Rerunning the command resumes.

Arguments: steps (int), batch (int), preset ('dp' | 'fsdp'), fsdp (mesh fsdp size; data = -1).
"""

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=200, batch=16, preset="dp", fsdp=1)
  c = common.base_config()
  c.total_steps = arg.steps
  c.batch_size = arg.batch
  c.log_every = 20
  c.checkpoint_every = 100
  c.sharding.preset = arg.preset
  c.mesh.fsdp = arg.fsdp
  return c

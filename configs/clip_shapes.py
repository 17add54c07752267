r"""The train step at the shapes of issue 15's CPU comparison with open_clip (drawn shapes, 64 px).

  python -m launch.benchmark_vs_open_clip --open_clip_python=/tmp/open_clip_venv/bin/python
  python -m launch.profile_step --config=configs/clip_shapes.py --steps=20

ViT: 64 px, patch 8 (64 patches) + CLS + 29 anatomy tokens, width 128, 2 layers, 2 heads, MLP 512;
text tower width 128, 2 layers, 2 heads, MLP 512, context 32; joint embedding 128; batch 32; fp32.
`text=frozen` (the default) is the paper's setting: a frozen text tower whose pooled features come
from the feature cache, so the step runs the image tower, the heads and the losses only.
`text=trained` trains the text tower on the 58 region texts per image and the label prompts.

What it should show (2-core CPU): see BENCHMARKS.md "The step beside open_clip".

Arguments: batch (int), text ('frozen' | 'trained').
"""

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, batch=32, text="frozen")
  if arg.text not in ("frozen", "trained"):
    raise ValueError(f"clip_shapes config: text={arg.text!r}; expected 'frozen' or 'trained'")
  c = common.base_config()
  c.batch_size = arg.batch
  c.total_steps = 1000
  c.log_grad_signal = False
  c.data.kind = "synthetic_shapes"
  c.data.image_size = 64
  c.data.synthetic.image_size = 64
  c.data.max_phrase_len = 32
  c.data.max_prompt_len = 32
  c.model.embed_dim = 128
  c.model.image.update(dict(patch_size=8, width=128, depth=2, num_heads=2, mlp_dim=512))
  c.model.text.update(dict(width=128, depth=2, num_heads=2, mlp_dim=512, max_len=32,
                           frozen=arg.text == "frozen"))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return c

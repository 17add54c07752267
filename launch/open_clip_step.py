r"""open_clip's CLIP train step, timed: run by launch/benchmark_vs_open_clip.py in a torch venv.

  /tmp/open_clip_venv/bin/python launch/open_clip_step.py '{"batch": 32, "steps": 50, ...}'

This file imports torch and open_clip only (never avlm_jax), so it runs in a separate venv:

  python3 -m venv /tmp/open_clip_venv
  /tmp/open_clip_venv/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0

The step: both towers trained, open_clip's ClipLoss, AdamW (weight decay 1e-4), fp32, on random
images and token ids (the step's cost does not depend on them). Prints one JSON line: the
per-step seconds of `steps` timed steps after `warmup` untimed ones, and the versions.
"""

import json
import os
import sys
import time


def main(argv):
  args = json.loads(argv[1]) if len(argv) > 1 else {}
  import open_clip
  import torch
  from open_clip.loss import ClipLoss

  threads = int(args.get("threads") or os.cpu_count())
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  width, heads = args["width"], args["heads"]
  vision = dict(image_size=args["image_size"], patch_size=args["patch_size"], width=width,
                layers=args["layers"], head_width=width // heads, mlp_ratio=args["mlp_dim"] / width)
  text = dict(context_length=args["context"], vocab_size=args["vocab_size"], width=args["text_width"],
              heads=heads, layers=args["layers"], mlp_ratio=args["mlp_dim"] / args["text_width"])
  model = open_clip.CLIP(embed_dim=args["embed_dim"], vision_cfg=vision, text_cfg=text)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
  loss_fn = ClipLoss()
  b = args["batch"]
  images = torch.randn(b, 3, args["image_size"], args["image_size"])
  tokens = torch.randint(1, args["vocab_size"], (b, args["context"]))

  def step():
    image_features, text_features, logit_scale = model(images, tokens)
    loss = loss_fn(image_features, text_features, logit_scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)  # the host sees the loss: the step is complete

  for _ in range(args["warmup"]):
    step()
  step_s = []
  for _ in range(args["steps"]):
    t0 = time.perf_counter()
    step()
    step_s.append(time.perf_counter() - t0)
  params = sum(p.numel() for p in model.parameters())
  print(json.dumps({"step_s": step_s, "torch": torch.__version__, "open_clip": open_clip.__version__,
                    "threads": threads, "params": params}))


if __name__ == "__main__":
  main(sys.argv)

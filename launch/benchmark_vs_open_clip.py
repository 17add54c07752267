r"""Our train step beside open_clip's CLIP step at the same shapes, interleaved, on this machine.

  python3 -m venv /tmp/open_clip_venv
  /tmp/open_clip_venv/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0
  python -m launch.benchmark_vs_open_clip --open_clip_python=/tmp/open_clip_venv/bin/python

open_clip runs in that separate venv (launch/open_clip_step.py, a subprocess), never in the
project's own. Shapes: configs/clip_shapes.py (64 px, patch 8, width 128, 2 layers, 2 heads, MLP
512, text context 32 and width 128, embedding 128, batch 32, fp32). Contenders (`--contenders`):

  open_clip   open_clip's CLIP: both towers trained, ClipLoss, AdamW
  avlm        ours in the paper's setting: frozen text tower, cached text features, every loss term
  avlm_text   ours with the text tower trained on the 58 region texts per image and the prompts

Each round runs every contender for `--warmup` untimed and `--steps` timed steps on one batch
(the input pipeline is not timed; ours is compiled once, before the first round). Rounds
alternate the contenders, so drift of the machine's speed hits all of them alike. Per contender:
the median over rounds of each round's median step, GFLOP per example (the analytic model count,
`avlm_jax.train.benchmarking`), achieved GFLOP/s, and the ratios to open_clip.

Appends JSON lines to `--out` (one per contender and round, then one summary per contender, all
with the machine, the load average and the commit) and prints a Markdown table.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import time

from absl import app, flags

_OPEN_CLIP_PYTHON = flags.DEFINE_string(
    "open_clip_python", "", "Python of a venv with torch and open_clip_torch (see the docstring).")
_CONTENDERS = flags.DEFINE_list("contenders", ["open_clip", "avlm"], "open_clip | avlm | avlm_text.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps per contender and round.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps per contender and round.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_VOCAB = flags.DEFINE_integer("open_clip_vocab", 49408, "open_clip's vocabulary: its default (CLIP's BPE); "
                              "a small one (e.g. 1000) drops most of its embedding's optimizer update, "
                              "the harder comparison for us.")
_OUT = flags.DEFINE_string("out", "results/step_vs_open_clip.jsonl", "JSON lines are appended here.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the drawn shapes go (default: a temp dir).")


def main(argv):
  del argv
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from avlm_jax.train.open_clip_side_by_side import (CONTENDERS, OpenClipError, OurStep, commit, markdown,
                                                     open_clip_args, open_clip_flops, run_open_clip, summarize)

  unknown = [c for c in _CONTENDERS.value if c not in CONTENDERS]
  if unknown:
    raise app.UsageError(f"--contenders: {unknown} not among {CONTENDERS}")
  if "open_clip" in _CONTENDERS.value and not _OPEN_CLIP_PYTHON.value:
    raise app.UsageError("--open_clip_python is needed for the open_clip contender (a venv with torch and "
                         "open_clip_torch; see the docstring), or leave open_clip out of --contenders")
  batch, steps, warmup = _BATCH.value, _STEPS.value, _WARMUP.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="avlm_vs_open_clip_")
  ours, flops, clip_args = {}, {}, None
  for name in _CONTENDERS.value:
    if name == "open_clip":
      continue
    ours[name] = OurStep("frozen" if name == "avlm" else "trained", batch, workdir)
    flops[name] = ours[name].flops
    clip_args = clip_args or open_clip_args(ours[name].config, batch, _VOCAB.value, steps, warmup)
  if clip_args is None:
    from configs import clip_shapes
    clip_args = open_clip_args(clip_shapes.get_config(f"batch={batch}"), batch, _VOCAB.value, steps, warmup)
  flops["open_clip"] = open_clip_flops(clip_args)

  meta = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": commit(), "machine": platform.node(), "cpus": os.cpu_count(),
          "jax": jax.__version__, "device": jax.devices()[0].device_kind, "batch": batch, "steps": steps,
          "warmup": warmup, "load_avg_start": os.getloadavg()[0]}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  per_round: dict[str, list[float]] = {name: [] for name in _CONTENDERS.value}
  versions = {}
  with open(_OUT.value, "a") as out:
    for r in range(_ROUNDS.value):
      for name in _CONTENDERS.value:
        t0 = time.perf_counter()
        if name == "open_clip":
          try:
            res = run_open_clip(_OPEN_CLIP_PYTHON.value, clip_args)
          except OpenClipError as e:
            raise SystemExit(f"benchmark_vs_open_clip: {e}") from None
          step_s = res.pop("step_s")
          versions = res
        else:
          step_s = ours[name].run(steps, warmup)
        per_round[name].append(statistics.median(step_s))
        line = {**meta, "kind": "round", "round": r, "contender": name, "median_step_s": per_round[name][-1],
                "min_step_s": min(step_s), "wall_s": time.perf_counter() - t0}
        out.write(json.dumps(line) + "\n")
        out.flush()
        print(json.dumps(line), flush=True)
    rows = summarize(per_round, flops, batch)
    meta["load_avg_end"] = os.getloadavg()[0]
    for row in rows:
      extra = {"open_clip_versions": versions, "open_clip_vocab": clip_args["vocab_size"]} \
          if row["contender"] == "open_clip" else {}
      out.write(json.dumps({**meta, "kind": "summary", **row, **extra}) + "\n")
  for ours_step in ours.values():
    ours_step.close()
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)

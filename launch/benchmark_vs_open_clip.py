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
import subprocess
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

CONTENDERS = ("open_clip", "avlm", "avlm_text")


def open_clip_args(config, batch: int, vocab: int, steps: int, warmup: int) -> dict:
  """launch/open_clip_step.py's arguments: the config's image tower and text shapes."""
  img, txt = config.model.image, config.model.text
  return {"batch": batch, "steps": steps, "warmup": warmup, "image_size": config.data.image_size,
          "patch_size": img.patch_size, "width": img.width, "layers": img.depth, "heads": img.num_heads,
          "mlp_dim": img.mlp_dim, "context": txt.max_len, "text_width": txt.width, "vocab_size": vocab,
          "embed_dim": config.model.embed_dim}


def open_clip_flops(args: dict) -> float:
  from avlm_jax.train.benchmarking import clip_flops_per_example

  return clip_flops_per_example(args["image_size"], args["patch_size"], 3, args["width"], args["layers"],
                                args["mlp_dim"], args["context"], args["text_width"], args["layers"],
                                args["mlp_dim"], args["embed_dim"], args["batch"])


def run_open_clip(python: str, args: dict) -> dict:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open_clip_step.py")
  proc = subprocess.run([python, script, json.dumps(args)], capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise SystemExit(f"benchmark_vs_open_clip: open_clip step failed under {python} "
                     f"(exit {proc.returncode}): {tail}")
  return json.loads(lines[-1])


class OurStep:
  """One of our contenders: built and compiled once, then timed on one batch per round."""

  def __init__(self, text: str, batch: int, workdir: str):
    import jax

    from avlm_jax.train.benchmarking import analytic_flops_per_example
    from avlm_jax.train.step_timer import started_trainer
    from configs import clip_shapes

    self.config = clip_shapes.get_config(f"batch={batch},text={text}")
    # One device, as open_clip's one process.
    self.trainer, self.state = started_trainer(self.config, workdir, devices=jax.devices()[:1])
    self.trainer.step_fn  # noqa: B018: compile now, outside the timed rounds
    self.flops = analytic_flops_per_example(self.config, len(self.config.labels))

  def run(self, steps: int, warmup: int) -> list[float]:
    from avlm_jax.train.step_timer import time_steps

    self.state, times = time_steps(self.trainer, self.state, warmup, steps, fixed_batch=True)
    return times.step_s

  def close(self):
    self.trainer.data_iter.close()


def _commit() -> str | None:
  """The checkout's commit, '+dirty' when tracked files differ from it."""
  try:
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def summarize(per_round: dict[str, list[float]], flops: dict[str, float], batch: int) -> list[dict]:
  """Per contender: median of round medians, GFLOP/example, GFLOP/s and the ratios to open_clip."""
  rows = []
  for name, medians in per_round.items():
    step = statistics.median(medians)
    rows.append({"contender": name, "median_step_s": step, "round_medians_s": medians,
                 "gflop_per_example": flops[name] / 1e9, "gflop_s": flops[name] * batch / step / 1e9})
  ref = next((r for r in rows if r["contender"] == "open_clip"), None)
  for r in rows:
    if ref is not None:
      r["step_vs_open_clip"] = r["median_step_s"] / ref["median_step_s"]
      r["gflop_s_vs_open_clip"] = r["gflop_s"] / ref["gflop_s"]
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| contender | step s (median) | GFLOP/example | GFLOP/s | step / open_clip's | GFLOP/s / open_clip's |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    ratio = lambda k: f"{r[k]:.2f}" if k in r else "n/a"  # noqa: E731
    lines.append(f"| {r['contender']} | {r['median_step_s']:.4f} | {r['gflop_per_example']:.3f} | "
                 f"{r['gflop_s']:.1f} | {ratio('step_vs_open_clip')} | {ratio('gflop_s_vs_open_clip')} |")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax

  jax.config.update("jax_threefry_partitionable", True)
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
          "commit": _commit(), "machine": platform.node(), "cpus": os.cpu_count(),
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
          res = run_open_clip(_OPEN_CLIP_PYTHON.value, clip_args)
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

"""Our train step beside open_clip's CLIP step: the parts of launch/benchmark_vs_open_clip.py.

open_clip runs as a subprocess (launch/open_clip_step.py) under another interpreter, a venv with
torch, never in this one. Our contenders build configs/clip_shapes.py on one device.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class OpenClipError(RuntimeError):
  """open_clip's step could not run under the given interpreter (one line saying why)."""


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
  script = os.path.join(_ROOT, "launch", "open_clip_step.py")
  proc = subprocess.run([python, script, json.dumps(args)], capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise OpenClipError(f"open_clip step failed under {python} (exit {proc.returncode}): {tail}")
  return json.loads(lines[-1])


class OurStep:
  """One of our contenders: built and compiled once, then timed on one batch per round."""

  def __init__(self, text: str, batch: int, workdir: str, config=None):
    """`text`: 'frozen' (the paper's setting) or 'trained'; `config` replaces
    configs/clip_shapes.py's (the tests pass a smaller one)."""
    import jax

    from avlm_jax.train.benchmarking import analytic_flops_per_example
    from avlm_jax.train.step_timer import started_trainer
    from configs import clip_shapes

    self.config = config if config is not None else clip_shapes.get_config(f"batch={batch},text={text}")
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


def commit() -> str | None:
  """The checkout's commit, '+dirty' when tracked files outside results/ (where the JSON lines
  go) differ from it."""
  try:
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True, cwd=_ROOT).stdout.strip()  # noqa: E731
    dirty = git("status", "--porcelain", "-uno", "--", ".", ":(exclude)results")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
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

"""launch/benchmark_vs_open_clip.py (avlm_jax/train/open_clip_side_by_side.py): our contender runs, open_clip's venv is checked, the summary is right.

open_clip itself needs torch, which the project's venv never has; its script is run here only to
check the one-line failure when the interpreter lacks it.
"""

import statistics
import sys

import pytest

from avlm_jax.train.benchmarking import clip_flops_per_example
from configs import clip_shapes
from avlm_jax.train import open_clip_side_by_side as bench


def test_an_interpreter_without_open_clip_is_named():
  args = bench.open_clip_args(clip_shapes.get_config(), 2, 100, steps=1, warmup=0)
  with pytest.raises(bench.OpenClipError) as e:
    bench.run_open_clip(sys.executable, args)
  msg = str(e.value)
  assert sys.executable in msg and "No module named" in msg and "\n" not in msg


def test_open_clip_gets_our_shapes_and_its_flops_are_counted_alike():
  c = clip_shapes.get_config("batch=8")
  args = bench.open_clip_args(c, 8, 49408, steps=3, warmup=1)
  assert args == {"batch": 8, "steps": 3, "warmup": 1, "image_size": 64, "patch_size": 8, "width": 128, "layers": 2,
                  "heads": 2, "mlp_dim": 512, "context": 32, "text_width": 128, "vocab_size": 49408, "embed_dim": 128}
  assert bench.open_clip_flops(args) == clip_flops_per_example(64, 8, 3, 128, 2, 512, 32, 128, 2, 512, 128, 8)


def test_summary_is_the_median_of_round_medians_with_ratios():
  rows = bench.summarize({"open_clip": [0.10, 0.12, 0.11], "avlm": [0.30, 0.20, 0.22]},
                         {"open_clip": 2e9, "avlm": 3e9}, batch=4)
  by = {r["contender"]: r for r in rows}
  assert by["avlm"]["median_step_s"] == 0.22 and by["open_clip"]["median_step_s"] == 0.11
  assert by["avlm"]["gflop_s"] == pytest.approx(3 * 4 / 0.22)
  assert by["avlm"]["step_vs_open_clip"] == pytest.approx(2.0)
  assert by["avlm"]["gflop_s_vs_open_clip"] == pytest.approx((12 / 0.22) / (8 / 0.11))
  assert "| avlm | 0.2200 |" in bench.markdown(rows)


def test_our_paper_setting_step_runs_is_timed_and_profiled(tmp_path):
  """The avlm contender compiles and times the paper-setting step; launch.profile_step's trace
  (op_profile.trace_steps) of that same step names its parts (one compile for both)."""
  from avlm_jax.train import op_profile

  config = clip_shapes.get_config("batch=2")
  config.model.image.update(dict(depth=1, width=32, mlp_dim=64))  # the same step, smaller: a faster compile
  config.data.synthetic.update(dict(num_train=16, num_val=8))
  ours = bench.OurStep("frozen", 2, str(tmp_path / "work"), config=config)
  try:
    assert ours.config.model.text.frozen and ours.flops > 0
    times = ours.run(steps=3, warmup=1)
    ours.state, step_s, xplane = op_profile.trace_steps(ours.trainer, ours.state, 2, 0, str(tmp_path / "trace"))
  finally:
    ours.close()
  assert len(times) == 3 and statistics.median(times) > 0 and len(step_s) == 2
  seconds = op_profile.op_seconds(xplane, "jit_train_step")
  # Every op of the step ran in both traced steps (a sort reports several events per run).
  assert all(n >= 2 for _, n in seconds.values())
  assert sum(n == 2 for _, n in seconds.values()) > 0.95 * len(seconds)
  parts = op_profile.by_source(seconds, op_profile.hlo_op_info(ours.trainer.step_fn.as_text()), depth=2)
  for part in ("image/block_0", "bwd image/block_0", "image/patch_embedding"):
    assert parts.get(part, 0) > 0, sorted(parts)[:20]

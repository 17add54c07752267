"""op_profile reads a real jax.profiler trace: every executed op is timed and labelled with its source."""

import jax
import jax.numpy as jnp
import pytest

from avlm_jax.train import op_profile


def test_profile_of_a_jitted_function_names_its_ops(tmp_path):
  def mlp(x, w1, w2):
    h = jnp.tanh(x @ w1)
    return jnp.sum(h @ w2)

  k = jax.random.split(jax.random.key(0), 3)
  x, w1, w2 = (jax.random.normal(k[0], (256, 512)), jax.random.normal(k[1], (512, 1024)),
               jax.random.normal(k[2], (1024, 256)))
  fn = jax.jit(jax.grad(mlp, argnums=(1, 2)))
  compiled = fn.lower(x, w1, w2).compile()
  jax.block_until_ready(compiled(x, w1, w2))
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(3):
    jax.block_until_ready(compiled(x, w1, w2))
  jax.profiler.stop_trace()

  module = compiled.as_text().split("HloModule ", 1)[1].split(",", 1)[0].split(" ", 1)[0]
  seconds = op_profile.op_seconds(op_profile.latest_xplane(str(tmp_path)), module)
  info = op_profile.hlo_op_info(compiled.as_text())
  assert seconds, "no op events in the trace"
  assert set(seconds) <= set(info), f"traced ops missing from the HLO text: {set(seconds) - set(info)}"
  assert all(n == 3 for _, n in seconds.values())  # each op ran once per call
  rows = op_profile.top_ops(seconds, info, steps=3, k=10_000)
  assert abs(sum(r["share"] for r in rows) - 1) < 1e-9
  assert rows == sorted(rows, key=lambda r: -r["ms_per_step"])
  # The matmuls (O(n³) against the copies' O(n²)) take most of the time and say where they come from.
  dots = [r for r in rows if "dot" in r["opcode"]]
  assert len(dots) >= 3 and any("dot_general" in r["source"] for r in dots)
  assert sum(r["share"] for r in dots) > 0.5
  parts = op_profile.by_source(seconds, info, depth=1)
  assert any(k.startswith("bwd") for k in parts), parts  # the transposed (backward) ops are told apart
  assert sum(parts.values()) == pytest.approx(sum(s for s, _ in seconds.values()))


def test_readable_source_names():
  assert op_profile.readable("jit(train_step)/transpose(jvp(AnatomyVLM))/image/block_0/mlp/fc1/dot_general") \
      == "bwd image/block_0/mlp/fc1/dot_general"
  assert op_profile.readable("jit(train_step)/jvp(AnatomyVLM)/image/encoder_ln/add") == "image/encoder_ln/add"
  assert op_profile.readable("") == ""


def test_missing_trace_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    op_profile.latest_xplane(str(tmp_path))

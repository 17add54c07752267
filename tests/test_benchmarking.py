"""The analytic model FLOPs that MFU and GFLOP/s are quoted in count the step's matmuls."""

import jax
import numpy as np
import pytest

from avlm_jax import hlo_collectives, sharding
from avlm_jax.train import data as train_data
from avlm_jax.train import schedule
from avlm_jax.train.benchmarking import analytic_flops_per_example, clip_flops_per_example
from avlm_jax.train.compiled_steps import compile_run
from avlm_jax.train.step import make_train_step
from avlm_jax.train.state import make_optimizer, optimizer_groups
from configs import clip_shapes


def _lowered_step_hlo(config, vocab_size: int = 100) -> str:
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  prompt_shape = (len(config.labels), config.data.max_prompt_len)
  run = compile_run(config, vocab_size, prompt_shape, mesh, say=lambda _: None)
  tx = make_optimizer(config.optimizer, config.total_steps, optimizer_groups(config.optimizer))
  step = make_train_step(run.model, tx, config.loss, config.seed, schedule.stage_starts(config.stages, config.total_steps))
  prompt_spec = (jax.ShapeDtypeStruct((len(config.labels), config.model.text.width), np.float32)
                 if config.model.text.frozen else jax.ShapeDtypeStruct(prompt_shape, np.int32))
  with sharding.activate(mesh, run.plan.rules):
    lowered = jax.jit(step).lower(run.plan.abstract, train_data.batch_spec(config), prompt_spec)
  return lowered.as_text(dialect="hlo")


@pytest.mark.parametrize("text", ["frozen", "trained"])
def test_analytic_flops_match_the_steps_matmuls(text):
  """Within 3 % of the matmul FLOPs in the step's HLO (forward and backward; the count leaves out
  the pooling probe's few small matmuls). A term missing from the count, such as the false texts'
  half of the region logits, would be off by more."""
  config = clip_shapes.get_config(f"batch=8,text={text}")
  hlo_flops = hlo_collectives.matmul_flops(_lowered_step_hlo(config))
  analytic = analytic_flops_per_example(config, len(config.labels)) * config.batch_size
  assert analytic == pytest.approx(hlo_flops, rel=0.03)


def test_clip_count_by_hand():
  # One layer, 4 patches + CLS, width 2, MLP 4; text 3 tokens, width 2, MLP 4; embed 2; batch 5.
  image = 5 * (4 * 4 + 2 * 2 * 4 + 2 * 5 * 2) + 4 * 4 * 1 * 2  # blocks + patch embedding
  text = 3 * (4 * 4 + 2 * 2 * 4 + 2 * 3 * 2)
  heads = 2 * 2 + 2 * 2 + 5 * 2  # projections and the image–text logits
  assert clip_flops_per_example(4, 2, 1, 2, 1, 4, 3, 2, 1, 4, 2, 5) == 6 * (image + text + heads)

"""The paper's three training stages: detection -> + image-level alignment -> + region-phrase alignment.

Stage boundaries come from `config.stages` (`global_start`, `fine_start`): how many steps train
before the term joins, as a step count (>= 1) or a fraction of `total_steps` (in [0, 1)); 0 means
from the start. With `global_start=2` steps 1 and 2 are detection only and step 3 is the first with
the image-level loss. A term's weight is its configured weight once its stage has begun and 0
before; the stage and the weights in force are reported with the other metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def stage_starts(stages: ml_collections.ConfigDict, total_steps: int) -> tuple[int, int]:
  """(global_start, fine_start) in steps; a clear error for an impossible order or value."""
  def to_step(name: str) -> int:
    v = float(stages[name])
    if v < 0:
      raise ValueError(f"config.stages.{name}={v} is negative")
    return int(round(v * total_steps)) if v < 1 else int(v)

  g, f = to_step("global_start"), to_step("fine_start")
  if f < g:
    raise ValueError(f"config.stages: fine_start (step {f}) precedes global_start (step {g}); the "
                     "stages are detection -> +global -> +fine")
  return g, f


def loss_weights(step: jax.Array, loss_cfg: ml_collections.ConfigDict, starts: tuple[int, int]) -> dict:
  """Weights in force at `step` (a traced int) and the stage number (1, 2 or 3)."""
  g, f = starts
  global_on = (step >= g).astype(jnp.float32)
  fine_on = (step >= f).astype(jnp.float32)
  return {
      "anatomy_weight": jnp.float32(loss_cfg.anatomy_weight),
      "l1_weight": jnp.float32(loss_cfg.l1_weight),
      "giou_weight": jnp.float32(loss_cfg.giou_weight),
      "presence_weight": jnp.float32(loss_cfg.presence_weight),
      "global_weight": loss_cfg.global_weight * global_on,
      "fine_weight": loss_cfg.fine_weight * fine_on,
      "stage": 1.0 + global_on + fine_on,
  }

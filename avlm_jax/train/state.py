"""Train state, optimizer, and a state that is born sharded on the mesh."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from avlm_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay and global-norm clipping.

  Weight decay applies to matrices only (kernels, embeddings), not to biases, LayerNorm or scalars.
  """
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
  )


class StatePlan:
  """Where every leaf of the train state will live, before any of it exists.

  `eval_shape` of the (boxed) init gives shapes and logical names; the preset's rules turn them
  into shardings. `abstract` (ShapeDtypeStructs carrying those shardings) is the target of a
  checkpoint restore; `initialize` runs `jit(init, out_shardings=...)`, so a fresh state is born
  sharded: no full copy of it ever sits on one device or on the host.
  """

  def __init__(self, init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               mesh, rules):
    def init_boxed(rng):
      params = init_params(rng)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    self._init_boxed = init_boxed
    self.mesh, self.rules = mesh, rules
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    self.shardings: TrainState = sharding.logical_to_shardings(boxed, mesh, rules)
    self.abstract: TrainState = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed), self.shardings)

  def initialize(self, rng: jax.Array) -> TrainState:
    with sharding.activate(self.mesh, self.rules):
      return jax.jit(lambda r: nn.unbox(self._init_boxed(r)), out_shardings=self.shardings)(rng)

"""The jitted train step: forward both towers, multi-scale loss, AdamW update.

The step is a pure function `(state, batch, prompt_tokens) -> (state, metrics)`. It is jitted with
explicit in/out shardings, donates the state, and is compiled ahead of time under the mesh and
the preset's rules (`compile_train_step`), so the memory and FLOP analysis is known before step 1.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from avlm_jax import sharding
from avlm_jax.losses.multiscale import anatomy_vlm_loss
from avlm_jax.train.state import StatePlan, TrainState

Batch = dict[str, jax.Array]


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]; done on device so the host ships 1 byte per pixel."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def make_loss_fn(model, loss_cfg: ml_collections.ConfigDict) -> Callable:
  """`loss_fn(params, batch, prompt_tokens, rng, train) -> (loss, metrics)`."""

  def loss_fn(params, batch: Batch, prompt_tokens: jax.Array, rng: jax.Array, train: bool = True):
    outputs = model.apply(
        {"params": params}, normalize_images(batch["image"]), batch["phrase_tokens"], prompt_tokens,
        train=train, rngs={"dropout": rng})
    return anatomy_vlm_loss(outputs, batch, loss_cfg)

  return loss_fn


def make_train_step(model, tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict,
                    seed: int) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
  loss_fn = make_loss_fn(model, loss_cfg)

  def train_step(state: TrainState, batch: Batch, prompt_tokens: jax.Array):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, prompt_tokens, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def batch_shardings(mesh, batch_spec: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
  return {k: sharding.batch_sharding(mesh) for k in batch_spec}


def compile_train_step(train_step: Callable, plan: StatePlan, batch_spec: dict[str, jax.ShapeDtypeStruct],
                       prompt_spec: jax.ShapeDtypeStruct):
  """AOT-compile the step for these global batch shapes; returns the compiled executable."""
  mesh = plan.mesh
  in_shardings = (plan.shardings, batch_shardings(mesh, batch_spec), sharding.replicated(mesh))
  jitted = jax.jit(train_step, in_shardings=in_shardings,
                   out_shardings=(plan.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  with sharding.activate(mesh, plan.rules):
    return jitted.lower(plan.abstract, batch_spec, prompt_spec).compile()

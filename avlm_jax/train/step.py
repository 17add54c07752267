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
from avlm_jax.train import schedule
from avlm_jax.losses.multiscale import anatomy_vlm_loss
from avlm_jax.train.state import StatePlan, TrainState, split_frozen

Batch = dict[str, jax.Array]


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]; done on device so the host ships 1 byte per pixel."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def make_loss_fn(model, loss_cfg: ml_collections.ConfigDict) -> Callable:
  """`loss_fn(params, batch, prompts, rng, train, weights=None) -> (loss, metrics)`.

  Texts come as token ids (`batch["phrase_tokens"]`, int `prompts`) and run through the text
  tower, or as cached pooled features of a frozen tower (`batch["phrase_features"]`, float
  `prompts`), in which case the step runs only the image tower and the text projection.
  `weights` (from `schedule.loss_weights`) default to the configured ones.
  `loss_cfg.implementation` picks the alignment losses: 'global' (GSPMD on the global batch) or
  'ring' (shard_map ring, per-device memory linear in the local batch; same values).
  """
  implementation = loss_cfg.get("implementation", "global")
  ring_chunk = int(loss_cfg.get("ring_chunk", 1024))

  def loss_fn(params, batch: Batch, prompts: jax.Array, rng: jax.Array, train: bool = True,
              weights: dict | None = None):
    texts = {k: batch[k] for k in ("phrase_features", "phrase_tokens") if k in batch}  # none: holistic
    texts["prompt_features" if jnp.issubdtype(prompts.dtype, jnp.floating) else "prompt_tokens"] = prompts
    outputs = model.apply({"params": params}, normalize_images(batch["image"]), **texts,
                          train=train, rngs={"dropout": rng})
    return anatomy_vlm_loss(outputs, batch, weights if weights is not None else loss_cfg,
                            implementation=implementation, ring_chunk=ring_chunk)

  return loss_fn


def make_train_step(model, tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict,
                    seed: int, stage_starts: tuple[int, int] = (0, 0)
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
  loss_fn = make_loss_fn(model, loss_cfg)

  def train_step(state: TrainState, batch: Batch, prompts: jax.Array):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    weights = schedule.loss_weights(state.step, loss_cfg, stage_starts)
    trainable, frozen = split_frozen(state.params, state.frozen)
    (_, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn({**p, **frozen}, batch, prompts, rng, True, weights), has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(trainable)
    metrics.update({f"weight_{k.removesuffix('_weight')}": v for k, v in weights.items() if k != "stage"})
    metrics["stage"] = weights["stage"]
    return state.replace(step=state.step + 1, params={**trainable, **frozen}, opt_state=opt_state), metrics

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

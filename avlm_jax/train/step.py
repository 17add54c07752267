"""The jitted train step: forward both towers, multi-scale loss, AdamW update.

The step is a pure function `(state, batch, prompt_tokens) -> (state, metrics)`. It is jitted with
explicit in/out shardings, donates the state, and is compiled ahead of time under the mesh and
the preset's rules (`compile_train_step`), so the memory and FLOP analysis is known before step 1.
Every step reports `l2_grads`, `l2_params` and `l2_updates` (as big_vision does).

`make_grad_signal_fn` splits one step's gradient on the shared image backbone into the loss terms'
parts (the loss's `term_*` metrics): each term's gradient norm there and its share of the sum of
those norms. It costs one backward pass per term, so the loop runs it on log steps only.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from avlm_jax import sharding
from avlm_jax.train import schedule
from avlm_jax.losses.multiscale import anatomy_vlm_loss
from avlm_jax.train.state import StatePlan, TrainState, param_path, split_frozen

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
  global_normalization = loss_cfg.get("global_normalization", "mean")  # image-level loss reduction

  def loss_fn(params, batch: Batch, prompts: jax.Array, rng: jax.Array, train: bool = True,
              weights: dict | None = None):
    texts = {k: batch[k] for k in ("phrase_features", "phrase_tokens") if k in batch}  # none: holistic
    texts["prompt_features" if jnp.issubdtype(prompts.dtype, jnp.floating) else "prompt_tokens"] = prompts
    outputs = model.apply({"params": params}, normalize_images(batch["image"]), **texts,
                          train=train, rngs={"dropout": rng})
    return anatomy_vlm_loss(outputs, batch, weights if weights is not None else loss_cfg,
                            implementation=implementation, ring_chunk=ring_chunk,
                            global_normalization=global_normalization)

  return loss_fn


def _step_rng_and_weights(step: jax.Array, seed: int, loss_cfg: ml_collections.ConfigDict,
                          stage_starts: tuple[int, int]) -> tuple[jax.Array, dict]:
  """The dropout key and the stage's loss weights of step `step`."""
  return (jax.random.fold_in(jax.random.key(seed), step),
          schedule.loss_weights(step, loss_cfg, stage_starts))


def make_train_step(model, tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict,
                    seed: int, stage_starts: tuple[int, int] = (0, 0), *, skip_nonfinite: bool = False
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
  """The train step. Its metrics carry `nonfinite` (1.0 when the loss or the gradient norm is
  not finite); with `skip_nonfinite` such a step leaves params and optimizer state as they were
  (the step count still advances, so data and dropout move on)."""
  loss_fn = make_loss_fn(model, loss_cfg)

  def train_step(state: TrainState, batch: Batch, prompts: jax.Array):
    rng, weights = _step_rng_and_weights(state.step, seed, loss_cfg, stage_starts)
    trainable, frozen = split_frozen(state.params, state.frozen)
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn({**p, **frozen}, batch, prompts, rng, True, weights), has_aux=True)(trainable)
    l2_grads = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(l2_grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)
      new_trainable = jax.tree.map(keep, new_trainable, trainable)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    trainable = new_trainable
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    metrics["l2_grads"] = l2_grads  # before clipping
    metrics["l2_params"] = optax.tree.norm(trainable)
    metrics["l2_updates"] = optax.tree.norm(updates)
    metrics.update({f"weight_{k.removesuffix('_weight')}": v for k, v in weights.items() if k != "stage"})
    metrics["stage"] = weights["stage"]
    return state.replace(step=state.step + 1, params={**trainable, **frozen}, opt_state=opt_state), metrics

  return train_step


# The shared image backbone every loss term pulls on: the encoder and its input tokens and
# positions. Heads that serve one term (box, presence, projections, pooling) are left out.
BACKBONE = re.compile(
    r"image/(patch_embedding|cls_token|anatomy_tokens|pos_embedding|block_\d+|blocks|encoder_ln)(/.*)?")


def make_grad_signal_fn(model, loss_cfg: ml_collections.ConfigDict, seed: int,
                        stage_starts: tuple[int, int] = (0, 0)
                        ) -> Callable[[TrainState, Batch, jax.Array], dict[str, jax.Array]]:
  """`grad_signal(state, batch, prompts) -> metrics`: how the step's gradient on the backbone
  (`BACKBONE`, trainable leaves) splits over the loss terms, with the step's own rng and weights.

  The terms are the loss's `term_*` metrics (weighted; they add up to the loss). One forward pass
  and one vjp per term give, per term `term_X`: `backbone_grad_norm_X` (L2 norm of its gradient
  on the backbone) and `backbone_grad_share_X` (that norm over the sum of all terms' norms; 0
  when all are 0); and `backbone_grad_norm`, the norm of the whole loss's backbone gradient.
  A term switched off by its stage has weight 0, hence norm and share 0.
  """
  loss_fn = make_loss_fn(model, loss_cfg)

  def grad_signal(state: TrainState, batch: Batch, prompts: jax.Array) -> dict[str, jax.Array]:
    rng, weights = _step_rng_and_weights(state.step, seed, loss_cfg, stage_starts)
    trainable, frozen = split_frozen(state.params, state.frozen)
    flat, treedef = jax.tree_util.tree_flatten_with_path(trainable)
    values = [leaf for _, leaf in flat]
    backbone = [i for i, (path, _) in enumerate(flat) if BACKBONE.fullmatch(param_path(path))]
    if not backbone:
      raise ValueError("no trainable parameter matches the backbone pattern "
                       f"{BACKBONE.pattern!r}; trainable paths start with "
                       f"{sorted({param_path(p).split('/')[0] for p, _ in flat})}")

    def terms(backbone_values):
      leaves = list(values)
      for i, v in zip(backbone, backbone_values):
        leaves[i] = v
      params = jax.tree_util.tree_unflatten(treedef, leaves)
      _, metrics = loss_fn({**params, **frozen}, batch, prompts, rng, True, weights)
      out = {k: v for k, v in metrics.items() if k.startswith("term_")}
      if not out:
        raise ValueError(f"the loss reports no weighted terms ('term_*' metrics) to split the gradient "
                         f"into; its metrics are {sorted(metrics)}")
      return out

    primals = [values[i] for i in backbone]
    out, vjp = jax.vjp(terms, primals)
    names = sorted(out)

    def one_term(total, onehot):  # one backward pass per term: a scan, so it compiles once
      (grad,) = vjp({k: onehot[i].astype(out[k].dtype) for i, k in enumerate(names)})
      return jax.tree.map(jnp.add, total, grad), optax.tree.norm(grad)

    total, term_norms = jax.lax.scan(one_term, optax.tree.zeros_like(primals),
                                     jnp.eye(len(names), dtype=jnp.float32))
    norms = {k.removeprefix("term_"): term_norms[i] for i, k in enumerate(names)}
    norm_sum = jnp.sum(term_norms)
    metrics = {"backbone_grad_norm": optax.tree.norm(total)}
    for name, norm in norms.items():
      metrics[f"backbone_grad_norm_{name}"] = norm
      metrics[f"backbone_grad_share_{name}"] = jnp.where(norm_sum > 0, norm / jnp.maximum(norm_sum, 1e-30), 0.0)
    return metrics

  return grad_signal


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


def compile_grad_signal(grad_signal: Callable, plan: StatePlan, batch_spec: dict[str, jax.ShapeDtypeStruct],
                        prompt_spec: jax.ShapeDtypeStruct):
  """AOT-compile `make_grad_signal_fn`'s function like the step (no donation: the step runs next)."""
  mesh = plan.mesh
  jitted = jax.jit(grad_signal, in_shardings=(plan.shardings, batch_shardings(mesh, batch_spec),
                                              sharding.replicated(mesh)),
                   out_shardings=sharding.replicated(mesh))
  with sharding.activate(mesh, plan.rules):
    return jitted.lower(plan.abstract, batch_spec, prompt_spec).compile()

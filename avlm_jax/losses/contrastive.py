"""Region–phrase and image–label alignment losses on the global batch.

Both are written on globally sharded arrays; GSPMD inserts the collectives. The region logits
are (B·R) × (B·R): fine for the walking skeleton, replaced by a shard_map ring at pod scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Finite "minus infinity": masked logits must not turn fully-masked rows into NaN (or NaN grads).
_MASKED = -1e9


def same_phrase(ids_a: jax.Array, ids_b: jax.Array) -> jax.Array:
  """(N, 2) and (M, 2) int32 phrase hashes -> (N, M) bool, True where the phrase strings match."""
  return jnp.all(ids_a[:, None, :] == ids_b[None, :, :], axis=-1)


def region_phrase_loss(region_emb: jax.Array, phrase_emb: jax.Array, phrase_ids: jax.Array,
                       has_phrase: jax.Array, scale: jax.Array,
                       is_anchor: jax.Array | None = None) -> dict[str, jax.Array]:
  """Multi-positive InfoNCE of each region against every region text in the batch.

  region_emb, phrase_emb: (N, E) L2-normalised, N = B·R, row i of both is the same region slot.
  phrase_ids: (N, 2) int32 hash of the normalised text; has_phrase: (N,) bool, the slot's text is
  a candidate; is_anchor: (N,) bool, the slot's text describes its region (default: has_phrase).
  Sampled negatives (negated or hard-negative texts) are candidates but not anchors.
  Anchor i has positives P(i) = {j: has_phrase[j], text_j == text_i}, which contains i itself:
  identical texts anywhere in the batch share labels. The target distribution is uniform over
  P(i): loss_i = -mean_{j in P(i)} log softmax_j(scale · <r_i, t_j>), averaged over anchors.
  """
  valid = has_phrase.astype(bool)
  anchor = valid if is_anchor is None else (is_anchor.astype(bool) & valid)
  logits = scale * jnp.einsum("ne,me->nm", region_emb.astype(jnp.float32), phrase_emb.astype(jnp.float32))
  logits = jnp.where(valid[None, :], logits, _MASKED)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  positives = same_phrase(phrase_ids, phrase_ids) & valid[None, :] & anchor[:, None]
  num_pos = jnp.maximum(positives.sum(axis=-1), 1)
  per_anchor = -jnp.sum(jnp.where(positives, log_p, 0.0), axis=-1) / num_pos
  num_anchors = anchor.sum()
  loss = jnp.sum(jnp.where(anchor, per_anchor, 0.0)) / jnp.maximum(num_anchors, 1)
  top1 = jnp.take_along_axis(positives, jnp.argmax(logits, axis=-1)[:, None], axis=-1)[:, 0]
  return {
      "loss": loss,
      "num_anchors": num_anchors.astype(jnp.float32),
      "num_candidates": valid.sum().astype(jnp.float32),
      "top1_acc": jnp.sum(top1 & anchor) / jnp.maximum(num_anchors, 1),
  }


def image_label_loss(image_emb: jax.Array, prompt_emb: jax.Array, labels: jax.Array,
                     scale: jax.Array, bias: jax.Array) -> dict[str, jax.Array]:
  """Multi-label sigmoid cross-entropy of CLS embeddings against label-prompt embeddings.

  image_emb (B, E), prompt_emb (C, E) L2-normalised; labels (B, C) in {0, 1}.
  logits = scale · <z_img, z_prompt> + bias; the loss is the mean over images and classes.
  """
  logits = scale * jnp.einsum("be,ce->bc", image_emb.astype(jnp.float32), prompt_emb.astype(jnp.float32)) + bias
  labels = labels.astype(jnp.float32)
  loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
  pos = labels.sum()
  return {
      "loss": loss,
      "pos_logit": jnp.sum(logits * labels) / jnp.maximum(pos, 1.0),
      "neg_logit": jnp.sum(logits * (1 - labels)) / jnp.maximum(labels.size - pos, 1.0),
  }

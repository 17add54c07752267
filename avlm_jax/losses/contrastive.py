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

# How the image-level loss reduces its (images × classes) terms: `config.loss.global_normalization`.
GLOBAL_NORMALIZATIONS = ("mean", "siglip")


def image_loss_divisor(normalization: str, num_images: int, num_classes: int) -> int:
  """'mean': over images and classes; 'siglip': sum over classes, mean over images (SigLIP's
  normalisation, so each image's gradient does not shrink as the label set grows)."""
  if normalization not in GLOBAL_NORMALIZATIONS:
    raise ValueError(f"config.loss.global_normalization={normalization!r}; expected one of {GLOBAL_NORMALIZATIONS}")
  return num_images * num_classes if normalization == "mean" else num_images


def same_phrase(ids_a: jax.Array, ids_b: jax.Array) -> jax.Array:
  """(N, 2) and (M, 2) int32 phrase hashes -> (N, M) bool, True where the phrase strings match."""
  return jnp.all(ids_a[:, None, :] == ids_b[None, :, :], axis=-1)


def text_classes(ids: jax.Array) -> jax.Array:
  """(M, 2) int32 text identities -> (M,) int32 class ids in [0, M): equal exactly where the
  identities are equal (a sort, O(M log M); no (M, M) comparison)."""
  order = jnp.lexsort((ids[:, 1], ids[:, 0]))
  ranked = ids[order]
  starts = jnp.concatenate([jnp.ones((1,), bool), jnp.any(ranked[1:] != ranked[:-1], axis=-1)])
  return jnp.zeros(ids.shape[0], jnp.int32).at[order].set(jnp.cumsum(starts, dtype=jnp.int32) - 1)


def candidates(phrase_emb: jax.Array, phrase_ids: jax.Array, has_phrase: jax.Array,
               false_emb: jax.Array | None = None, false_ids: jax.Array | None = None,
               has_false: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The candidate texts of every row: the true texts, then the false ones (if any)."""
  if false_emb is None:
    return phrase_emb, phrase_ids, has_phrase.astype(bool)
  return (jnp.concatenate([phrase_emb, false_emb]), jnp.concatenate([phrase_ids, false_ids]),
          jnp.concatenate([has_phrase.astype(bool), has_false.astype(bool)]))


def region_phrase_loss(region_emb: jax.Array, phrase_emb: jax.Array, phrase_ids: jax.Array,
                       has_phrase: jax.Array, scale: jax.Array, false_emb: jax.Array | None = None,
                       false_ids: jax.Array | None = None, has_false: jax.Array | None = None
                       ) -> dict[str, jax.Array]:
  """Multi-positive InfoNCE of each region slot against every slot text in the batch.

  region_emb, phrase_emb: (N, E) L2-normalised, N = B·R; row i of both is the same region slot,
  and phrase i is the slot's true statement (its positive); phrase_ids (N, 2) int32 text
  identities; has_phrase (N,) bool: the slot has a true text, so it is an anchor. false_emb,
  false_ids, has_false (N, ...): each slot's false statement (its negation or a hard negative),
  joining the candidates NegCLIP-style; None: true texts only.
  Anchor i has positives P(i) = {candidates j with text_j == text_i}, which contains i itself:
  identical texts anywhere in the batch share labels, whether they came as true or false texts.
  The target distribution is uniform over P(i): loss_i = -mean_{j in P(i)} log softmax_j(scale ·
  <r_i, t_j>) over all candidates, averaged over anchors.

  The positives are never materialised as an (N, M) mask: the candidates' texts are ranked into
  class ids once (`text_classes`, a sort of M pairs), and "j is a positive of i" is one integer
  compare of (N,) against (M,) that XLA fuses into the reductions over the logits (the positive
  logits' sum, the top-1 test; the positives' count is a segment count over M). So the logits are
  read by four fused reductions, and the backward pass writes one gradient, where the mask cost
  seven passes at configs/clip_shapes.py (BENCHMARKS.md "The step beside open_clip"). The (N, M)
  work stays row-local under GSPMD; the count adds an all-reduce of M floats (a scatter of the
  classes' (M, E) embedding sums instead added ~240 MB per chip on a v5e-256).
  """
  n = region_emb.shape[0]
  anchor = has_phrase.astype(bool)
  t, ids, valid = candidates(phrase_emb, phrase_ids, has_phrase, false_emb, false_ids, has_false)
  logits = scale * jnp.einsum("ne,me->nm", region_emb.astype(jnp.float32), t.astype(jnp.float32))
  logits = logits + jnp.where(valid, 0.0, _MASKED)[None, :]
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))  # logsumexp's shift, and the top-1 test's
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
  cls = text_classes(ids)
  # Candidate i < n is anchor i's own text (candidates() puts the true texts first).
  positive = (cls[None, :] == cls[:n, None]) & valid[None, :]  # fused into each reduction below
  # |P(i)|: the valid candidates of i's class, counted over (M,) rather than (N, M).
  class_count = jax.ops.segment_sum(valid.astype(jnp.float32), cls, num_segments=cls.shape[0])
  num_pos = jnp.maximum(class_count[cls[:n]], 1.0)
  per_anchor = lse - jnp.sum(jnp.where(positive, logits, 0.0), axis=-1) / num_pos
  num_anchors = anchor.sum()
  loss = jnp.sum(jnp.where(anchor, per_anchor, 0.0)) / jnp.maximum(num_anchors, 1)
  # Top-1 hit: a positive reaches the row's maximum (the argmax's class, without argmax's
  # (value, index) reduction, which XLA's CPU backend runs slowly; ties have measure zero).
  top1 = jnp.any(positive & (logits >= top[:, None]), axis=-1)
  return {
      "loss": loss,
      "num_anchors": num_anchors.astype(jnp.float32),
      "num_candidates": valid.sum().astype(jnp.float32),
      "top1_acc": jnp.sum(top1 & anchor) / jnp.maximum(num_anchors, 1),
  }


def image_label_loss(image_emb: jax.Array, prompt_emb: jax.Array, labels: jax.Array,
                     scale: jax.Array, bias: jax.Array, normalization: str = "mean") -> dict[str, jax.Array]:
  """Multi-label sigmoid cross-entropy of image embeddings against label-prompt embeddings.

  image_emb (B, E), prompt_emb (C, E) L2-normalised; labels (B, C) in {0, 1}.
  logits = scale · <z_img, z_prompt> + bias; the loss is the sum over images and classes divided
  by B·C (`normalization='mean'`) or by B ('siglip', C× the mean).
  """
  divisor = image_loss_divisor(normalization, *labels.shape)
  logits = scale * jnp.einsum("be,ce->bc", image_emb.astype(jnp.float32), prompt_emb.astype(jnp.float32)) + bias
  labels = labels.astype(jnp.float32)
  loss = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels)) / divisor
  pos = labels.sum()
  return {
      "loss": loss,
      "pos_logit": jnp.sum(logits * labels) / jnp.maximum(pos, 1.0),
      "neg_logit": jnp.sum(logits * (1 - labels)) / jnp.maximum(labels.size - pos, 1.0),
  }

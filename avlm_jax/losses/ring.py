"""The alignment losses with `shard_map` over the batch axes: no (B·R) × (B·R) matrix anywhere.

`region_phrase_loss` is a ring: each device keeps its own region rows and passes its phrase block
(embeddings, text ids, candidate mask) around the batch axes with `ppermute`. Every visiting block
is consumed in tiles of at most `chunk` texts with an online log-sum-exp, so a device only ever
holds an (n_local × chunk) logit tile, where n_local = local batch · 29. The backward pass is a
second ring (a `custom_vjp`, as in flash attention): it recomputes each tile from the saved
per-row log-sum-exp instead of storing tiles, and the phrase gradients travel with their block
and arrive home after one full turn. Per-device memory therefore grows linearly with the local
batch and not at all with the number of devices.

`image_label_loss` needs no ring: its logits are (B × classes), so each device computes its own
rows against the replicated prompts and the sums are `psum`med.

Both return exactly what `contrastive.region_phrase_loss` / `image_label_loss` return (to float32
rounding), including multi-positive texts shared across devices, slots without a text, and the
slots' false texts, which are candidates but not anchors. They must run under `jax.set_mesh(mesh)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from avlm_jax.losses.contrastive import _MASKED, image_loss_divisor, same_phrase
from avlm_jax.sharding import BATCH_AXES


def _axis_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("the ring losses need a mesh: call them under jax.set_mesh(mesh) "
                     "(sharding.activate does this)")
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _tile(n: int, chunk: int) -> int:
  """The largest divisor of n that is <= chunk (tiles must cover a block exactly)."""
  for c in range(min(n, max(chunk, 1)), 0, -1):
    if n % c == 0:
      return c
  return n


def _shift(tree, size: int):
  """Send every array to the next device along the batch axes (a ring of `size` devices)."""
  perm = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, BATCH_AXES, perm), tree)


def _varying(tree):
  """Mark fresh accumulators as per-device values, as the loop bodies make them (shard_map's vma)."""
  return jax.tree.map(lambda x: jax.lax.pcast(x, BATCH_AXES, to="varying"), tree)


def _tile_logits(r, t, valid, scale):
  """Raw dot products and masked logits of the local rows against one tile of texts."""
  dots = r @ t.T
  return dots, jnp.where(valid[None, :], scale * dots, _MASKED)


def _ring_forward(r, row_ids, anchor, t, ids, valid, scale, *, size: int, chunk: int):
  """Per-device forward. Returns per-row (lse, positive-logit sum, positive count, top-1 hit).

  Rows: the local region slots r (n, E) with their true-text ids and anchor mask. Candidates: the
  local text block t (m, E) (the local true texts, then the local false ones), which travels.
  """
  n, m = r.shape[0], t.shape[0]
  c = _tile(m, chunk)
  me = jax.lax.axis_index(BATCH_AXES)

  def consume(k, block, acc):
    """Fold block k of the ring (which started on device me - k) into the row statistics."""
    t_b, ids_b, valid_b = block
    src = (me - k) % size

    def one_tile(j, acc):
      mx, s, pos_sum, pos_cnt, best, best_idx, best_pos = acc
      t_c = jax.lax.dynamic_slice_in_dim(t_b, j * c, c)
      ids_c = jax.lax.dynamic_slice_in_dim(ids_b, j * c, c)
      valid_c = jax.lax.dynamic_slice_in_dim(valid_b, j * c, c)
      _, logits = _tile_logits(r, t_c, valid_c, scale)
      positives = same_phrase(row_ids, ids_c) & valid_c[None, :] & anchor[:, None]
      # Online log-sum-exp.
      m_new = jnp.maximum(mx, logits.max(axis=-1))
      s = s * jnp.exp(mx - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=-1)
      pos_sum = pos_sum + jnp.where(positives, logits, 0.0).sum(axis=-1)
      pos_cnt = pos_cnt + positives.sum(axis=-1)
      # Running argmax with a global column index; ties go to the lower index, as jnp.argmax.
      arg = jnp.argmax(logits, axis=-1)
      val = jnp.take_along_axis(logits, arg[:, None], axis=-1)[:, 0]
      idx = src * m + j * c + arg
      hit = jnp.take_along_axis(positives, arg[:, None], axis=-1)[:, 0]
      take = (val > best) | ((val == best) & (idx < best_idx))
      return (m_new, s, pos_sum, pos_cnt, jnp.where(take, val, best), jnp.where(take, idx, best_idx),
              jnp.where(take, hit, best_pos))

    return jax.lax.fori_loop(0, m // c, one_tile, acc)

  # The running max starts at a finite value below any logit (masked ones are _MASKED): an
  # -inf start would give exp(-inf - -inf) = NaN.
  init = _varying((jnp.full((n,), 2 * _MASKED, jnp.float32), jnp.zeros((n,), jnp.float32),
                   jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.int32), jnp.full((n,), -jnp.inf, jnp.float32),
                   jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool)))
  block = (t, ids, valid)
  acc = consume(0, block, init)

  def step(k, carry):
    block, acc = carry
    block = _shift(block, size)
    return block, consume(k, block, acc)

  _, (mx, s, pos_sum, pos_cnt, _, _, best_pos) = jax.lax.fori_loop(1, size, step, (block, acc))
  return mx + jnp.log(s), pos_sum, pos_cnt, best_pos


def _ring_backward(r, row_ids, anchor, t, ids, valid, scale, lse, pos_cnt, coef, *, size: int, chunk: int):
  """Per-device backward: d loss / d (r, t, scale), recomputing each tile.

  d loss / d logit_ij = coef_i · (softmax_ij − [j ∈ P(i)] / |P(i)|) for candidate texts j, with
  coef_i = g·[i is an anchor] / #anchors. The text gradient of a block rides along with it.
  """
  m = t.shape[0]
  c = _tile(m, chunk)
  inv_cnt = 1.0 / jnp.maximum(pos_cnt, 1).astype(jnp.float32)

  def consume(block, dr, dscale):
    t_b, ids_b, valid_b, dt_b = block

    def one_tile(j, acc):
      dr, dt_b, dscale = acc
      t_c = jax.lax.dynamic_slice_in_dim(t_b, j * c, c)
      ids_c = jax.lax.dynamic_slice_in_dim(ids_b, j * c, c)
      valid_c = jax.lax.dynamic_slice_in_dim(valid_b, j * c, c)
      dots, logits = _tile_logits(r, t_c, valid_c, scale)
      positives = same_phrase(row_ids, ids_c) & valid_c[None, :] & anchor[:, None]
      softmax = jnp.exp(logits - lse[:, None])
      dlogits = coef[:, None] * (softmax - jnp.where(positives, inv_cnt[:, None], 0.0))
      dlogits = jnp.where(valid_c[None, :], dlogits, 0.0)  # masked logits are constants
      dr = dr + scale * (dlogits @ t_c)
      dt_b = jax.lax.dynamic_update_slice_in_dim(
          dt_b, jax.lax.dynamic_slice_in_dim(dt_b, j * c, c) + scale * (dlogits.T @ r), j * c, 0)
      return dr, dt_b, dscale + jnp.sum(dlogits * dots)

    dr, dt_b, dscale = jax.lax.fori_loop(0, m // c, one_tile, (dr, dt_b, dscale))
    return (t_b, ids_b, valid_b, dt_b), dr, dscale

  block, dr, dscale = consume((t, ids, valid, _varying(jnp.zeros(t.shape, t.dtype))),
                              _varying(jnp.zeros(r.shape, r.dtype)), _varying(jnp.float32(0.0)))

  def step(_, carry):
    block, dr, dscale = carry
    return consume(_shift(block, size), dr, dscale)

  block, dr, dscale = jax.lax.fori_loop(1, size, step, (block, dr, dscale))
  dt = _shift(block[3], size)  # one more hop brings each block's text gradient home
  return dr, dt, jax.lax.psum(dscale, BATCH_AXES)


def _specs(n_in: int):
  return (P(BATCH_AXES),) * n_in


def _local_candidates(t, ids, valid, tf, ids_f, valid_f):
  """This device's candidate block: its true texts, then its false ones."""
  return jnp.concatenate([t, tf]), jnp.concatenate([ids, ids_f]), jnp.concatenate([valid, valid_f])


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _ring_nce(r, t, ids, valid, tf, ids_f, valid_f, scale, chunk):
  return _ring_nce_fwd(r, t, ids, valid, tf, ids_f, valid_f, scale, chunk)[0]


def _ring_nce_fwd(r, t, ids, valid, tf, ids_f, valid_f, scale, chunk):
  size = _axis_size()

  def local(r, t, ids, valid, tf, ids_f, valid_f, scale):
    cand = _local_candidates(t, ids, valid, tf, ids_f, valid_f)
    lse, pos_sum, pos_cnt, best_pos = _ring_forward(r, ids, valid, *cand, scale, size=size, chunk=chunk)
    per_anchor = (pos_cnt * lse - pos_sum) / jnp.maximum(pos_cnt, 1)
    num_anchors = jax.lax.psum(valid.sum(), BATCH_AXES)
    loss = jax.lax.psum(jnp.sum(jnp.where(valid, per_anchor, 0.0)), BATCH_AXES) / jnp.maximum(num_anchors, 1)
    top1 = jax.lax.psum(jnp.sum(best_pos & valid), BATCH_AXES) / jnp.maximum(num_anchors, 1)
    num_candidates = jax.lax.psum(cand[2].sum(), BATCH_AXES)
    stats = (loss, num_anchors.astype(jnp.float32), num_candidates.astype(jnp.float32), top1)
    return stats, lse, pos_cnt, num_anchors

  args = (r, t, ids, valid, tf, ids_f, valid_f, scale)
  out = jax.shard_map(local, in_specs=_specs(7) + (P(),),
                      out_specs=((P(),) * 4, P(BATCH_AXES), P(BATCH_AXES), P()))(*args)
  stats, lse, pos_cnt, num_anchors = out
  return stats, args + (lse, pos_cnt, num_anchors)


def _ring_nce_bwd(chunk, residuals, cotangents):
  r, t, ids, valid, tf, ids_f, valid_f, scale, lse, pos_cnt, num_anchors = residuals
  g = cotangents[0]  # counts and top-1 accuracy are not differentiable
  size = _axis_size()

  def local(r, t, ids, valid, tf, ids_f, valid_f, scale, lse, pos_cnt, num_anchors, g):
    coef = jnp.where(valid, g / jnp.maximum(num_anchors, 1), 0.0)
    cand = _local_candidates(t, ids, valid, tf, ids_f, valid_f)
    dr, dcand, dscale = _ring_backward(r, ids, valid, *cand, scale, lse, pos_cnt, coef, size=size, chunk=chunk)
    n = t.shape[0]
    return dr, dcand[:n], dcand[n:], dscale

  dr, dt, dtf, dscale = jax.shard_map(
      local, in_specs=_specs(7) + (P(), P(BATCH_AXES), P(BATCH_AXES), P(), P()),
      out_specs=(P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES), P()))(
          r, t, ids, valid, tf, ids_f, valid_f, scale, lse, pos_cnt, num_anchors, g)
  return dr, dt, None, None, dtf, None, None, dscale


_ring_nce.defvjp(_ring_nce_fwd, _ring_nce_bwd)


def region_phrase_loss(region_emb: jax.Array, phrase_emb: jax.Array, phrase_ids: jax.Array,
                       has_phrase: jax.Array, scale: jax.Array, false_emb: jax.Array | None = None,
                       false_ids: jax.Array | None = None, has_false: jax.Array | None = None,
                       *, chunk: int = 1024) -> dict[str, jax.Array]:
  """The ring version of `contrastive.region_phrase_loss` (same arguments, same outputs).

  Rows are split over the batch axes `('data', 'fsdp')`; N must divide evenly among them.
  `chunk` bounds the width of a logit tile (the largest divisor of the local candidate count not
  above it is used).
  """
  if false_emb is None:  # no false texts: an all-masked block keeps one code path
    false_emb, false_ids, has_false = (jnp.zeros_like(phrase_emb), jnp.zeros_like(phrase_ids),
                                       jnp.zeros_like(has_phrase, dtype=bool))
  loss, num_anchors, num_candidates, top1 = _ring_nce(
      region_emb.astype(jnp.float32), phrase_emb.astype(jnp.float32), phrase_ids.astype(jnp.int32),
      has_phrase.astype(bool), false_emb.astype(jnp.float32), false_ids.astype(jnp.int32),
      has_false.astype(bool), jnp.asarray(scale, jnp.float32), int(chunk))
  return {"loss": loss, "num_anchors": num_anchors, "num_candidates": num_candidates, "top1_acc": top1}


def image_label_loss(image_emb: jax.Array, prompt_emb: jax.Array, labels: jax.Array,
                     scale: jax.Array, bias: jax.Array, normalization: str = "mean") -> dict[str, jax.Array]:
  """`contrastive.image_label_loss` with each device scoring only its own images (then `psum`)."""
  num_images = image_emb.shape[0]
  divisor = image_loss_divisor(normalization, num_images, labels.shape[1])  # global sizes

  def local(image_emb, prompt_emb, labels, scale, bias):
    logits = scale * jnp.einsum("be,ce->bc", image_emb.astype(jnp.float32), prompt_emb.astype(jnp.float32)) + bias
    labels = labels.astype(jnp.float32)
    total = lambda x: jax.lax.psum(jnp.sum(x), BATCH_AXES)
    size = num_images * labels.shape[1]
    pos = total(labels)
    return {
        "loss": total(optax.sigmoid_binary_cross_entropy(logits, labels)) / divisor,
        "pos_logit": total(logits * labels) / jnp.maximum(pos, 1.0),
        "neg_logit": total(logits * (1 - labels)) / jnp.maximum(size - pos, 1.0),
    }

  return jax.shard_map(local, in_specs=(P(BATCH_AXES), P(), P(BATCH_AXES), P(), P()), out_specs=P())(
      image_emb, prompt_emb, labels, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))

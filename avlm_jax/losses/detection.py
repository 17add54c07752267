"""Anatomy localisation loss: L1 + generalised IoU per region with a fixed query↔region match.

Anatomy token m always predicts region m (the 29 regions are a fixed set), so there is no
Hungarian matching. Regions without a ground-truth box are masked out of the loss, and the
division guards keep their gradients finite whatever their (garbage) coordinates are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-7


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Element-wise GIoU of `xyxy` boxes `a`, `b` (same shape (..., 4)) in [-1, 1].

  Degenerate boxes (zero width or height) have zero area; IoU and the enclosing-box term then use
  an epsilon floor instead of dividing by zero (two coincident points give GIoU 0, not NaN).
  """
  area_a = jnp.clip(a[..., 2] - a[..., 0], 0) * jnp.clip(a[..., 3] - a[..., 1], 0)
  area_b = jnp.clip(b[..., 2] - b[..., 0], 0) * jnp.clip(b[..., 3] - b[..., 1], 0)
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a + area_b - inter
  iou = inter / jnp.maximum(union, _EPS)
  lt_c = jnp.minimum(a[..., :2], b[..., :2])
  rb_c = jnp.maximum(a[..., 2:], b[..., 2:])
  wh_c = jnp.clip(rb_c - lt_c, 0)
  area_c = wh_c[..., 0] * wh_c[..., 1]
  return iou - (area_c - union) / jnp.maximum(area_c, _EPS)


def detection_loss(pred: jax.Array, target: jax.Array, present: jax.Array) -> dict[str, jax.Array]:
  """Masked mean over present regions of L1 (summed over the 4 coords) and 1 - GIoU.

  pred, target: (B, R, 4) normalised `(cx, cy, w, h)`; present: (B, R), 1 where the box exists.
  Returns `l1`, `giou` (the loss 1 - GIoU) and `num_boxes`; a batch with no box gives 0, not NaN.
  """
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  present = present.astype(jnp.float32)
  n = jnp.sum(present)
  denom = jnp.maximum(n, 1.0)
  l1 = jnp.sum(jnp.abs(pred - target), axis=-1)
  giou = 1.0 - generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))
  return {
      "l1": jnp.sum(l1 * present) / denom,
      "giou": jnp.sum(giou * present) / denom,
      "num_boxes": n,
  }


def presence_loss(logits: jax.Array, present: jax.Array) -> jax.Array:
  """Mean binary cross-entropy of the anatomy tokens' presence logits (B, R) against `present`:
  the confidence a detection metric ranks boxes by, so a box for an absent region can be a false
  positive."""
  x = logits.astype(jnp.float32)
  z = present.astype(jnp.float32)
  # log(1 + exp(-|x|)) form: stable for large |x|.
  return jnp.mean(jnp.maximum(x, 0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x))))

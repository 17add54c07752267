"""AnatomyViT: a ViT whose sequence is `[CLS] + 29 anatomy tokens + patch tokens` (YOLOS-style).

Outputs per image:
  * `boxes`      (B, R, 4): sigmoid `(cx, cy, w, h)` in [0, 1] from a DETR-style MLP on each anatomy token;
  * `presence_logits` (B, R): whether each region is visible (its box exists), from a linear head on
    the anatomy token: the box's confidence in detection AP, trained with BCE on `box_present`;
  * `region_emb` (B, R, E): L2-normalised projection of `[anatomy token ; mean of patch tokens]`;
  * `image_emb`  (B, E):    L2-normalised projection of the pooled tokens (`pool`: CLS, attention
    pooling over all tokens, or over CLS + anatomy tokens; see models/pooling.py);
  * `patch_tokens` (B, h, w, D): final-layer patch features (for dense heads / segmentation);
  * `region_tokens` (B, R, D) and `cls_token` (B, D): the raw encoder outputs.

`num_regions=0` is the holistic ablation: a plain ViT (CLS + patches) whose region outputs are
empty (B, 0, ...), with no box head or region projection.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avlm_jax import anatomy
from avlm_jax.models import layers, pooling

Dtype = Any


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=axis, keepdims=True) + eps)


class BoxHead(nn.Module):
  """DETR's box MLP: `depth` layers, ReLU between, sigmoid output `(cx, cy, w, h)`."""

  hidden_dim: int
  depth: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Hidden layers alternate (embed -> mlp), (mlp -> embed) so no kernel names one axis twice.
    names = ("embed", "mlp")
    for i in range(self.depth - 1):
      x = nn.relu(layers.dense(self.hidden_dim, names, self.dtype, f"hidden_{i}")(x))
      x = nn.with_logical_constraint(x, ("act_batch", "act_region", "act_" + names[1]))
      names = names[::-1]
    x = layers.dense(4, (names[0], None), self.dtype, "out")(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class AnatomyViT(nn.Module):
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  embed_dim: int
  num_regions: int = anatomy.NUM_REGIONS
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  attention: str = "xla"  # 'xla' | 'cudnn' (layers.resolve_attention)
  gelu_approximate: bool = False  # True for big_vision / vit_jax checkpoints (trained with tanh GELU)
  pool: str = "cls"  # image-level pooling: cls | map | region (models/pooling.py)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    if images.ndim != 4:
      raise ValueError(f"images must be (batch, height, width, channels), got {images.shape}")
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of patch_size {p}")
    deterministic = not train
    x = layers.PatchEmbedding(self.width, p, self.dtype, name="patch_embedding")(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    patches = x.reshape(b, gh * gw, d)

    init = nn.initializers.normal(stddev=0.02)
    cls = self.param("cls_token", layers.partitioned(nn.initializers.zeros, (None, None, "embed")), (1, 1, d))
    r = self.num_regions
    queries = (self.param("anatomy_tokens", layers.partitioned(init, (None, "region", "embed")), (1, r, d))
               if r else jnp.zeros((1, 0, d)))
    seq_len = 1 + self.num_regions + gh * gw
    pos = self.param("pos_embedding", layers.partitioned(init, (None, "length", "embed")), (1, seq_len, d))

    x = jnp.concatenate([
        jnp.broadcast_to(cls, (b, 1, d)).astype(self.dtype),
        jnp.broadcast_to(queries, (b, self.num_regions, d)).astype(self.dtype),
        patches,
    ], axis=1) + pos.astype(self.dtype)
    x = nn.with_logical_constraint(x, layers.ACT_SEQ)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

    x = layers.encoder_stack(
        x, None, deterministic=deterministic, depth=self.depth, scan=self.scan,
        remat_policy=self.remat_policy, prefix="block",
        block_kwargs=dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=True,
                          layer_norm_eps=1e-6, dropout_rate=self.dropout_rate, dtype=self.dtype,
                          gelu_approximate=self.gelu_approximate, attention=self.attention))
    x = layers.layer_norm(1e-6, self.dtype, "encoder_ln")(x)

    cls_out = x[:, 0]
    region_tokens = x[:, 1:1 + self.num_regions]
    region_tokens = nn.with_logical_constraint(region_tokens, ("act_batch", "act_region", "act_embed"))
    patch_tokens = x[:, 1 + self.num_regions:]

    if r:
      boxes = BoxHead(d, dtype=self.dtype, name="box_head")(region_tokens)
      presence_logits = layers.dense(1, ("embed", None), self.dtype, "presence_head")(region_tokens)[..., 0]
      context = jnp.broadcast_to(patch_tokens.mean(axis=1, keepdims=True), region_tokens.shape)
      region_in = jnp.concatenate([region_tokens, context], axis=-1)
      region_emb = layers.dense(self.embed_dim, ("embed", "joint"), self.dtype, "region_projection")(region_in)
    else:
      boxes = jnp.zeros((b, 0, 4), jnp.float32)
      presence_logits = jnp.zeros((b, 0), jnp.float32)
      region_emb = jnp.zeros((b, 0, self.embed_dim), jnp.float32)
    pooled = pooling.ImagePool(self.pool, r, self.num_heads, self.mlp_dim, self.dtype, self.gelu_approximate,
                               name="image_pool")(x)
    image_emb = layers.dense(self.embed_dim, ("embed", "joint"), self.dtype, "image_projection")(pooled)
    return {
        "boxes": boxes,
        "presence_logits": presence_logits.astype(jnp.float32),
        "region_emb": l2_normalize(region_emb),
        "image_emb": l2_normalize(image_emb),
        "region_tokens": region_tokens,
        "cls_token": cls_out,
        "patch_tokens": patch_tokens.reshape(b, gh, gw, d),
    }

"""How AnatomyViT pools its output tokens into the image-level vector (`config.model.image.pool`).

The pooled vector (B, D) goes through `image_projection` to give `image_emb`.

* `cls`: the CLS token (the paper's choice; no parameters).
* `map`: multihead attention pooling, the idea of big_vision's MAPHead: one learned probe attends
  over every output token (CLS, the anatomy tokens and the patches), then a residual MLP on the
  LayerNorm of the result.
* `region` (ours): the same attention pool over CLS and the anatomy tokens only. The image-level
  vector then sees the image only through what CLS and the region tokens summarise, so the
  image-level loss trains the anatomy tokens directly, and the probe's attention weights say
  which regions an image-level finding was read from. Chosen over a learned fixed-weight mean
  of the region tokens because the weights depend on the image: a finding in one lobe can be
  read from that lobe's token. Needs anatomy tokens: the holistic model has none.

The probe starts small (std 0.02, like the other learned tokens), so at initialisation the
attention is nearly uniform and the pool starts close to a mean over its tokens.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avlm_jax.models import layers

Dtype = Any

POOLS = ("cls", "map", "region")


def check_pool(pool: str, num_regions: int) -> None:
  """Raise ValueError naming `config.model.image.pool` for an unknown value, or for `region` on a
  model without anatomy tokens."""
  if pool not in POOLS:
    raise ValueError(f"config.model.image.pool={pool!r}; expected one of {POOLS}")
  if pool == "region" and not num_regions:
    raise ValueError("config.model.image.pool='region' pools CLS and the anatomy tokens, but this model "
                     "has none (model.image.anatomy_tokens=False, the holistic ablation); use 'cls' or 'map'")


class AttentionPool(nn.Module):
  """A learned probe attends over the tokens (B, N, D) -> (B, D): probe → multihead attention →
  + MLP(LayerNorm(·)). Parameters carry the encoder's logical axis names, so every sharding
  preset lays them out as it lays out an encoder block."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    head_dim = d // self.num_heads
    probe = self.param("probe", layers.partitioned(nn.initializers.normal(stddev=0.02), (None, None, "embed")),
                       (1, 1, d))
    probe = jnp.broadcast_to(probe, (b, 1, d)).astype(self.dtype)

    def proj(name: str, inputs: jax.Array) -> jax.Array:
      y = layers.dense(d, ("embed", "heads"), self.dtype, name)(inputs)
      y = y.reshape(*inputs.shape[:-1], self.num_heads, head_dim)
      return nn.with_logical_constraint(y, ("act_batch", "act_len", "act_heads", "act_kv"))

    q, k, v = proj("query", probe), proj("key", x), proj("value", x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(self.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)  # float32 softmax
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, 1, d)
    y = layers.dense(d, ("heads", "embed"), self.dtype, "out")(y)
    z = layers.layer_norm(1e-6, self.dtype, "ln")(y)
    y = y + layers.MlpBlock(self.mlp_dim, self.dtype, gelu_approximate=self.gelu_approximate,
                            name="mlp")(z, deterministic=True)
    return y[:, 0]


class ImagePool(nn.Module):
  """The encoder's output sequence `[CLS] + R anatomy tokens + patches` (B, 1+R+N, D) -> (B, D)."""

  pool: str
  num_regions: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_pool(self.pool, self.num_regions)
    if self.pool == "cls":
      return x[:, 0]
    tokens = x[:, :1 + self.num_regions] if self.pool == "region" else x
    return AttentionPool(self.num_heads, self.mlp_dim, self.dtype, self.gelu_approximate, name="attention")(tokens)

"""A BERT-family text encoder in Flax linen (transformers 5 ships no Flax models).

Layout follows BERT (word + position + token-type embeddings, LayerNorm, post-norm encoder layers,
exact GELU), so HF BERT-family checkpoints map onto it parameter for parameter. It returns the
last hidden states and the pooled text representation (masked mean, as sentence-transformers do,
or CLS). The projection into the joint image–text space lives in `AnatomyVLM`, outside the
tower: a frozen tower's pooled features can then be cached while the projection still trains.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avlm_jax.models import layers

Dtype = Any


class TextTower(nn.Module):
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int = 512
  type_vocab_size: int = 2
  pad_id: int = 0
  pooling: str = "mean"  # 'mean' over real tokens, or 'cls'
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  attention: str = "xla"  # 'xla' | 'cudnn' (layers.resolve_attention)

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """`tokens` (..., L) int ids -> dict with `hidden` (..., L, D) and `pooled` (..., D) float32."""
    lead, length = tokens.shape[:-1], tokens.shape[-1]
    if length > self.max_len:
      raise ValueError(f"token length {length} exceeds the text tower's max_len {self.max_len}")
    tokens = tokens.reshape(-1, length)
    deterministic = not train
    mask = (tokens != self.pad_id).astype(jnp.int32)
    init = nn.initializers.normal(stddev=0.02)

    word = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                    embedding_init=layers.partitioned(init, ("vocab", "embed")), name="word_embeddings")
    position = self.param("position_embeddings", layers.partitioned(init, ("length", "embed")),
                          (self.max_len, self.width))
    token_type = self.param("token_type_embeddings", layers.partitioned(init, (None, "embed")),
                            (self.type_vocab_size, self.width))
    x = word(tokens) + position[None, :length].astype(self.dtype) + token_type[0].astype(self.dtype)
    x = layers.layer_norm(self.layer_norm_eps, self.dtype, "embeddings_ln")(x)
    x = nn.with_logical_constraint(x, layers.ACT_SEQ)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

    x = layers.encoder_stack(
        x, mask, deterministic=deterministic, depth=self.depth, scan=self.scan,
        remat_policy=self.remat_policy, prefix="layer",
        block_kwargs=dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=False,
                          layer_norm_eps=self.layer_norm_eps, dropout_rate=self.dropout_rate,
                          dtype=self.dtype, attention=self.attention))

    if self.pooling == "mean":
      m = mask[..., None].astype(jnp.float32)
      pooled = (x.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
    elif self.pooling == "cls":
      pooled = x[:, 0].astype(jnp.float32)
    else:
      raise ValueError(f"unknown text pooling {self.pooling!r}; expected 'mean' or 'cls'")
    return {
        "hidden": x.reshape(*lead, length, self.width),
        "pooled": pooled.reshape(*lead, self.width),
    }

"""The two-tower Anatomy-VLM: AnatomyViT + TextTower + the learnable logit scales and bias.

`__call__` runs both towers on one training batch; `encode_image` / `encode_text` run one tower
(used by evaluation, zero-shot interpretation and the frozen-text embedding cache).

Texts reach the joint space through one `text_projection`, or, with `separate_text_projections`,
through `prompt_projection` (image-level label prompts) and `phrase_projection` (region phrases):
every text path names its `kind` ('prompt' or 'phrase') so it picks the right one.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from avlm_jax import anatomy
from avlm_jax.models import layers
from avlm_jax.models.anatomy_vit import AnatomyViT, l2_normalize
from avlm_jax.models.text_tower import TextTower

TEXT_KINDS = ("prompt", "phrase")


def _dtype(name: str) -> Any:
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"config.model.dtype={name!r}; expected float32, bfloat16 or float16") from None


class AnatomyVLM(nn.Module):
  image: AnatomyViT
  text: TextTower
  embed_dim: int
  logit_scale_init: float = 1.0 / 0.07
  logit_scale_max: float = 100.0  # CLIP's clamp: keeps the temperature from collapsing.
  global_bias_init: float = -2.0  # Prior of a rare positive label in the multi-label sigmoid loss.
  separate_text_projections: bool = False  # prompt_projection + phrase_projection instead of one

  def setup(self):
    scalar = lambda v: layers.partitioned(nn.initializers.constant(v), ())
    self.region_log_scale = self.param("region_log_scale", scalar(math.log(self.logit_scale_init)), ())
    self.global_log_scale = self.param("global_log_scale", scalar(math.log(self.logit_scale_init)), ())
    self.global_bias = self.param("global_bias", scalar(self.global_bias_init), ())
    proj = lambda name: layers.dense(self.embed_dim, ("embed", "joint"), self.text.dtype, name)
    if self.separate_text_projections:
      self.projections = {"prompt": proj("prompt_projection"), "phrase": proj("phrase_projection")}
    else:
      shared = proj("text_projection")
      self.projections = {"prompt": shared, "phrase": shared}

  def logit_scales(self) -> dict[str, jax.Array]:
    cap = math.log(self.logit_scale_max)
    return {
        "region_scale": jnp.exp(jnp.minimum(self.region_log_scale, cap)),
        "global_scale": jnp.exp(jnp.minimum(self.global_log_scale, cap)),
        "global_bias": self.global_bias,
    }

  def encode_image(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    return self.image(images, train=train)

  def embed_text_features(self, pooled: jax.Array, *, kind: str) -> jax.Array:
    """Pooled text-tower features (..., D) -> L2-normalised joint embeddings (..., E), through the
    projection of `kind`: 'prompt' (image-level label prompts) or 'phrase' (region phrases)."""
    if kind not in TEXT_KINDS:
      raise ValueError(f"text kind {kind!r}; expected one of {TEXT_KINDS}")
    return l2_normalize(self.projections[kind](pooled))

  def encode_text(self, tokens: jax.Array, *, kind: str, train: bool = False) -> dict[str, jax.Array]:
    out = dict(self.text(tokens, train=train))
    out["embedding"] = self.embed_text_features(out["pooled"], kind=kind)
    return out

  def _texts(self, tokens, features, train, kind):
    if (tokens is None) == (features is None):
      raise ValueError("pass exactly one of token ids or cached text features")
    if features is not None:
      return self.embed_text_features(features, kind=kind)
    return self.encode_text(tokens, kind=kind, train=train)["embedding"]

  def __call__(self, images: jax.Array, phrase_tokens: jax.Array | None = None,
               prompt_tokens: jax.Array | None = None, *, phrase_features: jax.Array | None = None,
               prompt_features: jax.Array | None = None, train: bool = False) -> dict[str, jax.Array]:
    """images (B,H,W,C) float; phrases as tokens (B,R,L) or cached pooled features (B,R,D);
    label prompts as tokens (C,L) or features (C,D) -> all embeddings, boxes and logit scales."""
    out = dict(self.image(images, train=train))
    if self.image.num_regions:
      out["phrase_emb"] = self._texts(phrase_tokens, phrase_features, train, "phrase")
    else:  # holistic: no regions, so the phrases have nothing to align with
      out["phrase_emb"] = jnp.zeros((images.shape[0], 0, self.embed_dim), jnp.float32)
    out["prompt_emb"] = self._texts(prompt_tokens, prompt_features, train, "prompt")
    out.update(self.logit_scales())
    return out


def build_model(model_config: ml_collections.ConfigDict, vocab_size: int) -> AnatomyVLM:
  """The model a config describes; `vocab_size` comes from the tokenizer."""
  dtype = _dtype(model_config.dtype)
  img, txt = model_config.image, model_config.text
  return AnatomyVLM(
      image=AnatomyViT(
          patch_size=img.patch_size, width=img.width, depth=img.depth, num_heads=img.num_heads,
          mlp_dim=img.mlp_dim, embed_dim=model_config.embed_dim, dropout_rate=img.dropout,
          num_regions=anatomy.NUM_REGIONS if img.anatomy_tokens else 0,
          dtype=dtype, scan=img.scan, remat_policy=img.remat_policy,
          gelu_approximate=img.gelu_approximate, pool=img.pool,
          attention=layers.resolve_attention(model_config.attention, dtype, img.dropout)),
      text=TextTower(
          vocab_size=vocab_size, width=txt.width, depth=txt.depth, num_heads=txt.num_heads,
          mlp_dim=txt.mlp_dim, max_len=txt.max_len,
          pooling=txt.pooling, dropout_rate=txt.dropout, dtype=dtype, scan=txt.scan,
          remat_policy=txt.remat_policy,
          attention=layers.resolve_attention(model_config.attention, dtype, txt.dropout)),
      embed_dim=model_config.embed_dim,
      logit_scale_init=model_config.logit_scale_init,
      logit_scale_max=model_config.logit_scale_max,
      global_bias_init=model_config.global_bias_init,
      separate_text_projections=model_config.separate_text_projections,
  )

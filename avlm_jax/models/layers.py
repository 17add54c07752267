"""Transformer building blocks shared by both towers.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, …) and the main
activations are constrained with `act_*` names; `avlm_jax.sharding` maps both onto the mesh.
The modules decide nothing about the mesh themselves.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Activation axis names: (batch, sequence, features).
ACT_SEQ = ("act_batch", "act_len", "act_embed")


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
  """A parameter initialiser annotated with logical axis names."""
  return nn.with_logical_partitioning(init, names)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      scale_init=partitioned(nn.initializers.ones, ("embed",)),
      bias_init=partitioned(nn.initializers.zeros, ("embed",)),
      name=name,
  )


ATTENTION_CHOICES = ("xla", "cudnn", "auto")


def resolve_attention(choice: str, dtype: Dtype, dropout_rate: float, platform: str | None = None) -> str:
  """`model.attention` -> the implementation a tower runs: 'cudnn' (flash attention through
  `jax.nn.dot_product_attention`) where cuDNN can run it (a GPU, bf16/fp16, no attention dropout),
  else 'xla' (the plain einsum-softmax-einsum path, softmax in float32). A choice that falls back
  says so once (a UserWarning)."""
  if choice not in ATTENTION_CHOICES:
    raise ValueError(f"config.model.attention={choice!r}; expected one of {ATTENTION_CHOICES}")
  if choice == "xla":
    return "xla"
  platform = platform or jax.default_backend()
  why = None
  if platform != "gpu":
    why = f"the backend is {platform!r}, not a GPU"
  elif jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    why = f"cuDNN flash attention needs bfloat16 or float16, the model computes in {jnp.dtype(dtype).name}"
  elif dropout_rate > 0:
    why = f"cuDNN flash attention has no attention dropout (dropout {dropout_rate})"
  if why is None:
    return "cudnn"
  if choice == "cudnn":  # asked for explicitly: worth a word ('auto' falls back quietly)
    warnings.warn(f"model.attention='cudnn' falls back to the XLA path: {why}", UserWarning, stacklevel=2)
  return "xla"


def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, dtype: Dtype,
                    dropout: Callable[[jax.Array], jax.Array] = lambda w: w) -> jax.Array:
  """(B, T, N, H) queries, keys, values -> (B, T, N, H); `mask` (B, S) with 1 for real keys."""
  # The 1/√d scale goes on q (T·H values), not on the logits (T·T): XLA's CPU backend
  # materialises a logits-sized broadcast of the constant for the scaled dot.
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k)
  if mask is not None:
    big_neg = jnp.finfo(logits.dtype).min
    logits = jnp.where(mask[:, None, None, :].astype(bool), logits, big_neg)
  # Softmax in float32 whatever the compute dtype: it is the numerically fragile part.
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", dropout(weights), v)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                    implementation: str = "cudnn") -> jax.Array:
  """The same attention through `jax.nn.dot_product_attention` (cuDNN's flash attention on a GPU;
  `implementation='xla'` runs this wiring anywhere, which is how the tests check it)."""
  key_mask = None if mask is None else jnp.broadcast_to(
      mask[:, None, None, :].astype(bool), (q.shape[0], 1, q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=key_mask, implementation=implementation)


class PatchEmbedding(nn.Module):
  """Non-overlapping `patch`×`patch` patches -> `width` features: a stride-`patch` convolution,
  written as patchify + one matmul.

  Same parameters (`kernel` (p, p, C, width), `bias`), initialisation and values as `nn.Conv`
  with kernel = stride = p and VALID padding, so checkpoints are interchangeable. Why not the
  convolution: with one input channel (radiographs), the TPU compiler's backend flagged the
  convolution's weight gradient (a bf16[16,16,1,768] fusion) as its slow op in a ViT-B/16 pod
  compile that took 17.5 minutes at 4 images per chip; written as a matmul, the same compile takes
  about a minute (BENCHMARKS.md "Compile time at paper scale").
  """

  width: int
  patch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    p = self.patch
    kernel = self.param("kernel", partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                        (p, p, c, self.width))
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (self.width,))
    images, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
    patches = images.reshape(b, h // p, p, w // p, p, c)
    return jnp.einsum("bypxqc,pqcd->byxd", patches, kernel) + bias


class MultiHeadSelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections (BERT/ViT layout).

  `mask` is `(batch, length)` with 1 for real tokens; padded keys get no attention weight.
  `implementation`: 'xla' (`plain_attention`) or 'cudnn' (`fused_attention`), as
  `resolve_attention` picks it from `model.attention`.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads

    def proj(name: str) -> jax.Array:
      # Kernels are (embed, heads·head_dim), the HF BERT/ViT layout; `heads` names the fused
      # dimension, so tensor parallelism splits whole heads when num_heads divides evenly.
      y = dense(width, ("embed", "heads"), self.dtype, name)(x)
      y = y.reshape(*x.shape[:-1], self.num_heads, head_dim)
      return nn.with_logical_constraint(y, ("act_batch", "act_len", "act_heads", "act_kv"))

    q, k, v = proj("query"), proj("key"), proj("value")
    if self.implementation == "cudnn":
      y = fused_attention(q, k, v, mask)
    elif self.implementation == "xla":
      y = plain_attention(q, k, v, mask, self.dtype,
                          lambda w: nn.Dropout(self.dropout_rate)(w, deterministic=deterministic))
    else:
      raise ValueError(f"attention implementation {self.implementation!r}; expected 'xla' or 'cudnn'")
    y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_heads", "act_kv"))
    y = y.reshape(*x.shape[:-1], width)
    y = dense(width, ("heads", "embed"), self.dtype, "out")(y)
    return nn.with_logical_constraint(y, ACT_SEQ)


@jax.custom_vjp
def _exact_gelu(x: jax.Array) -> jax.Array:
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


def _exact_gelu_fwd(x):
  return _exact_gelu(x), x


def _exact_gelu_bwd(x, g):
  # d/dx x·Φ(x) = Φ(x) + x·φ(x), recomputed from x: one fused pass, and x is the only residual.
  cdf = 0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype))
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray((2 * jnp.pi) ** -0.5, x.dtype)
  return (g * (cdf + x * pdf),)


_exact_gelu.defvjp(_exact_gelu_fwd, _exact_gelu_bwd)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """GELU; exact (erf, as BERT, open_clip and torch's default) or the tanh approximation.

  The exact form is x·Φ(x) with Φ written through erf, with a hand-written gradient that keeps
  only x for the backward pass. `jax.nn.gelu` writes it as x·erfc(−x/√2)/2, which XLA lowers
  through exp and selects, and autodiff keeps Φ(x) beside x, so the forward pass takes two
  passes over the MLP activations: GELU was 8 % of the CPU train step's op time at
  configs/clip_shapes.py (BENCHMARKS.md "The step beside open_clip"). The two agree to < 1e-6
  (erfc keeps relative accuracy in the far negative tail, where GELU is ~0). Being a
  `jax.custom_vjp`, the exact form differentiates in reverse mode only (grad, vjp), not jvp.
  """
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  return _exact_gelu(x)


class MlpBlock(nn.Module):
  """Two-layer feed-forward block, `embed -> mlp -> embed`."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  gelu_approximate: bool = False  # BERT uses the exact (erf) GELU.

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(
        self.mlp_dim,
        dtype=self.dtype,
        kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
        bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
        name="fc1",
    )(x)
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
    h = gelu(h, self.gelu_approximate)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    y = nn.Dense(
        width,
        dtype=self.dtype,
        kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
        name="fc2",
    )(h)
    return nn.with_logical_constraint(y, ACT_SEQ)


class EncoderBlock(nn.Module):
  """One transformer layer; `pre_norm=True` is the ViT layout, `False` is BERT's post-norm."""

  num_heads: int
  mlp_dim: int
  pre_norm: bool
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # 'xla' | 'cudnn': resolve_attention's answer

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    # `deterministic` is positional so `nn.remat(..., static_argnums=(3,))` can mark it static.
    attn = MultiHeadSelfAttention(self.num_heads, self.dtype, self.dropout_rate, self.attention, name="attention")
    mlp = MlpBlock(self.mlp_dim, self.dtype, self.dropout_rate, self.gelu_approximate, name="mlp")
    ln_attn = layer_norm(self.layer_norm_eps, self.dtype, "attention_ln")
    ln_mlp = layer_norm(self.layer_norm_eps, self.dtype, "mlp_ln")
    drop = nn.Dropout(self.dropout_rate)
    if self.pre_norm:
      x = x + drop(attn(ln_attn(x), mask, deterministic=deterministic), deterministic=deterministic)
      x = x + drop(mlp(ln_mlp(x), deterministic=deterministic), deterministic=deterministic)
    else:
      x = ln_attn(x + drop(attn(x, mask, deterministic=deterministic), deterministic=deterministic))
      x = ln_mlp(x + drop(mlp(x, deterministic=deterministic), deterministic=deterministic))
    return nn.with_logical_constraint(x, ACT_SEQ)


def dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, name: str,
          kernel_init: Callable = nn.initializers.xavier_uniform()) -> nn.Dense:
  """A Dense layer with logical names on kernel `(in, out)` and bias `(out,)`."""
  return nn.Dense(
      features,
      dtype=dtype,
      kernel_init=partitioned(kernel_init, names),
      bias_init=partitioned(nn.initializers.zeros, (names[1],)),
      name=name,
  )


REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _ScanBlock(nn.Module):
  """EncoderBlock in the (carry, output) form `nn.scan` wants."""

  block_kwargs: dict

  @nn.compact
  def __call__(self, x, mask, deterministic):
    return EncoderBlock(**self.block_kwargs, name="block")(x, mask, deterministic=deterministic), None


def encoder_stack(x: jax.Array, mask: jax.Array | None, *, deterministic: bool, depth: int,
                  block_kwargs: dict, scan: bool, remat_policy: str, prefix: str) -> jax.Array:
  """`depth` EncoderBlocks, as a Python loop (`{prefix}_{i}` params) or an `nn.scan`.

  Scanning stacks the layers' params along a leading `layers` axis (`{prefix}s/block/...`): one
  compiled layer instead of `depth`, much faster compiles at depth 12+. `remat_policy` picks what
  the backward pass recomputes (see REMAT_POLICIES). Must be called inside a compact module.
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
  policy = REMAT_POLICIES[remat_policy]
  if scan:
    cls = _ScanBlock
    if remat_policy != "none":
      cls = nn.remat(cls, policy=policy, prevent_cse=False, static_argnums=(3,))
    stack = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast), length=depth,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(block_kwargs, name=f"{prefix}s")(x, mask, deterministic)
    return x
  cls = EncoderBlock
  if remat_policy != "none":
    cls = nn.remat(cls, policy=policy, static_argnums=(3,))
  for i in range(depth):
    x = cls(**block_kwargs, name=f"{prefix}_{i}")(x, mask, deterministic)
  return x


def scan_layers(params: dict, prefix: str, depth: int) -> dict:
  """Unscanned `{prefix}_{i}` subtrees -> one scanned `{prefix}s/block` subtree (leading layer axis)."""
  out = {k: v for k, v in params.items() if not (k.startswith(prefix + "_") and k[len(prefix) + 1:].isdigit())}
  layers_ = [params[f"{prefix}_{i}"] for i in range(depth)]
  out[f"{prefix}s"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers_)}
  return out


def unscan_layers(params: dict, prefix: str) -> dict:
  """The inverse of `scan_layers`."""
  out = {k: v for k, v in params.items() if k != f"{prefix}s"}
  stacked = params[f"{prefix}s"]["block"]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    out[f"{prefix}_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  return out

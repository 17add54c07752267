"""Plain ViT checkpoints <-> AnatomyViT's encoder params.

Three layouts load, detected from the keys: big_vision / vit_jax `.npz` ('/'-joined Flax paths),
timm safetensors (`blocks.N.attn.qkv`) and HF transformers ViT safetensors
(`encoder.layer.N.attention.attention.query`). Only the encoder transfers: `anatomy_tokens`, their
position embeddings and the new heads keep the template's fresh init, and classifier heads are
skipped. Two adaptations make an ImageNet ViT fit a grayscale, larger-image AnatomyViT:

* an RGB patch kernel is summed over its input channels, because a grayscale image replicated to
  RGB (how it would be fed to the original model) gives exactly that response;
* patch position embeddings are resized bilinearly when the checkpoint's patch grid differs.

Note the source models' numerics this import does not change: big_vision / vit_jax ViTs use the tanh
GELU and HF ViTs LayerNorm eps 1e-12, while AnatomyViT uses the exact GELU and eps 1e-6 (as timm).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from avlm_jax.convert import tree
from avlm_jax.convert.report import ConversionReport

LAYOUTS = ("big_vision", "timm", "hf")

# A loaded tensor: (array already in our layout, the checkpoint key it came from).
Sourced = tuple[np.ndarray, str]


# --- reading -------------------------------------------------------------------------------------


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], str]:
  """Tensors of a `.npz` or `.safetensors` file (or a folder holding `model.safetensors`)."""
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}, path
  return tree.read_safetensors(path)


def _prefix_of(keys: list[str], anchor: str, sep: str) -> str | None:
  """The prefix in front of `anchor` (e.g. 'vit.' or 'params/img/'), None when absent."""
  found = [k[:-len(anchor)] for k in keys if k == anchor or k.endswith(sep + anchor)]
  return found[0] if len(found) == 1 else None


# Per layout, the patch-embedding key that identifies it and the separator before it; what precedes
# it is the encoder's prefix ('vit.' in ViTForImageClassification, 'params/img/' in a big_vision CLIP).
_ANCHORS = {
    "big_vision": ("embedding/kernel", "/"),
    "timm": ("patch_embed.proj.weight", "."),
    "hf": ("embeddings.patch_embeddings.projection.weight", "."),
}


def detect_vit_layout(keys: list[str]) -> tuple[str, str]:
  """('big_vision' | 'timm' | 'hf', the encoder's key prefix), from the patch-embedding key."""
  for layout, (anchor, sep) in _ANCHORS.items():
    prefix = _prefix_of(keys, anchor, sep)
    if prefix is not None:
      return layout, prefix
  raise ValueError("no ViT patch embedding found: expected 'embedding/kernel' (big_vision), "
                   "'patch_embed.proj.weight' (timm) or "
                   f"'*embeddings.patch_embeddings.projection.weight' (HF); first keys: {sorted(keys)[:5]}")


# --- per-layout key maps -------------------------------------------------------------------------
# Each returns {our param path: (tensor in our layout, checkpoint key)} for the encoder, plus the
# raw position table (rows, D) and whether its first row is the CLS position (None: decide by shape).


class _Reader:
  """Checkpoint access that records which keys were used and names the file in every error."""

  def __init__(self, tensors: Mapping[str, np.ndarray], file: str):
    self.tensors, self.file, self.used = tensors, file, set()

  def get(self, key: str, needed_for: str) -> np.ndarray:
    if key not in self.tensors:
      raise ValueError(f"{self.file}: missing key {key!r} (needed for {needed_for!r})")
    self.used.add(key)
    return np.asarray(self.tensors[key])

  def sublayer(self, block: str, probe: str, fallback: str) -> str:
    """`probe`'s first path component when `block + probe` exists, else `fallback`."""
    return probe.split("/")[0] + "/" if block + probe in self.tensors else fallback


def _big_vision(r: _Reader, p: str, depth: int, num_heads: int | None
                ) -> tuple[dict[str, Sourced], Sourced, bool | None]:
  out: dict[str, Sourced] = {}

  def take(ours: str, key: str, convert: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> None:
    out[ours] = (convert(r.get(key, ours)), key)

  take("patch_embedding/kernel", p + "embedding/kernel")
  take("patch_embedding/bias", p + "embedding/bias")
  if p + "cls" in r.tensors:
    take("cls_token", p + "cls")
  for i in range(depth):
    b = f"{p}Transformer/encoderblock_{i}/"
    # big_vision names the sublayers _0, _1, …; the original vit_jax checkpoints number them
    # LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3.
    attn = b + r.sublayer(b, "MultiHeadDotProductAttention_0/query/kernel", "MultiHeadDotProductAttention_1/")
    ln2 = b + r.sublayer(b, "LayerNorm_1/scale", "LayerNorm_2/")
    mlp = b + r.sublayer(b, "MlpBlock_0/Dense_0/kernel", "MlpBlock_3/")
    o = f"block_{i}/"
    for name in ("scale", "bias"):
      take(o + f"attention_ln/{name}", b + f"LayerNorm_0/{name}")
      take(o + f"mlp_ln/{name}", ln2 + name)
    for name in ("query", "key", "value"):
      kernel_key = attn + f"{name}/kernel"
      kernel = r.get(kernel_key, o + f"attention/{name}/kernel")
      if num_heads is not None and kernel.ndim == 3 and kernel.shape[1] != num_heads:
        raise ValueError(f"{r.file}: {kernel_key!r} {kernel.shape} splits {kernel.shape[1]} heads "
                         f"but the model has num_heads={num_heads}")
      # (D, H, hd) -> (D, H·hd): heads are contiguous blocks of the fused axis, as in our attention.
      take(o + f"attention/{name}/kernel", kernel_key, lambda a: a.reshape(a.shape[0], -1))
      take(o + f"attention/{name}/bias", attn + f"{name}/bias", lambda a: a.reshape(-1))
    take(o + "attention/out/kernel", attn + "out/kernel", lambda a: a.reshape(-1, a.shape[-1]))
    take(o + "attention/out/bias", attn + "out/bias")
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      take(o + f"mlp/{ours}/kernel", mlp + f"{theirs}/kernel")
      take(o + f"mlp/{ours}/bias", mlp + f"{theirs}/bias")
  for name in ("scale", "bias"):
    take(f"encoder_ln/{name}", f"{p}Transformer/encoder_norm/{name}")

  # vit_jax stores the table with a CLS row under posembed_input; big_vision's `pos_embedding` has
  # none (CLS gets no position there), except in our own export which adds it: decided by shape.
  vit_jax_key = p + "Transformer/posembed_input/pos_embedding"
  pos_key = vit_jax_key if vit_jax_key in r.tensors else p + "pos_embedding"
  pos = r.get(pos_key, "pos_embedding")
  return out, (pos.reshape(-1, pos.shape[-1]), pos_key), (True if pos_key == vit_jax_key else None)


def _torch_linear(r: _Reader, out: dict[str, Sourced], ours: str, theirs: str) -> None:
  out[ours + "/kernel"] = (r.get(theirs + ".weight", ours + "/kernel").T, theirs + ".weight")
  out[ours + "/bias"] = (r.get(theirs + ".bias", ours + "/bias"), theirs + ".bias")


def _torch_norm(r: _Reader, out: dict[str, Sourced], ours: str, theirs: str) -> None:
  out[ours + "/scale"] = (r.get(theirs + ".weight", ours + "/scale"), theirs + ".weight")
  out[ours + "/bias"] = (r.get(theirs + ".bias", ours + "/bias"), theirs + ".bias")


def _torch_patch(r: _Reader, out: dict[str, Sourced], theirs: str) -> None:
  # torch Conv2d weight (D, C, p, p) -> Flax Conv kernel (p, p, C, D); both cross-correlate.
  w = r.get(theirs + ".weight", "patch_embedding/kernel")
  out["patch_embedding/kernel"] = (w.transpose(2, 3, 1, 0), theirs + ".weight")
  out["patch_embedding/bias"] = (r.get(theirs + ".bias", "patch_embedding/bias"), theirs + ".bias")


def _timm(r: _Reader, p: str, depth: int, num_heads: int | None
          ) -> tuple[dict[str, Sourced], Sourced, bool | None]:
  del num_heads  # timm's fused qkv does not record the head split
  out: dict[str, Sourced] = {}
  _torch_patch(r, out, p + "patch_embed.proj")
  if p + "cls_token" in r.tensors:
    out["cls_token"] = (r.get(p + "cls_token", "cls_token"), p + "cls_token")
  for i in range(depth):
    b, o = f"{p}blocks.{i}.", f"block_{i}/"
    _torch_norm(r, out, o + "attention_ln", b + "norm1")
    qkv_w = r.get(b + "attn.qkv.weight", o + "attention/query|key|value/kernel")
    qkv_b = r.get(b + "attn.qkv.bias", o + "attention/query|key|value/bias")
    if qkv_w.shape[0] % 3 or qkv_b.shape[0] != qkv_w.shape[0]:
      raise ValueError(f"{r.file}: {b}attn.qkv.weight {qkv_w.shape} / bias {qkv_b.shape} "
                       "do not split into q, k, v")
    for name, w, bias in zip(("query", "key", "value"), np.split(qkv_w, 3), np.split(qkv_b, 3)):
      out[o + f"attention/{name}/kernel"] = (w.T, b + "attn.qkv.weight")
      out[o + f"attention/{name}/bias"] = (bias, b + "attn.qkv.bias")
    _torch_linear(r, out, o + "attention/out", b + "attn.proj")
    _torch_norm(r, out, o + "mlp_ln", b + "norm2")
    _torch_linear(r, out, o + "mlp/fc1", b + "mlp.fc1")
    _torch_linear(r, out, o + "mlp/fc2", b + "mlp.fc2")
  _torch_norm(r, out, "encoder_ln", p + "norm")
  pos = r.get(p + "pos_embed", "pos_embedding")
  return out, (pos.reshape(-1, pos.shape[-1]), p + "pos_embed"), None  # no_embed_class models have no CLS row


def _hf(r: _Reader, p: str, depth: int, num_heads: int | None
        ) -> tuple[dict[str, Sourced], Sourced, bool | None]:
  del num_heads  # the head count lives in config.json, not in the weights
  out: dict[str, Sourced] = {}
  _torch_patch(r, out, p + "embeddings.patch_embeddings.projection")
  out["cls_token"] = (r.get(p + "embeddings.cls_token", "cls_token"), p + "embeddings.cls_token")
  for i in range(depth):
    b, o = f"{p}encoder.layer.{i}.", f"block_{i}/"
    _torch_norm(r, out, o + "attention_ln", b + "layernorm_before")
    for name in ("query", "key", "value"):
      _torch_linear(r, out, o + f"attention/{name}", b + f"attention.attention.{name}")
    _torch_linear(r, out, o + "attention/out", b + "attention.output.dense")
    _torch_norm(r, out, o + "mlp_ln", b + "layernorm_after")
    _torch_linear(r, out, o + "mlp/fc1", b + "intermediate.dense")
    _torch_linear(r, out, o + "mlp/fc2", b + "output.dense")
  _torch_norm(r, out, "encoder_ln", p + "layernorm")
  pos_key = p + "embeddings.position_embeddings"
  pos = r.get(pos_key, "pos_embedding")
  return out, (pos.reshape(-1, pos.shape[-1]), pos_key), True


_KEY_MAPS = {"big_vision": _big_vision, "timm": _timm, "hf": _hf}

# Unused keys under the encoder's prefix that are fine to drop (classifier / pooling heads, HF's mask
# token); any other is an error, since it would change what the encoder computes (layer scale,
# register tokens, extra blocks, …). Keys outside the prefix belong to other models and are skipped.
_SKIPPABLE = {
    "big_vision": re.compile(r"^(head|pre_logits|MAPHead_0)/"),
    "timm": re.compile(r"^(head|fc_norm|attn_pool)\."),
    "hf": re.compile(r"^(pooler\.|embeddings\.mask_token$)"),
}


# --- assembling into the template ----------------------------------------------------------------


def _square_side(n: int) -> int | None:
  side = math.isqrt(n)
  return side if side * side == n else None


def _split_positions(rows: int, cls_row: bool | None, template_grid: tuple[int, int], file: str, key: str
                     ) -> tuple[bool, tuple[int, int]]:
  """(whether row 0 is the CLS position, the checkpoint's patch grid) for a table of `rows` rows."""
  n_template = template_grid[0] * template_grid[1]
  options = [True, False] if cls_row is None else [cls_row]
  for has_cls in options:  # the template's own grid first: it also covers non-square grids
    if rows - has_cls == n_template:
      return has_cls, template_grid
  for has_cls in options:
    side = _square_side(rows - has_cls)
    if side:
      return has_cls, (side, side)
  raise ValueError(f"{file}: {key!r} has {rows} rows, which is neither the model's grid "
                   f"{template_grid[0]}x{template_grid[1]} (+CLS) nor a square grid")


def resize_patch_positions(table: np.ndarray, source_grid: tuple[int, int],
                           target_grid: tuple[int, int]) -> np.ndarray:
  """(gh·gw, D) patch position embeddings resized bilinearly (half-pixel centres) to a new grid."""
  if tuple(source_grid) == tuple(target_grid):
    return table
  d = table.shape[-1]
  grid = jnp.asarray(table, jnp.float32).reshape(*source_grid, d)
  resized = jax.image.resize(grid, (*target_grid, d), method="bilinear", antialias=False)
  return np.asarray(resized).reshape(-1, d)


def _template_grid(template: Mapping[str, Any], grid: tuple[int, int] | None) -> tuple[int, int, int]:
  """(number of anatomy tokens, grid rows, grid cols) of the template's position table."""
  pos = tree.value_of(template["pos_embedding"])
  regions = tree.value_of(template["anatomy_tokens"]).shape[1] if "anatomy_tokens" in template else 0
  n_patches = pos.shape[1] - 1 - regions
  if grid is None:
    side = _square_side(n_patches)
    if side is None:
      raise ValueError(f"the model's position table has {n_patches} patch rows, not a square grid; "
                       "pass grid=(rows, cols)")
    grid = (side, side)
  if grid[0] * grid[1] != n_patches:
    raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches but the model's position table "
                     f"has {n_patches}")
  return regions, grid[0], grid[1]


def load_vit_params(path: str, params_template: Mapping[str, Any], *, grid: tuple[int, int] | None = None,
                    num_heads: int | None = None) -> tuple[dict[str, Any], ConversionReport]:
  """The AnatomyViT template (boxed or plain) with its encoder filled from a ViT checkpoint.

  `grid`: the model's patch grid (rows, cols), needed only when it is not square. `num_heads`:
  checked against big_vision checkpoints, whose kernels record the head split.
  """
  tensors, file = read_checkpoint(path)
  layout, prefix = detect_vit_layout(list(tensors))
  template = tree.flat(params_template)
  if "pos_embedding" not in template or "patch_embedding/kernel" not in template:
    raise ValueError("params_template is not an AnatomyViT params tree (no pos_embedding / patch_embedding)")
  depth = len({k.split("/")[0] for k in template if re.fullmatch(r"block_\d+", k.split("/")[0])})
  reader = _Reader(tensors, file)
  sources, (pos_table, pos_key), cls_row = _KEY_MAPS[layout](reader, prefix, depth, num_heads)
  report = ConversionReport(source=f"{file} ({layout} layout)")
  new_values: dict[str, np.ndarray] = {}

  kernel, kernel_key = sources["patch_embedding/kernel"]
  want = tree.value_of(template["patch_embedding/kernel"]).shape
  if kernel.ndim == 4 and kernel.shape[2] == 3 and want[2] == 1:
    # A grayscale image replicated to RGB gives sum_c w_c·x, i.e. one channel with the summed kernel.
    sources["patch_embedding/kernel"] = (kernel.sum(axis=2, keepdims=True), kernel_key)
    report.notes.append("patch_embedding/kernel: summed the checkpoint's 3 input channels into 1 (grayscale)")

  for param, leaf in template.items():
    if param == "pos_embedding":
      continue
    if param not in sources:
      report.created.append(param)
      continue
    value, key = sources[param]
    tree.check_shape(file, key, value.shape, param, tree.value_of(leaf).shape)
    new_values[param] = value
    report.loaded.append(param)

  regions, gh, gw = _template_grid(template, grid)
  pos_template = np.asarray(tree.value_of(template["pos_embedding"]))
  width = pos_template.shape[-1]
  if pos_table.shape[-1] != width:
    raise ValueError(f"{file}: {pos_key!r} has width {pos_table.shape[-1]} but the model's "
                     f"pos_embedding has {width}")
  has_cls, source_grid = _split_positions(pos_table.shape[0], cls_row, (gh, gw), file, pos_key)
  pos = pos_template[0].copy()
  # No CLS row means the source model adds no position to CLS; zero reproduces that.
  pos[0] = pos_table[0] if has_cls else 0.0
  if not has_cls:
    report.notes.append(f"pos_embedding[cls]: zero ({pos_key!r} has no CLS row)")
  pos[1 + regions:] = resize_patch_positions(pos_table[int(has_cls):], source_grid, (gh, gw))
  if source_grid != (gh, gw):
    report.notes.append(
        f"pos_embedding[patches]: resized {source_grid[0]}x{source_grid[1]} -> {gh}x{gw} bilinear")
  new_values["pos_embedding"] = pos[None]
  report.loaded += ["pos_embedding[cls]", "pos_embedding[patches]"]
  if regions:
    report.created.append("pos_embedding[anatomy]")

  unexpected = []
  for key in sorted(set(tensors) - reader.used):
    inside = key.startswith(prefix) and not _SKIPPABLE[layout].match(key[len(prefix):])
    (unexpected if inside else report.skipped).append(key)
  if unexpected:
    raise ValueError(f"{file}: {len(unexpected)} checkpoint tensors have no place in the model "
                     f"(depth {depth}; extra blocks or unsupported parts?): {', '.join(unexpected[:5])}")
  return tree.rebuild(params_template, new_values), report


# --- export --------------------------------------------------------------------------------------


def _encoder_arrays(params: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
  """Plain numpy encoder params, the depth, and the position table without anatomy rows (1+N, D)."""
  flat = {k: np.asarray(tree.value_of(v), np.float32) for k, v in tree.flat(params).items()}
  depth = len({k.split("/")[0] for k in flat if re.fullmatch(r"block_\d+", k.split("/")[0])})
  regions = flat["anatomy_tokens"].shape[1] if "anatomy_tokens" in flat else 0
  pos = flat["pos_embedding"][0]
  return flat, depth, np.concatenate([pos[:1], pos[1 + regions:]], axis=0)


def export_big_vision_npz(params: Mapping[str, Any], path: str, *, num_heads: int) -> None:
  """AnatomyViT's encoder as a big_vision-layout `.npz` (no head).

  `pos_embedding` is written (1, 1+N, D) with the CLS position first, so the export loses nothing;
  the anatomy tokens' positions are not part of a plain ViT and are left out.
  """
  flat, depth, pos = _encoder_arrays(params)
  out = {
      "embedding/kernel": flat["patch_embedding/kernel"],
      "embedding/bias": flat["patch_embedding/bias"],
      "cls": flat["cls_token"],
      "pos_embedding": pos[None],
      "Transformer/encoder_norm/scale": flat["encoder_ln/scale"],
      "Transformer/encoder_norm/bias": flat["encoder_ln/bias"],
  }
  for i in range(depth):
    b, o = f"Transformer/encoderblock_{i}/", f"block_{i}/"
    attn = b + "MultiHeadDotProductAttention_0/"
    for ours, theirs in (("attention_ln", "LayerNorm_0"), ("mlp_ln", "LayerNorm_1")):
      out[f"{b}{theirs}/scale"] = flat[f"{o}{ours}/scale"]
      out[f"{b}{theirs}/bias"] = flat[f"{o}{ours}/bias"]
    for name in ("query", "key", "value"):
      kernel = flat[f"{o}attention/{name}/kernel"]
      width = kernel.shape[0]
      if kernel.shape[1] % num_heads:
        raise ValueError(f"{o}attention/{name}/kernel {kernel.shape} does not split into "
                         f"num_heads={num_heads}")
      out[f"{attn}{name}/kernel"] = kernel.reshape(width, num_heads, -1)
      out[f"{attn}{name}/bias"] = flat[f"{o}attention/{name}/bias"].reshape(num_heads, -1)
    out[f"{attn}out/kernel"] = flat[f"{o}attention/out/kernel"].reshape(num_heads, -1, width)
    out[f"{attn}out/bias"] = flat[f"{o}attention/out/bias"]
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      out[f"{b}MlpBlock_0/{theirs}/kernel"] = flat[f"{o}mlp/{ours}/kernel"]
      out[f"{b}MlpBlock_0/{theirs}/bias"] = flat[f"{o}mlp/{ours}/bias"]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **out)


def export_timm_safetensors(params: Mapping[str, Any], path: str) -> None:
  """AnatomyViT's encoder as a timm-layout `.safetensors` file (no head, CLS row first in pos_embed)."""
  flat, depth, pos = _encoder_arrays(params)
  out = {
      "patch_embed.proj.weight": flat["patch_embedding/kernel"].transpose(3, 2, 0, 1),
      "patch_embed.proj.bias": flat["patch_embedding/bias"],
      "cls_token": flat["cls_token"],
      "pos_embed": pos[None],
      "norm.weight": flat["encoder_ln/scale"],
      "norm.bias": flat["encoder_ln/bias"],
  }
  for i in range(depth):
    b, o = f"blocks.{i}.", f"block_{i}/"
    for ours, theirs in (("attention_ln", "norm1"), ("mlp_ln", "norm2")):
      out[f"{b}{theirs}.weight"] = flat[f"{o}{ours}/scale"]
      out[f"{b}{theirs}.bias"] = flat[f"{o}{ours}/bias"]
    names = ("query", "key", "value")
    out[b + "attn.qkv.weight"] = np.concatenate([flat[f"{o}attention/{n}/kernel"].T for n in names])
    out[b + "attn.qkv.bias"] = np.concatenate([flat[f"{o}attention/{n}/bias"] for n in names])
    for ours, theirs in (("attention/out", "attn.proj"), ("mlp/fc1", "mlp.fc1"), ("mlp/fc2", "mlp.fc2")):
      out[f"{b}{theirs}.weight"] = flat[f"{o}{ours}/kernel"].T
      out[f"{b}{theirs}.bias"] = flat[f"{o}{ours}/bias"]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, path)

"""Load a Hugging Face BERT-family checkpoint (`config.json` + `model.safetensors`) into `TextTower`.

Reads the PyTorch-named tensors with `safetensors.numpy` (no torch needed), maps them onto the
tower's param tree and transposes Linear weights from torch's (out, in) to Flax's (in, out).
Template params with no BERT counterpart (e.g. a projection head) keep their fresh init.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from avlm_jax.convert import tree
from avlm_jax.convert.report import ConversionReport

# model_type values whose checkpoints use BertModel's embeddings + post-norm layers and absolute
# positions counted from 0. RoBERTa-style models are excluded: their positions start after the pad id.
COMPATIBLE_MODEL_TYPES = ("bert",)
# In HF, "gelu" is the exact erf GELU the tower uses; "gelu_new" / "gelu_pytorch_tanh" are tanh fits.
EXACT_GELU = ("gelu",)

# Checkpoint keys that carry no weight the tower uses: heads and the position_ids buffer.
_SKIPPABLE = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")


def _read_config(folder: str) -> tuple[dict[str, Any], str]:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; expected a Hugging Face model folder")
  with open(path) as f:
    return json.load(f), path


def text_tower_kwargs_from_hf_config(folder: str) -> dict[str, Any]:
  """`TextTower` keyword arguments matching the checkpoint's architecture."""
  config, path = _read_config(folder)

  def need(key: str) -> Any:
    if key not in config:
      raise ValueError(f"{path}: missing key {key!r}")
    return config[key]

  model_type = config.get("model_type")
  if model_type not in COMPATIBLE_MODEL_TYPES:
    raise ValueError(f"{path}: model_type {model_type!r} is not BERT-layout compatible "
                     f"(supported: {', '.join(COMPATIBLE_MODEL_TYPES)})")
  act = config.get("hidden_act", "gelu")
  if act not in EXACT_GELU:
    raise ValueError(f"{path}: hidden_act {act!r} is not the exact (erf) GELU the text tower uses")
  position_type = config.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(f"{path}: position_embedding_type {position_type!r}; only 'absolute' is supported")
  if config.get("is_decoder", False):
    raise ValueError(f"{path}: is_decoder is true; the text tower is a bidirectional encoder")
  pad_id = config.get("pad_token_id")
  return {
      "vocab_size": need("vocab_size"),
      "width": need("hidden_size"),
      "depth": need("num_hidden_layers"),
      "num_heads": need("num_attention_heads"),
      "mlp_dim": need("intermediate_size"),
      "max_len": need("max_position_embeddings"),
      "type_vocab_size": config.get("type_vocab_size", 2),
      "layer_norm_eps": config.get("layer_norm_eps", 1e-12),
      "pad_id": 0 if pad_id is None else pad_id,
  }


def _transpose(a: np.ndarray) -> np.ndarray:
  return a.T


def _same(a: np.ndarray) -> np.ndarray:
  return a


def _source_map(depth: int) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
  """Tower param path -> (checkpoint key without prefix, conversion). LayerNorms use `.weight`."""
  m = {
      "word_embeddings/embedding": ("embeddings.word_embeddings.weight", _same),
      "position_embeddings": ("embeddings.position_embeddings.weight", _same),
      "token_type_embeddings": ("embeddings.token_type_embeddings.weight", _same),
  }

  def linear(ours: str, theirs: str) -> None:
    m[f"{ours}/kernel"] = (f"{theirs}.weight", _transpose)
    m[f"{ours}/bias"] = (f"{theirs}.bias", _same)

  def norm(ours: str, theirs: str) -> None:
    m[f"{ours}/scale"] = (f"{theirs}.weight", _same)
    m[f"{ours}/bias"] = (f"{theirs}.bias", _same)

  norm("embeddings_ln", "embeddings.LayerNorm")
  for i in range(depth):
    ours, theirs = f"layer_{i}", f"encoder.layer.{i}"
    for name in ("query", "key", "value"):
      linear(f"{ours}/attention/{name}", f"{theirs}.attention.self.{name}")
    linear(f"{ours}/attention/out", f"{theirs}.attention.output.dense")
    norm(f"{ours}/attention_ln", f"{theirs}.attention.output.LayerNorm")
    linear(f"{ours}/mlp/fc1", f"{theirs}.intermediate.dense")
    linear(f"{ours}/mlp/fc2", f"{theirs}.output.dense")
    norm(f"{ours}/mlp_ln", f"{theirs}.output.LayerNorm")
  return m


def _key_prefix(keys: list[str], file: str) -> str:
  """The prefix before `embeddings.word_embeddings.weight` ('' for BertModel, 'bert.' for heads)."""
  anchor = "embeddings.word_embeddings.weight"
  found = [k[:-len(anchor)] for k in keys if k.endswith(anchor) and (k == anchor or k.endswith("." + anchor))]
  if len(found) != 1:
    raise ValueError(f"{file}: expected exactly one '*{anchor}' key to locate the BERT weights, "
                     f"found {len(found)}")
  return found[0]


def _lookup(tensors: Mapping[str, np.ndarray], key: str) -> tuple[str, np.ndarray] | None:
  """The tensor for `key`, accepting the old TF-converted LayerNorm names gamma/beta."""
  candidates = [key]
  if key.endswith("LayerNorm.weight"):
    candidates.append(key[:-len("weight")] + "gamma")
  elif key.endswith("LayerNorm.bias"):
    candidates.append(key[:-len("bias")] + "beta")
  for k in candidates:
    if k in tensors:
      return k, tensors[k]
  return None


def load_text_tower_params(folder: str, params_template: Mapping[str, Any]
                           ) -> tuple[dict[str, Any], ConversionReport]:
  """The template (a `TextTower` params tree, boxed or plain) filled from the checkpoint in `folder`.

  Raises ValueError naming the file and key when a tensor the tower needs is missing, a shape
  differs, or the checkpoint holds encoder weights the template has no place for (e.g. more layers).
  """
  tensors, file = tree.read_safetensors(folder)
  prefix = _key_prefix(list(tensors), file)
  template = tree.flat(params_template)
  depth = len({p.split("/")[0] for p in template if re.fullmatch(r"layer_\d+", p.split("/")[0])})
  sources = _source_map(depth)

  report = ConversionReport(source=file)
  new_values, used = {}, set()
  for path, leaf in template.items():
    if path not in sources:
      report.created.append(path)
      continue
    key, convert = sources[path]
    found = _lookup(tensors, prefix + key)
    if found is None:
      raise ValueError(f"{file}: missing key {prefix + key!r} (needed for text tower param {path!r})")
    source_key, array = found
    value = convert(array)
    tree.check_shape(file, source_key, value.shape, path, tree.value_of(leaf).shape)
    new_values[path] = value
    used.add(source_key)
    report.loaded.append(path)

  unexpected = []
  for key in sorted(tensors):
    if key in used:
      continue
    local = key[len(prefix):] if key.startswith(prefix) else None
    if local is not None and not _SKIPPABLE.match(local) and local.startswith(("embeddings.", "encoder.")):
      unexpected.append(key)
    else:
      report.skipped.append(key)
  if unexpected:
    raise ValueError(f"{file}: {len(unexpected)} encoder tensors have no place in the template "
                     f"(template depth {depth}; is the tower built from this checkpoint's config?): "
                     f"{', '.join(unexpected[:5])}")
  return tree.rebuild(params_template, new_values), report

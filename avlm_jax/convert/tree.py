"""Param-tree plumbing shared by the converters: '/'-path views, leaf replacement, tensor files."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file


def flat(params: Mapping[str, Any]) -> dict[str, Any]:
  """'/'-joined paths -> leaves; a logical-partitioning box counts as one leaf."""
  return traverse_util.flatten_dict(params, sep="/")


def value_of(leaf: Any) -> Any:
  return leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def rebuild(template: Mapping[str, Any], new_values: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The template with the leaves named in `new_values` replaced.

  A replacement takes the template leaf's dtype, its device placement (so a sharded template gives
  sharded params) and its partitioning box, so the result drops in wherever the template did.
  """
  out = {}
  for path, leaf in flat(template).items():
    if path not in new_values:
      out[path] = leaf
      continue
    old = value_of(leaf)
    new = np.asarray(new_values[path]).astype(old.dtype)
    new = jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(new)
    out[path] = leaf.replace_boxed(new) if isinstance(leaf, nn.meta.AxisMetadata) else new
  return traverse_util.unflatten_dict(out, sep="/")


def check_shape(file: str, source_key: str, got: tuple, model_key: str, want: tuple) -> None:
  if tuple(got) != tuple(want):
    raise ValueError(f"{file}: checkpoint tensor {source_key!r} has shape {tuple(got)} (after conversion) "
                     f"but model param {model_key!r} has shape {tuple(want)}")


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of a .safetensors file, or of a folder's `model.safetensors` (sharded or not).

  Returns the tensors and the file name that error messages should cite.
  """
  if os.path.isdir(path):
    single = os.path.join(path, "model.safetensors")
    index = single + ".index.json"
    if os.path.exists(single):
      path = single
    elif os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      tensors = {}
      for shard in shards:
        tensors.update(_load(os.path.join(os.path.dirname(index), shard)))
      return tensors, index
    else:
      raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json in this folder")
  return _load(path), path


def _load(file: str) -> dict[str, np.ndarray]:
  try:
    return load_file(file)
  except KeyError as e:
    # safetensors.numpy has no bfloat16 (numpy lacks the type); say so instead of a bare KeyError.
    raise ValueError(f"{file}: tensor dtype {e} cannot be read as numpy (bfloat16 checkpoints must be "
                     "converted to float32 first)") from None

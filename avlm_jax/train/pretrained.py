"""Start a fresh run from pretrained towers: a HF BERT-family text encoder and/or a ViT.

Only a fresh state is touched (a resumed run has its own weights). Loading goes through the
converters in `avlm_jax.convert`, which keep each leaf's sharding, so nothing is gathered onto one
device. Scanned towers are unscanned for the converter and re-stacked after.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from avlm_jax import paths
from avlm_jax.convert.hf_bert import load_text_tower_params, text_tower_kwargs_from_hf_config
from avlm_jax.convert.vit import load_vit_params
from avlm_jax.models import layers

# TextTower fields a checkpoint fixes, and the config keys that must agree with them.
_TEXT_KEYS = {"width": "width", "depth": "depth", "num_heads": "num_heads", "mlp_dim": "mlp_dim",
              "max_len": "max_len"}


def check_text_config(text_cfg: ml_collections.ConfigDict, vocab_size: int) -> None:
  """Raise naming every config value that does not match the checkpoint the text tower loads."""
  if not text_cfg.init_from:
    return
  folder = paths.resolve(text_cfg.init_from)
  hf = text_tower_kwargs_from_hf_config(folder)
  wrong = [f"model.text.{ours}={text_cfg[ours]} but the checkpoint has {hf[theirs]}"
           for ours, theirs in _TEXT_KEYS.items() if text_cfg[ours] != hf[theirs]]
  fixed = {"type_vocab_size": 2, "pad_id": 0, "layer_norm_eps": 1e-12}  # TextTower's BERT defaults
  wrong += [f"the checkpoint has {k}={hf[k]}; the text tower supports {v}"
            for k, v in fixed.items() if k in hf and hf[k] != v]
  if vocab_size != hf["vocab_size"]:
    wrong.append(f"the tokenizer has {vocab_size} tokens but the checkpoint's vocabulary has "
                 f"{hf['vocab_size']} (point data.tokenizer_dir at the checkpoint's tokenizer)")
  if wrong:
    raise ValueError(f"model.text.init_from={text_cfg.init_from!r} ({folder}) does not fit the config:\n  "
                     + "\n  ".join(wrong))


def _through_unscanned(params: dict, scanned: bool, prefix: str, load: Callable) -> tuple[dict, Any]:
  if not scanned:
    return load(params)
  depth = jax.tree.leaves(params[f"{prefix}s"])[0].shape[0]
  loaded, report = load(layers.unscan_layers(params, prefix))
  return layers.scan_layers(loaded, prefix, depth), report


def load_pretrained(params: dict, model_cfg: ml_collections.ConfigDict, image_size: int
                    ) -> tuple[dict, list[str]]:
  """`params` with the configured pretrained towers loaded; returns the reports' summaries."""
  params, summaries = dict(params), []
  txt, img = model_cfg.text, model_cfg.image
  if txt.init_from:
    folder = paths.resolve(txt.init_from)
    params["text"], report = _through_unscanned(
        params["text"], txt.scan, "layer", lambda p: load_text_tower_params(folder, p))
    summaries.append(f"text tower <- {report.summary()}")
  if img.init_from:
    path = paths.resolve(img.init_from)
    grid = (image_size // img.patch_size,) * 2
    params["image"], report = _through_unscanned(
        params["image"], img.scan, "block",
        lambda p: load_vit_params(path, p, grid=grid, num_heads=img.num_heads))
    summaries.append(f"image tower <- {report.summary()}")
  return params, summaries

"""Every config builds, has only known keys, and avlm_b16 has the parameter count of its parts."""

import importlib
import pkgutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from avlm_jax import anatomy
from avlm_jax.config_check import check_config_keys
from avlm_jax.models.anatomy_vlm import build_model
from configs import common

CONFIG_NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "common")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_builds_with_known_keys_and_documents_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  cfg = module.get_config()
  check_config_keys(cfg, common.base_config())
  assert f"--config=configs/{name}.py" in module.__doc__


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _encoder_layer(d, mlp):
  attention = 4 * (d * d + d)
  mlp_block = d * mlp + mlp + mlp * d + d
  norms = 2 * 2 * d
  return attention + mlp_block + norms


@pytest.mark.parametrize("res", [224, 448])
def test_avlm_b16_parameter_count_by_hand(res):
  from configs import avlm_b16

  cfg = avlm_b16.get_config(f"res={res}")
  vocab, d, e, r = 30522, 768, 512, anatomy.NUM_REGIONS
  model = build_model(cfg.model, vocab)
  s = cfg.data.image_size
  abstract = jax.eval_shape(lambda k: model.init(
      k, jnp.zeros((1, s, s, 1)), jnp.zeros((1, r, 8), jnp.int32), jnp.zeros((2, 8), jnp.int32))["params"],
      jax.random.key(0))
  patches = (res // 16) ** 2
  image = (16 * 16 * 1 * d + d          # patch embedding (grayscale)
           + d + r * d                  # CLS and the 29 anatomy tokens
           + (1 + r + patches) * d      # positions
           + 12 * _encoder_layer(d, 3072) + 2 * d
           + 2 * (d * d + d) + (d * 4 + 4)   # box head: two hidden layers + output
           + (d + 1)                    # presence head
           + d + 4 * (d * d + d) + 2 * d + (d * 3072 + 3072) + (3072 * d + d)  # region pool: probe,
           # q/k/v/out, LayerNorm, MLP
           + (2 * d * e + e) + (d * e + e))  # region and image projections
  text = (vocab * d + 512 * d + 2 * d + 2 * d   # word, position, token-type embeddings + LayerNorm
          + 12 * _encoder_layer(d, 3072))
  head = 2 * (d * e + e) + 3                    # prompt and phrase projections, two logit scales, one bias
  params = nn.unbox(abstract)
  assert _count(params["image"]) == image
  assert _count(params["text"]) == text
  assert _count(params) == image + text + head
  assert params["image"]["blocks"]["block"]["mlp"]["fc1"]["kernel"].shape == (12, d, 3072)  # scanned


def test_avlm_b16_pretrained_encoder_rule_covers_the_encoder_and_only_it():
  from avlm_jax.train.state import lr_groups, param_path
  from configs import avlm_b16

  cfg = avlm_b16.get_config("vit=/ckpt/vit_b16.npz")
  assert cfg.model.image.init_from == "/ckpt/vit_b16.npz"
  model = build_model(cfg.model, 30522)
  abstract = nn.unbox(jax.eval_shape(lambda k: model.init(
      k, jnp.zeros((1, 224, 224, 1)), jnp.zeros((1, anatomy.NUM_REGIONS, 8), jnp.int32),
      jnp.zeros((2, 8), jnp.int32))["params"], jax.random.key(0)))
  groups = lr_groups(abstract, [tuple(r) for r in cfg.optimizer.lr_multipliers])
  slow = {param_path(p) for p, m in jax.tree_util.tree_flatten_with_path(groups)[0] if np.all(m == 0.1)}
  assert {"image/cls_token", "image/patch_embedding/kernel",
          "image/encoder_ln/scale", "image/blocks/block/mlp/fc1/kernel"} <= slow
  # The position table's pretrained rows (CLS, patches) learn slowly; its new anatomy rows do not.
  rows = groups["image"]["pos_embedding"][0, :, 0]
  np.testing.assert_allclose(rows, [0.1] + [1.0] * anatomy.NUM_REGIONS + [0.1] * (rows.size - 1 - anatomy.NUM_REGIONS))
  assert not any(p.startswith(("image/anatomy_tokens", "image/box_head", "image/region_projection", "text"))
                 for p in slow)
  assert avlm_b16.get_config().optimizer.lr_multipliers == ()  # from scratch: one learning rate

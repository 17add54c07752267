import jax
import jax.numpy as jnp
import numpy as np

from avlm_jax.train.state import lr_groups, make_optimizer, optimizer_groups, param_path
from configs import common


def _params():
  return {"image": {"block_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}, "head": {"kernel": jnp.ones((4, 2))}},
          "text": {"layer_0": {"kernel": jnp.full((2, 2), 0.5)}}}


def test_param_path_and_first_match_wins():
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(_params())[0]]
  assert "image/block_0/kernel" in paths and "text/layer_0/kernel" in paths
  groups = lr_groups(_params(), [("image/block_.*", 0.1), ("image/.*", 0.5)])
  assert groups["image"]["block_0"]["kernel"] == 0.1
  assert groups["image"]["head"]["kernel"] == 0.5
  assert groups["text"]["layer_0"]["kernel"] == 1.0


def test_learning_rate_multipliers_scale_updates_and_zero_freezes():
  cfg = common.base_config().optimizer
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  plain = make_optimizer(cfg, 100, [])
  grouped = make_optimizer(cfg, 100, optimizer_groups(cfg) + [("text/.*", 0.0), ("image/head/.*", 0.25)])
  s_plain, state = plain.init(params), grouped.init(params)
  for _ in range(3):  # warm-up makes step 0's learning rate 0: look past it
    u_plain, s_plain = plain.update(grads, s_plain, params)
    u_group, state = grouped.update(grads, state, params)
  np.testing.assert_allclose(u_group["image"]["head"]["kernel"], 0.25 * u_plain["image"]["head"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_allclose(u_group["image"]["block_0"]["kernel"], u_plain["image"]["block_0"]["kernel"],
                             rtol=1e-6)
  assert np.abs(u_plain["text"]["layer_0"]["kernel"]).max() > 0
  np.testing.assert_array_equal(u_group["text"]["layer_0"]["kernel"], 0.0)
  # A frozen subtree keeps no Adam moments.
  moments = [l for l in jax.tree.leaves(state) if hasattr(l, "shape") and l.shape == (2, 2)]
  assert moments == []


def test_frozen_gradients_do_not_shrink_the_others_through_clipping():
  cfg = common.base_config().optimizer  # clips at global norm 1.0
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  huge_text = {**grads, "text": jax.tree.map(lambda g: g * 1e6, grads["text"])}
  tx = make_optimizer(cfg, 100, [("text/.*", 0.0)])
  s1 = s2 = tx.init(params)
  for _ in range(3):
    u1, s1 = tx.update(grads, s1, params)
    u2, s2 = tx.update(huge_text, s2, params)
  for a, b in zip(jax.tree.leaves(u1["image"]), jax.tree.leaves(u2["image"])):
    np.testing.assert_array_equal(a, b)


def test_weight_decay_hits_matrices_only_scanned_or_not():
  from avlm_jax.train.state import decays

  tree = {"image": {"blocks": {"block": {"attention_ln": {"scale": jnp.ones((3, 16))},
                                         "mlp": {"fc1": {"kernel": jnp.ones((3, 16, 32)), "bias": jnp.ones((3, 32))}}}},
                    "block_0": {"mlp": {"fc1": {"kernel": jnp.ones((16, 32)), "bias": jnp.ones(32)}}},
                    "cls_token": jnp.ones((1, 1, 16)), "pos_embedding": jnp.ones((1, 9, 16))},
          "text": {"word_embeddings": {"embedding": jnp.ones((50, 16))}, "position_embeddings": jnp.ones((8, 16))}}
  d = decays(tree)
  assert d["image"]["blocks"]["block"]["mlp"]["fc1"]["kernel"] and d["image"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert not d["image"]["blocks"]["block"]["mlp"]["fc1"]["bias"]
  assert not d["image"]["blocks"]["block"]["attention_ln"]["scale"]
  assert not d["image"]["cls_token"] and not d["image"]["pos_embedding"]
  assert d["text"]["word_embeddings"]["embedding"] and not d["text"]["position_embeddings"]


def test_a_rule_that_matches_nothing_is_an_error():
  import pytest

  with pytest.raises(ValueError, match=r"\['image/blok_.\*'\] match no parameter"):
    lr_groups(_params(), [("image/blok_.*", 0.1)])

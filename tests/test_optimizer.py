import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from avlm_jax.train.state import (decays, learning_rate_schedule, lr_groups, make_optimizer, optimizer_groups,
                                  param_path, scale_by_adam_from_first_gradient)
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
    u_plain, s_plain = jax.jit(plain.update)(grads, s_plain, params)
    u_group, state = jax.jit(grouped.update)(grads, state, params)
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
    u1, s1 = jax.jit(tx.update)(grads, s1, params)
    u2, s2 = jax.jit(tx.update)(huge_text, s2, params)
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


# --- Adam statistics that start at a leaf's first gradient (stages switch heads on late) -----------


def _idle_then_active(idle: int, active: int, seed: int = 0):
  """Gradients of an always-trained `body` leaf and of a `head` whose first `idle` gradients are 0."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  body = jax.random.normal(k1, (idle + active, 3, 4))
  head = jnp.concatenate([jnp.zeros((idle, 5)), jax.random.normal(k2, (active, 5))])
  return {"body": body, "head": head}


def _run(tx, grads_seq, params):
  """All updates of `tx` fed the stacked gradients `grads_seq` (leading axis = steps)."""
  def step(state, grads):
    updates, state = tx.update(grads, state, params)
    return state, updates

  return jax.jit(lambda: jax.lax.scan(step, tx.init(params), grads_seq)[1])()


@pytest.mark.parametrize("n", [1, 10, 100])
def test_a_head_switched_on_after_idle_steps_starts_like_a_fresh_adam(n):
  idle = 20_000  # avlm_b16's +global stage starts after 20k steps
  grads = _idle_then_active(idle, n)
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
  ours = _run(scale_by_adam_from_first_gradient(), grads, params)
  np.testing.assert_array_equal(ours["head"][:idle], 0.0)  # no update before its first gradient
  fresh = _run(optax.scale_by_adam(), grads["head"][idle:], params["head"])
  np.testing.assert_allclose(ours["head"][idle:], fresh, rtol=1e-6, atol=1e-7)
  # The body was trained all along and is plain Adam; one shared count would be far off for the head.
  np.testing.assert_array_equal(ours["body"], _run(optax.scale_by_adam(), grads["body"], params["body"]))
  shared = _run(optax.scale_by_adam(), grads, params)["head"][idle:]
  assert np.abs(shared).max() > 2 * np.abs(fresh).max()


def test_make_optimizer_applies_the_fresh_start_under_the_global_schedule():
  """Through the whole chain (clip, decay, schedule, lr group): after 30 idle steps a (non-decayed)
  head moves by -lr(step) × multiplier × the fresh Adam update of its clipped gradients."""
  cfg = common.base_config().optimizer
  cfg.grad_clip_norm = 1e6  # no clipping: the head's gradients reach Adam as they are
  idle, n = 30, 10
  grads = _idle_then_active(idle, n)
  grads = {"image": {"block_0": {"kernel": grads["body"]}, "head": {"bias": grads["head"]}}}
  params = jax.tree.map(lambda g: jnp.ones(g.shape[1:]), grads)
  tx = make_optimizer(cfg, 100, [("image/head/.*", 0.5)])
  ours = _run(tx, grads, params)["image"]["head"]["bias"]
  fresh = _run(optax.scale_by_adam(cfg.b1, cfg.b2), grads["image"]["head"]["bias"][idle:],
               params["image"]["head"]["bias"])
  lr = jax.vmap(learning_rate_schedule(cfg, 100))(jnp.arange(idle, idle + n))
  np.testing.assert_array_equal(ours[:idle], 0.0)
  np.testing.assert_allclose(ours[idle:], -0.5 * lr[:, None] * fresh, rtol=1e-6)


def test_a_leaf_active_from_the_start_is_exactly_optax_adamw():
  cfg = common.base_config().optimizer
  grads = jax.tree.map(lambda p: 0.3 * jax.random.normal(jax.random.key(p.size), (25,) + p.shape), _params())
  reference = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.adamw(learning_rate_schedule(cfg, 100), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decays))
  ours, ref = _run(make_optimizer(cfg, 100, []), grads, _params()), _run(reference, grads, _params())
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)  # the same arithmetic, fused differently


def test_per_leaf_counts_are_replicated_and_moments_sharded_like_their_params():
  from jax.sharding import NamedSharding, PartitionSpec as P

  from avlm_jax import sharding
  from avlm_jax.train.state import _opt_state_shardings

  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
  params = _params()
  tx = make_optimizer(common.base_config().optimizer, 100, [("text/.*", 0.0)])
  split = NamedSharding(mesh, P("fsdp"))
  param_shardings = jax.tree.map(lambda p: split if p.ndim == 2 else sharding.replicated(mesh), params)
  shardings = _opt_state_shardings(jax.eval_shape(tx.init, params), params, param_shardings, mesh)
  flat = {param_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  counts = [k for k in flat if "/count/" in k]
  assert sorted(c.split("/count/")[1] for c in counts) == ["image/block_0/bias", "image/block_0/kernel",
                                                           "image/head/kernel"]  # frozen text: none
  assert all(flat[k] == sharding.replicated(mesh) for k in counts)
  assert flat[next(k for k in flat if k.endswith("/mu/image/block_0/kernel"))] == split
  assert flat[next(k for k in flat if k.endswith("/nu/image/head/kernel"))] == split


# --- learning-rate rules over rows of the position table ------------------------------------------


def test_row_blocks_of_the_position_table():
  tree = {"image": {"anatomy_tokens": jnp.zeros((1, 3, 4)), "pos_embedding": jnp.zeros((1, 1 + 3 + 5, 4)),
                    "cls_token": jnp.zeros((1, 1, 4))}}
  rows = lr_groups(tree, [("image/pos_embedding[anatomy]", 1.0), ("image/(pos_embedding|cls_token)", 0.1)])
  pos = rows["image"]["pos_embedding"]
  assert pos.shape == (1, 9, 1)
  np.testing.assert_allclose(pos[0, :, 0], [0.1, 1, 1, 1] + [0.1] * 5)
  assert rows["image"]["cls_token"] == 0.1 and rows["image"]["anatomy_tokens"] == 1.0
  # Holistic (no anatomy tokens): the block is empty, and the table is uniform again.
  holistic = {"image": {"pos_embedding": jnp.zeros((1, 6, 4))}}
  assert lr_groups(holistic, [("image/pos_embedding[anatomy]", 1.0), ("image/pos_embedding", 0.1)]) == {
      "image": {"pos_embedding": 0.1}}
  with pytest.raises(ValueError, match=r"applies to a position table '.../pos_embedding', not to 'image/cls_token'"):
    lr_groups(tree, [("image/cls_token[cls]", 1.0)])
  with pytest.raises(ValueError, match=r"\['image/pos_embedding\[anatomy\]'\] match no parameter, or only ones "
                                       r"an earlier rule already covers"):
    lr_groups(tree, [("image/pos_embedding", 0.1), ("image/pos_embedding[anatomy]", 1.0)])


def test_avlm_b16_trains_new_anatomy_positions_at_the_full_rate():
  """With a pretrained ViT the encoder learns at 0.1×, but the anatomy rows of the position table are
  new: their first updates match the anatomy tokens' (1×); the CLS and patch rows get 0.1×."""
  import flax.linen as nn

  from avlm_jax import anatomy
  from avlm_jax.models.anatomy_vlm import build_model
  from configs import avlm_b16

  cfg = avlm_b16.get_config("vit=/ckpt/vit_b16.npz")
  cfg.model.image.update(dict(width=16, depth=2, num_heads=2, mlp_dim=32))
  cfg.model.text.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32, max_len=8))
  cfg.model.embed_dim = 8
  model = build_model(cfg.model, 50)
  abstract = nn.unbox(jax.eval_shape(lambda k: model.init(
      k, jnp.zeros((1, 32, 32, 1)), jnp.zeros((1, anatomy.NUM_REGIONS, 8), jnp.int32),
      jnp.zeros((2, 8), jnp.int32))["params"], jax.random.key(0)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  grads = jax.tree.map(jnp.ones_like, params)  # equal gradients: Adam's step is the same everywhere
  tx = make_optimizer(cfg.optimizer, cfg.total_steps, optimizer_groups(cfg.optimizer))
  state, update = tx.init(params), jax.jit(tx.update)
  for _ in range(2):  # warm-up makes the first learning rate 0
    updates, state = update(grads, state, params)
  full = float(updates["image"]["anatomy_tokens"][0, 0, 0])
  assert full < 0
  pos = np.asarray(updates["image"]["pos_embedding"][0])  # (1 + R + 4 patches, D)
  r = anatomy.NUM_REGIONS
  np.testing.assert_allclose(pos[1:1 + r], full, rtol=1e-6)
  np.testing.assert_allclose(pos[0], 0.1 * full, rtol=1e-6)
  np.testing.assert_allclose(pos[1 + r:], 0.1 * full, rtol=1e-6)
  np.testing.assert_allclose(updates["image"]["blocks"]["block"]["mlp"]["fc1"]["bias"], 0.1 * full, rtol=1e-6)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avlm_jax import anatomy
from avlm_jax.models.anatomy_vit import AnatomyViT
from avlm_jax.models.anatomy_vlm import build_model
from avlm_jax.models.text_tower import TextTower
from tests.conftest import tiny_config

R = anatomy.NUM_REGIONS


def test_anatomy_vit_output_shapes():
  vit = AnatomyViT(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, embed_dim=24)
  images = jax.random.normal(jax.random.key(0), (3, 32, 48, 1))
  out, params = vit.init_with_output(jax.random.key(1), images)
  assert out["boxes"].shape == (3, R, 4)
  assert out["region_emb"].shape == (3, R, 24)
  assert out["image_emb"].shape == (3, 24)
  assert out["region_tokens"].shape == (3, R, 32)
  assert out["cls_token"].shape == (3, 32)
  assert out["patch_tokens"].shape == (3, 4, 6, 32)
  assert params["params"]["anatomy_tokens"].value.shape == (1, R, 32)
  assert params["params"]["pos_embedding"].value.shape == (1, 1 + R + 24, 32)
  b = np.asarray(out["boxes"])
  assert np.all((b > 0) & (b < 1))
  np.testing.assert_allclose(np.linalg.norm(out["region_emb"], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["image_emb"], axis=-1), 1.0, atol=1e-5)


def test_holistic_vit_has_no_anatomy_tokens():
  """num_regions=0 (the holistic ablation): CLS + patches only, empty region outputs."""
  vit = AnatomyViT(patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64, embed_dim=24, num_regions=0)
  out, params = vit.init_with_output(jax.random.key(1), jnp.zeros((2, 16, 16, 1)))
  assert out["boxes"].shape == (2, 0, 4) and out["region_emb"].shape == (2, 0, 24)
  assert out["image_emb"].shape == (2, 24) and out["patch_tokens"].shape == (2, 2, 2, 32)
  names = set(params["params"])
  assert not names & {"anatomy_tokens", "box_head", "region_projection"}, names
  assert params["params"]["pos_embedding"].value.shape == (1, 1 + 4, 32)


def test_anatomy_vit_rejects_sizes_not_multiple_of_patch():
  vit = AnatomyViT(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32, embed_dim=8)
  with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
    vit.init(jax.random.key(0), jnp.zeros((1, 30, 32, 1)))


def test_region_embedding_uses_patch_context():
  """Changing only the image changes every region embedding (the [token ; mean patch] input)."""
  vit = AnatomyViT(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32, embed_dim=8)
  params = vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  a = vit.apply(params, jnp.zeros((1, 16, 16, 1)))["region_emb"]
  b = vit.apply(params, jnp.ones((1, 16, 16, 1)))["region_emb"]
  assert np.all(np.abs(np.asarray(a - b)).max(-1) > 1e-4)


def test_text_tower_shapes_and_padding_invariance():
  tower = TextTower(vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64, max_len=16)
  tokens = jnp.array([[[2, 7, 9, 3, 0, 0], [2, 5, 3, 0, 0, 0]]])  # (1, 2, 6)
  out, params = tower.init_with_output(jax.random.key(0), tokens)
  assert out["hidden"].shape == (1, 2, 6, 32)
  assert out["pooled"].shape == (1, 2, 32)
  # Extra padding must not change the pooled representation of a text.
  longer = jnp.pad(tokens, ((0, 0), (0, 0), (0, 4)))
  out2 = tower.apply(params, longer)
  np.testing.assert_allclose(out["pooled"], out2["pooled"], atol=1e-5)


def test_text_tower_rejects_too_long_input():
  tower = TextTower(vocab_size=50, width=16, depth=1, num_heads=2, mlp_dim=32, max_len=4)
  with pytest.raises(ValueError, match="exceeds the text tower's max_len 4"):
    tower.init(jax.random.key(0), jnp.ones((1, 5), jnp.int32))


def _tiny_model_and_params():
  cfg = tiny_config()
  model = build_model(cfg.model, vocab_size=60)
  s, lp = cfg.data.image_size, cfg.data.max_phrase_len
  args = (jnp.zeros((2, s, s, 1)), jnp.ones((2, R, lp), jnp.int32), jnp.ones((5, lp), jnp.int32))
  out, variables = model.init_with_output(jax.random.key(0), *args)
  return cfg, model, variables, out


def test_anatomy_vlm_outputs_and_logit_scale_clamp():
  cfg, model, variables, out = _tiny_model_and_params()
  e = cfg.model.embed_dim
  assert out["phrase_emb"].shape == (2, R, e)
  assert out["prompt_emb"].shape == (5, e)
  np.testing.assert_allclose(out["region_scale"], 1 / 0.07, rtol=1e-5)
  params = nn.unbox(variables["params"])
  # Cached pooled features give exactly the embeddings the token path gives.
  s, lp = cfg.data.image_size, cfg.data.max_phrase_len
  tokens = jnp.ones((2, R, lp), jnp.int32)
  pooled = model.apply({"params": params}, tokens, kind="phrase", method=model.encode_text)["pooled"]
  via_features = model.apply({"params": params}, jnp.zeros((2, s, s, 1)), phrase_features=pooled,
                             prompt_tokens=jnp.ones((5, lp), jnp.int32))
  np.testing.assert_allclose(via_features["phrase_emb"], out["phrase_emb"], atol=1e-6)
  with pytest.raises(ValueError, match="exactly one of token ids or cached text features"):
    model.apply({"params": params}, jnp.zeros((2, s, s, 1)), tokens, phrase_features=pooled,
                prompt_tokens=jnp.ones((5, lp), jnp.int32))
  params["region_log_scale"] = jnp.asarray(10.0)  # exp(10) >> 100
  scales = model.apply({"params": params}, method=model.logit_scales)
  assert float(scales["region_scale"]) == pytest.approx(100.0, rel=1e-5)


def test_every_parameter_carries_logical_axis_names():
  _, _, variables, _ = _tiny_model_and_params()
  leaves = jax.tree_util.tree_leaves_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, (jax.tree_util.keystr(path), leaf.names)


@pytest.mark.parametrize("remat_policy", ["none", "full", "dots"])
def test_scan_and_remat_give_the_same_outputs_and_grads_as_the_loop(remat_policy):
  from avlm_jax.models import layers

  kw = dict(patch_size=8, width=16, depth=3, num_heads=2, mlp_dim=32, embed_dim=8)
  loop = AnatomyViT(**kw)
  scanned = AnatomyViT(**kw, scan=True, remat_policy=remat_policy)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  params = nn.unbox(loop.init(jax.random.key(1), images)["params"])
  stacked = layers.scan_layers(params, "block", 3)
  assert stacked["blocks"]["block"]["mlp"]["fc1"]["kernel"].shape == (3, 16, 32)
  boxed = scanned.init(jax.random.key(1), images)["params"]
  assert boxed["blocks"]["block"]["mlp"]["fc1"]["kernel"].names == ("layers", "embed", "mlp")
  a = loop.apply({"params": params}, images)
  b = scanned.apply({"params": stacked}, images)
  np.testing.assert_allclose(a["region_emb"], b["region_emb"], atol=1e-5)
  loss = lambda m, p: jnp.sum(m.apply({"params": p}, images)["boxes"] ** 2)
  g_loop = jax.grad(lambda p: loss(loop, p))(params)
  g_scan = jax.grad(lambda p: loss(scanned, p))(stacked)
  for x, y in zip(jax.tree.leaves(layers.scan_layers(g_loop, "block", 3)), jax.tree.leaves(g_scan)):
    # float32 sums in another order: tolerance relative to the tensor's largest gradient
    np.testing.assert_allclose(x, y, atol=1e-5 * float(np.abs(y).max()) + 1e-6)
  back = layers.unscan_layers(stacked, "block")
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("channels,dtype", [(1, jnp.float32), (3, jnp.float32), (1, jnp.bfloat16)])
def test_patch_embedding_is_the_strided_convolution(channels, dtype):
  """PatchEmbedding (patchify + matmul) equals nn.Conv(kernel=stride=p, VALID) with the same
  parameters: same init, outputs and gradients, so checkpoints of either read into the other."""
  from avlm_jax.models.layers import PatchEmbedding

  p, width = 8, 16
  images = jax.random.normal(jax.random.key(0), (2, 32, 24, channels))
  ours = PatchEmbedding(width, p, dtype)
  conv = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=dtype)
  params = nn.unbox(ours.init(jax.random.key(1), images))
  conv_params = conv.init(jax.random.key(1), images)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv_params)
  np.testing.assert_array_equal(params["params"]["kernel"], conv_params["params"]["kernel"])  # same init
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  out = ours.apply(params, images)
  assert out.shape == (2, 4, 3, width) and out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(conv.apply(params, images), np.float32), **tol)

  def loss(module, prm, x):
    return jnp.sum(jnp.sin(module.apply(prm, x).astype(jnp.float32)))

  g_ours = jax.grad(loss, argnums=(1, 2))(ours, params, images)
  g_conv = jax.grad(loss, argnums=(1, 2))(conv, params, images)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_conv)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_exact_gelu_matches_jax_and_its_gradient():
  """layers.gelu (the erf form) equals jax.nn.gelu(approximate=False) (the erfc form) in value and
  gradient, tails included; the tanh form is passed through."""
  from avlm_jax.models.layers import gelu

  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2001), jax.random.normal(jax.random.key(0), (1000,)) * 3])
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x), jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, False)))(x),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(gelu(x, approximate=True), jax.nn.gelu(x, approximate=True))
  xb = x.astype(jnp.bfloat16)
  assert gelu(xb).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gelu(xb), np.float32), np.asarray(jax.nn.gelu(xb, False), np.float32),
                             rtol=1e-2, atol=1e-2)


def test_image_tower_gradient_has_no_convolution():
  """The pod-compile fix (BENCHMARKS.md "Compile time at paper scale"): the patch embedding's
  weight gradient is a matmul. With the 1-channel convolution, avlm_b16's v5e-256 compile took
  17.5 minutes, its backend stuck on that gradient; without it, about a minute."""
  vit = AnatomyViT(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, embed_dim=16)
  images = jnp.zeros((2, 32, 32, 1))
  params = vit.init(jax.random.key(0), images)
  loss = lambda p: jnp.sum(vit.apply(p, images)["image_emb"])  # noqa: E731
  hlo = jax.jit(jax.grad(loss)).lower(params).as_text(dialect="hlo")
  assert "convolution(" not in hlo and " dot(" in hlo

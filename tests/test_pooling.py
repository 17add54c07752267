"""The image-level pool (`model.image.pool`) and separate prompt / phrase text projections."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from avlm_jax import anatomy, sharding
from avlm_jax.convert import tree, vit
from avlm_jax.models import pooling
from avlm_jax.models.anatomy_vit import AnatomyViT
from avlm_jax.models.anatomy_vlm import build_model
from tests.conftest import tiny_config

R = anatomy.NUM_REGIONS
SMALL = dict(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=24, embed_dim=8)


def _jiggle(params, seed):
  """Every parameter plus noise, so biases, LayerNorm and the probe all matter."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _np_attention_pool(p, x, num_heads):
  """Attention pooling written out in numpy: probe -> multihead attention -> + MLP(LayerNorm)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, n, d = x.shape
  hd = d // num_heads
  lin = lambda v, name: v @ p[name]["kernel"] + p[name]["bias"]
  q = lin(np.broadcast_to(p["probe"], (b, 1, d)), "query").reshape(b, num_heads, hd)
  k = lin(x, "key").reshape(b, n, num_heads, hd)
  v = lin(x, "value").reshape(b, n, num_heads, hd)
  out = np.zeros((b, num_heads, hd))
  for i in range(b):
    for h in range(num_heads):
      s = k[i, :, h] @ q[i, h] / np.sqrt(hd)
      w = np.exp(s - s.max())
      out[i, h] = (w / w.sum()) @ v[i, :, h]
  y = lin(out.reshape(b, d), "out")
  mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  z = (y - mu) / np.sqrt(var + 1e-6) * p["ln"]["scale"] + p["ln"]["bias"]
  hid = z @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  hid = 0.5 * hid * (1 + erf(hid / np.sqrt(2)))  # exact GELU
  return y + hid @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def test_attention_pool_matches_numpy():
  pool = pooling.AttentionPool(num_heads=2, mlp_dim=24)
  x = jax.random.normal(jax.random.key(0), (3, 7, 16))
  params = _jiggle(nn.unbox(pool.init(jax.random.key(1), x)["params"]), seed=2)
  got = pool.apply({"params": params}, x)
  assert got.shape == (3, 16)
  np.testing.assert_allclose(np.asarray(got), _np_attention_pool(params, x, 2), atol=2e-5, rtol=1e-5)


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("pool", ["cls", "map", "region"])
def test_image_emb_is_the_projection_of_the_chosen_tokens(pool):
  """image_emb = normalise(image_projection(pool(tokens))) with the tokens each pool is defined on:
  CLS alone, every output token, or CLS + the anatomy tokens."""
  model = AnatomyViT(**SMALL, pool=pool)
  images = jax.random.normal(jax.random.key(0), (2, 16, 24, 1))
  params = nn.unbox(model.init(jax.random.key(1), images)["params"])
  assert ("image_pool" in params) == (pool != "cls")
  params = _jiggle(params, seed=3)
  out = model.apply({"params": params}, images)
  assert out["image_emb"].shape == (2, 8) and out["region_emb"].shape == (2, R, 8)
  seq = np.concatenate([np.asarray(out["cls_token"])[:, None], np.asarray(out["region_tokens"]),
                        np.asarray(out["patch_tokens"]).reshape(2, 6, 16)], axis=1)
  if pool == "cls":
    pooled = seq[:, 0]
  else:
    tokens = seq[:, :1 + R] if pool == "region" else seq
    pooled = _np_attention_pool(params["image_pool"]["attention"], tokens, 2)
  proj = params["image_projection"]
  want = _unit(pooled @ np.asarray(proj["kernel"], np.float64) + np.asarray(proj["bias"]))
  np.testing.assert_allclose(np.asarray(out["image_emb"]), want, atol=1e-4)


@pytest.mark.parametrize("pool, patch_matters", [("map", True), ("region", False)])
def test_region_pool_reads_cls_and_anatomy_tokens_only(pool, patch_matters):
  head = pooling.ImagePool(pool, R, num_heads=2, mlp_dim=24)
  x = jax.random.normal(jax.random.key(0), (2, 1 + R + 6, 16))
  params = _jiggle(nn.unbox(head.init(jax.random.key(1), x)["params"]), seed=2)
  run = lambda v: np.asarray(head.apply({"params": params}, v))
  base = run(x)
  patch_moved = run(x.at[:, 1 + R + 2].add(1.0))
  anatomy_moved = run(x.at[:, 1 + 4].add(1.0))
  cls_moved = run(x.at[:, 0].add(1.0))
  for changed in (anatomy_moved, cls_moved):
    assert np.abs(changed - base).max() > 1e-3
  if patch_matters:
    assert np.abs(patch_moved - base).max() > 1e-3
  else:
    np.testing.assert_array_equal(patch_moved, base)


def test_pool_errors_name_the_key():
  holistic = AnatomyViT(**SMALL, num_regions=0, pool="region")
  with pytest.raises(ValueError, match=r"config.model.image.pool='region'.*holistic.*'cls' or 'map'"):
    holistic.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  cfg = tiny_config("holistic", **{"model.image.pool": "region"})
  s = cfg.data.image_size
  with pytest.raises(ValueError, match=r"config.model.image.pool='region'"):
    build_model(cfg.model, 60).init(jax.random.key(0), jnp.zeros((1, s, s, 1)), None,
                                    jnp.ones((3, cfg.data.max_prompt_len), jnp.int32))
  with pytest.raises(ValueError, match=r"config.model.image.pool='mean'; expected one of \('cls', 'map', 'region'\)"):
    AnatomyViT(**SMALL, pool="mean").init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  # map works without anatomy tokens: it pools CLS + patches.
  out, _ = AnatomyViT(**SMALL, num_regions=0, pool="map").init_with_output(
      jax.random.key(0), jnp.zeros((2, 16, 16, 1)))
  assert out["image_emb"].shape == (2, 8)


def _vlm(pool="cls", separate=False):
  cfg = tiny_config(**{"model.image.pool": pool, "model.separate_text_projections": separate})
  model = build_model(cfg.model, vocab_size=60)
  s, lp = cfg.data.image_size, cfg.data.max_phrase_len
  phrases = jax.random.randint(jax.random.key(5), (2, 2 * R, lp), 1, 60)
  prompts = jax.random.randint(jax.random.key(6), (5, lp), 1, 60)
  variables = model.init(jax.random.key(0), jnp.zeros((2, s, s, 1)), phrases, prompts)
  return cfg, model, variables["params"], (jnp.zeros((2, s, s, 1)), phrases, prompts)


def test_new_parameters_are_named_and_every_preset_shards_them_like_their_neighbours():
  _, _, boxed, _ = _vlm("map", separate=True)
  known = {n for n, _ in sharding.rules_for("dp")}
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) - {None} <= known, jax.tree_util.keystr(path)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  for preset in sharding.RULES:
    sh = sharding.logical_to_shardings(boxed, mesh, sharding.rules_for(preset))
    img, pool = sh["image"], sh["image"]["image_pool"]["attention"]
    block = img["block_0"]
    for name in ("query", "key", "value", "out"):
      assert pool[name]["kernel"].spec == block["attention"][name]["kernel"].spec, (preset, name)
    for name in ("fc1", "fc2"):
      assert pool["mlp"][name]["kernel"].spec == block["mlp"][name]["kernel"].spec, (preset, name)
    assert pool["ln"]["scale"].spec == block["mlp_ln"]["scale"].spec
    assert pool["probe"].spec[-1] == img["cls_token"].spec[-1]
    for name in ("prompt_projection", "phrase_projection"):
      assert sh[name]["kernel"].spec == img["image_projection"]["kernel"].spec, (preset, name)
  fsdp = sharding.logical_to_shardings(boxed, mesh, sharding.rules_for("fsdp_tp"))
  assert fsdp["image"]["image_pool"]["attention"]["query"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_converter_leaves_the_pool_fresh(tmp_path):
  model = AnatomyViT(**SMALL, pool="map")
  source = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
  template = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 1)))["params"]
  path = str(tmp_path / "vit.npz")
  vit.export_big_vision_npz(source, path, num_heads=SMALL["num_heads"])
  loaded, report = vit.load_vit_params(path, template, num_heads=SMALL["num_heads"])
  src, tpl = tree.flat(nn.unbox(source)), tree.flat(nn.unbox(template))
  got = tree.flat(nn.unbox(loaded))
  pool_keys = {k for k in tpl if k.startswith("image_pool/")}
  assert pool_keys and pool_keys <= set(report.created)
  for k in pool_keys:
    np.testing.assert_array_equal(got[k], tpl[k], err_msg=k)
  np.testing.assert_array_equal(got["block_0/attention/query/kernel"], src["block_0/attention/query/kernel"])


def test_separate_projections_give_different_prompt_and_phrase_embeddings():
  _, model, boxed, (images, phrases, prompts) = _vlm(separate=True)
  params = nn.unbox(boxed)
  assert "text_projection" not in params
  tokens = prompts[:3]
  enc = lambda kind: model.apply({"params": params}, tokens, kind=kind, method=model.encode_text)
  as_prompt, as_phrase = enc("prompt"), enc("phrase")
  pooled = np.asarray(as_prompt["pooled"], np.float64)
  for kind, got in (("prompt", as_prompt), ("phrase", as_phrase)):
    p = params[f"{kind}_projection"]
    np.testing.assert_allclose(np.asarray(got["embedding"]),
                               _unit(pooled @ np.asarray(p["kernel"]) + np.asarray(p["bias"])), atol=1e-5)
  assert np.abs(np.asarray(as_prompt["embedding"]) - np.asarray(as_phrase["embedding"])).max() > 1e-2
  # Training uses the same projections: phrases through phrase_projection, prompts through
  # prompt_projection, from tokens or from cached pooled features alike.
  out = model.apply({"params": params}, images, phrases, prompts)
  np.testing.assert_allclose(out["prompt_emb"], model.apply({"params": params}, prompts, kind="prompt",
                                                            method=model.encode_text)["embedding"], atol=1e-6)
  phrase_pooled = model.apply({"params": params}, phrases, kind="phrase", method=model.encode_text)
  np.testing.assert_allclose(out["phrase_emb"], phrase_pooled["embedding"], atol=1e-6)
  cached = model.apply({"params": params}, images, phrase_features=phrase_pooled["pooled"], prompt_tokens=prompts)
  np.testing.assert_allclose(cached["phrase_emb"], out["phrase_emb"], atol=1e-6)
  with pytest.raises(ValueError, match="text kind 'label'"):
    model.apply({"params": params}, tokens, kind="label", method=model.encode_text)


def test_shared_projection_is_one_for_both_kinds():
  _, model, boxed, (_, _, prompts) = _vlm(separate=False)
  params = nn.unbox(boxed)
  assert {"prompt_projection", "phrase_projection"}.isdisjoint(params) and "text_projection" in params
  enc = lambda kind: model.apply({"params": params}, prompts, kind=kind, method=model.encode_text)["embedding"]
  np.testing.assert_array_equal(enc("prompt"), enc("phrase"))


def test_model_runner_and_interpreter_pick_the_projection_by_kind(tokenizer):
  from avlm_jax.evaluate import scoring
  from avlm_jax.evaluate.model_runner import ModelRunner, random_params
  from avlm_jax.interpret import Interpreter

  config = tiny_config(**{"model.separate_text_projections": True})
  runner = ModelRunner(config, random_params(config, tokenizer.vocab_size), tokenizer, batch_size=4)
  texts = ["nodule in the left lung", "chest radiograph showing nodule"]
  as_prompt = runner.embed_texts(texts, kind="prompt")
  as_phrase = runner.embed_texts(texts, kind="phrase")  # same texts: the memo must not answer
  assert np.abs(as_prompt - as_phrase).max() > 1e-2
  model, lp = runner.model, config.data.max_prompt_len
  for kind, got in (("prompt", as_prompt), ("phrase", as_phrase)):
    want = model.apply({"params": runner.params}, jnp.asarray(tokenizer(texts, lp)), kind=kind,
                       method=model.encode_text)["embedding"]
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
  with pytest.raises(ValueError, match="text kind 'prompts'"):
    runner.embed_texts(texts, kind="prompts")

  interp = Interpreter(runner, findings=("nodule", "pneumothorax"))
  prompts = scoring.image_prompts(interp.findings, config.prompt_template, config.prompt_style)
  np.testing.assert_array_equal(interp._prompt_emb, runner.embed_texts(prompts, config.data.max_prompt_len,
                                                                       kind="prompt"))
  anat = config.evals.zeroshot_anatomy
  pos, _ = scoring.region_texts(interp.findings, anat.positive_template, anat.negative_template)
  np.testing.assert_array_equal(interp._pos.reshape(len(pos), -1),
                                runner.embed_texts(pos, config.data.max_phrase_len, kind="phrase"))

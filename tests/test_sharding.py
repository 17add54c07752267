import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from avlm_jax import anatomy, sharding
from avlm_jax.models.anatomy_vlm import build_model
from avlm_jax.train import data as train_data
from avlm_jax.train.step import make_loss_fn
from data_pipelines import input_pipeline, schema
from tests.conftest import tiny_config


@pytest.mark.parametrize("sizes, n, shape", [
    ({"data": -1}, 8, (8, 1, 1)),
    ({"data": -1, "fsdp": 2}, 8, (4, 2, 1)),
    ({"data": 2, "fsdp": -1}, 8, (2, 4, 1)),
    ({"data": 1, "fsdp": 1, "tensor": 1}, 1, (1, 1, 1)),
])
def test_mesh_shape_resolution(sizes, n, shape):
  assert sharding.resolve_mesh_shape(sizes, n) == shape


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3}, r"data=3, fsdp=1, tensor=1\) needs 3 devices, but 8 are present"),
    ({"data": -1, "fsdp": 3}, r"fixed sizes multiply to 3, which does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, "more than one -1"),
    ({"data": -1, "model": 2}, r"unknown axes \['model'\]"),
])
def test_mesh_errors_name_the_sizes(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.resolve_mesh_shape(sizes, 8)


def test_tensor_axis_is_refused_until_a_preset_uses_it():
  with pytest.raises(ValueError, match="config.mesh.tensor=2, but preset 'fsdp' maps nothing"):
    sharding.check_mesh_for_preset(sharding.make_mesh({"data": -1, "tensor": 2}), "fsdp")


def test_unknown_preset():
  with pytest.raises(ValueError, match="'tp3d'.*known presets"):
    sharding.rules_for("tp3d")


def test_every_logical_name_is_in_every_table():
  names = {n for table in sharding.RULES.values() for n, _ in table}
  for preset, table in sharding.RULES.items():
    assert {n for n, _ in table} == names, preset


def _abstract_params(cfg, vocab_size=60):
  model = build_model(cfg.model, vocab_size)
  s, lp = cfg.data.image_size, cfg.data.max_phrase_len
  return model, jax.eval_shape(lambda r: model.init(
      r, jnp.zeros((1, s, s, 1)), jnp.zeros((1, anatomy.NUM_REGIONS, lp), jnp.int32),
      jnp.zeros((5, lp), jnp.int32))["params"], jax.random.key(0))


def test_fsdp_shards_embed_dims_and_dp_replicates():
  cfg = tiny_config()
  _, abstract = _abstract_params(cfg)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  fsdp = sharding.logical_to_shardings(abstract, mesh, sharding.rules_for("fsdp"))
  dp = sharding.logical_to_shardings(abstract, mesh, sharding.rules_for("dp"))
  fc1 = fsdp["image"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.spec == P("fsdp", None)
  assert fsdp["text"]["word_embeddings"]["embedding"].spec == P(None, "fsdp")
  assert all(s.spec == P() or all(a is None for a in s.spec) for s in jax.tree.leaves(dp))
  # Scalars are replicated under every preset.
  assert fsdp["region_log_scale"].spec == P()


def test_dimension_not_divisible_by_mesh_axis_stays_replicated():
  cfg = tiny_config(**{"model.image.width": 36, "model.image.num_heads": 2})  # 36 % 8 != 0
  _, abstract = _abstract_params(cfg)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
  shard = sharding.logical_to_shardings(abstract, mesh, sharding.rules_for("fsdp"))
  assert shard["image"]["block_0"]["mlp"]["fc1"]["kernel"].spec == P(None, None)
  assert shard["text"]["layer_0"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", None)  # 32 % 8 == 0


@pytest.mark.parametrize("sizes, preset", [
    ({"data": 8}, "dp"),
    ({"data": 4, "fsdp": 2}, "fsdp"),
    ({"data": 2, "fsdp": 4}, "fsdp"),
])
def test_same_loss_and_grads_as_one_device(synthetic_dir, tokenizer, sizes, preset, one_device_reference):
  ref_loss, ref_metrics, ref_grads, params, batch, prompts, loss_fn, abstract = one_device_reference
  loss, metrics, grads = _loss_and_grads(sizes, preset, jax.devices(), params, batch, prompts, loss_fn, abstract)
  assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
  for k in ref_metrics:
    assert float(metrics[k]) == pytest.approx(float(ref_metrics[k]), abs=1e-5), k
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  flat = jax.tree.leaves(grads)
  for (path, g_ref), g in zip(flat_ref, flat):
    # 1e-5 on the tensor's own scale (at least 1): a gradient such as the token-type embedding's
    # sums ~10^4 float32 terms, in another order on another mesh.
    scale = max(1.0, float(np.abs(np.asarray(g_ref)).max()))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5 * scale, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  if preset == "fsdp":
    assert "fsdp" in str(grads["image"]["block_0"]["mlp"]["fc1"]["kernel"].sharding.spec)


def _loss_and_grads(sizes, preset, devices, params, batch, prompts, loss_fn, abstract):
  mesh = sharding.make_mesh(sizes, devices)
  rules = sharding.rules_for(preset)
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  params = jax.device_put(params, shardings)
  batch = train_data.to_global(batch, mesh)
  repl = sharding.replicated(mesh)
  f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(4,),
              in_shardings=(shardings, sharding.batch_sharding(mesh), repl, repl),
              out_shardings=((repl, repl), shardings))
  with sharding.activate(mesh, rules):
    (loss, metrics), grads = f(params, batch, jax.device_put(prompts, repl), jax.random.key(0), True)
  return loss, metrics, grads


@pytest.fixture(scope="session")
def one_device_reference(synthetic_dir, tokenizer):
  cfg = tiny_config(batch_size=8)
  model, abstract = _abstract_params(cfg, tokenizer.vocab_size)
  ds = input_pipeline.make_dataset(
      schema.shard_paths(synthetic_dir, "train"), seed=0, local_batch_size=8, image_size=cfg.data.image_size,
      tokenizer=tokenizer, max_phrase_len=cfg.data.max_phrase_len, label_names=cfg.labels)
  batch = ds[0]
  assert batch["has_phrase"].any()
  prompts = tokenizer(train_data.label_prompt_texts(cfg), cfg.data.max_phrase_len)
  s = cfg.data.image_size
  params = jax.device_get(nn.unbox(model.init(
      jax.random.key(1), jnp.zeros((1, s, s, 1)), jnp.zeros((1, anatomy.NUM_REGIONS, cfg.data.max_phrase_len),
                                                          jnp.int32), jnp.asarray(prompts))["params"]))
  loss_fn = make_loss_fn(model, cfg.loss)
  loss, metrics, grads = _loss_and_grads({"data": 1}, "dp", jax.devices()[:1], params, batch, prompts,
                                         loss_fn, abstract)
  return loss, metrics, grads, params, batch, prompts, loss_fn, abstract

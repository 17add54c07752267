"""Tensor-parallel, FSDP+TP and multi-slice presets: placement, checks, warnings, and the same
loss and gradients as one device (with the global and the ring alignment losses)."""

import copy

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from avlm_jax import sharding
from avlm_jax.models.anatomy_vlm import build_model
from avlm_jax.train import data as train_data
from avlm_jax.train.step import make_loss_fn
from tests.conftest import tiny_config
from tests.test_sharding import _abstract_params, one_device_reference  # noqa: F401 (fixture)


def test_tp_splits_attention_and_mlp_megatron_style():
  _, abstract = _abstract_params(tiny_config())
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tp = sharding.logical_to_shardings(abstract, mesh, sharding.rules_for("tp"))
  both = sharding.logical_to_shardings(abstract, mesh, sharding.rules_for("fsdp_tp"))
  for tower, block in (("image", "block_0"), ("text", "layer_0")):
    attn, mlp = tp[tower][block]["attention"], tp[tower][block]["mlp"]
    assert attn["query"]["kernel"].spec == P(None, "tensor")  # columns: whole heads per device
    assert attn["query"]["bias"].spec == P("tensor")
    assert attn["out"]["kernel"].spec == P("tensor", None)  # rows
    assert mlp["fc1"]["kernel"].spec == P(None, "tensor")
    assert mlp["fc2"]["kernel"].spec == P("tensor", None)
    assert both[tower][block]["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
    assert both[tower][block]["attention"]["out"]["kernel"].spec == P("tensor", "fsdp")


def test_tensor_axis_allowed_only_for_tensor_presets():
  mesh = sharding.make_mesh({"data": -1, "tensor": 2})
  for preset in ("tp", "fsdp_tp"):
    sharding.check_mesh_for_preset(mesh, preset)
  with pytest.raises(ValueError, match="preset 'dp' maps nothing to the 'tensor' axis"):
    sharding.check_mesh_for_preset(mesh, "dp")


def test_hybrid_mesh_keeps_each_slice_contiguous():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2}, dcn={"data": 2})
  sharding.check_mesh_for_preset(mesh, "hybrid", {"data": 2})
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  # Slice 0 (devices 0-3) holds data rows 0-1 with every fsdp index: only `data` crosses slices.
  assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}


@pytest.mark.parametrize("preset, dcn, message", [
    ("hybrid", {"data": 1}, "set mesh_dcn.data to the number of slices"),
    ("hybrid", {"data": 2, "fsdp": 2}, "puts only the data axis across slices"),
    ("fsdp", {"data": 2}, "only preset 'hybrid' lays out"),
])
def test_hybrid_checks(preset, dcn, message):
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  with pytest.raises(ValueError, match=message):
    sharding.check_mesh_for_preset(mesh, preset, dcn)


def test_dcn_must_divide_the_axis():
  with pytest.raises(ValueError, match=r"mesh_dcn \(data=3, fsdp=1, tensor=1\) must divide"):
    sharding.make_mesh({"data": 8}, dcn={"data": 3})


def test_warnings_name_undivided_dimension_and_replicated_parameters():
  cfg = tiny_config(**{"model.image.width": 36, "model.image.num_heads": 2})  # 36 % 8 != 0
  _, abstract = _abstract_params(cfg)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
  lines = sharding.preset_warnings(abstract, mesh, sharding.rules_for("fsdp"), "fsdp", min_mib=0.005)
  text = "\n".join(lines)
  assert ("image/block_0/mlp/fc1/kernel: dimension 0 (size 36) is not divisible by mesh axis fsdp "
          "(size 8)") in text
  # 36·64 float32 = 9 KiB >= 0.005 MiB, left whole on 8 devices.
  assert "image/block_0/mlp/fc1/kernel (36, 64) (0.0 MiB) is replicated on all 8 devices under preset 'fsdp'" in text
  assert "text/layer_0/mlp/fc1/kernel" not in text  # 32 % 8 == 0: sharded, not named
  # dp replicates by design: nothing to say.
  assert sharding.preset_warnings(abstract, mesh, sharding.rules_for("dp"), "dp", min_mib=0.0) == []


@pytest.mark.parametrize("sizes, preset, dcn, implementation", [
    ({"data": 4, "tensor": 2}, "tp", None, "global"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp", None, "ring"),
    ({"data": 4, "fsdp": 2}, "hybrid", {"data": 2}, "ring"),
])
def test_same_loss_and_grads_as_one_device(tokenizer, sizes, preset, dcn, implementation, one_device_reference):
  ref_loss, ref_metrics, ref_grads, params, batch, prompts, _, abstract = one_device_reference
  cfg = tiny_config(batch_size=8)
  loss_cfg = copy.deepcopy(cfg.loss)
  loss_cfg.implementation = implementation
  loss_cfg.ring_chunk = 64  # 4 regions-worth tiles: the tiling is exercised too
  loss_fn = make_loss_fn(build_model(cfg.model, tokenizer.vocab_size), loss_cfg)
  mesh = sharding.make_mesh(sizes, dcn=dcn)
  sharding.check_mesh_for_preset(mesh, preset, dcn)
  rules = sharding.rules_for(preset)
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  repl = sharding.replicated(mesh)
  f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(4,),
              in_shardings=(shardings, sharding.batch_sharding(mesh), repl, repl),
              out_shardings=((repl, repl), shardings))
  with sharding.activate(mesh, rules):
    (loss, metrics), grads = f(jax.device_put(params, shardings), train_data.to_global(batch, mesh),
                               jax.device_put(prompts, repl), jax.random.key(0), True)
  assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
  for k in ref_metrics:
    assert float(metrics[k]) == pytest.approx(float(ref_metrics[k]), abs=1e-5), k
  for (path, g_ref), g in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
    scale = max(1.0, float(np.abs(np.asarray(g_ref)).max()))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5 * scale, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  if "tensor" in sizes:
    assert "tensor" in str(grads["image"]["block_0"]["mlp"]["fc1"]["kernel"].sharding.spec)

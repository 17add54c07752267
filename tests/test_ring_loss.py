"""The shard_map ring losses equal the global reference, values and gradients, on 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avlm_jax import sharding
from avlm_jax.losses import contrastive, multiscale, ring


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _region_inputs(n_per_device=6, devices=8, emb=8, seed=0):
  """Random embeddings with few distinct texts (so positives repeat across devices, including a
  false text equal to another slot's true text), slots without a text, and one device with no
  true text. Returns (region, true texts, their ids, has true, false texts, their ids, has false)."""
  n = n_per_device * devices
  k = jax.random.split(jax.random.key(seed), 7)
  region = _unit(jax.random.normal(k[0], (n, emb)))
  phrase = _unit(jax.random.normal(k[1], (n, emb)))
  ids = jax.random.randint(k[2], (n, 2), 0, 4)
  has_phrase = jax.random.bernoulli(k[3], 0.75, (n,)).at[n_per_device:2 * n_per_device].set(False)
  false = _unit(jax.random.normal(k[4], (n, emb)))
  false_ids = jax.random.randint(k[5], (n, 2), 3, 7)  # overlaps the true ids in value 3
  has_false = jax.random.bernoulli(k[6], 0.6, (n,))
  # A text on device 0 that also appears on device 7: the two must be positives of each other.
  ids = ids.at[n - 1].set(ids[0])
  has_phrase = has_phrase.at[0].set(True).at[n - 1].set(True)
  # A false text on device 3 equal to device 0's true text: a positive of slot 0's row.
  false_ids = false_ids.at[3 * n_per_device].set(ids[0])
  has_false = has_false.at[3 * n_per_device].set(True)
  return region, phrase, ids, has_phrase, false, false_ids, has_false


def _check_inputs_are_hard(ids, has_phrase, false_ids, has_false, n_per_device):
  owner = np.arange(len(ids)) // n_per_device
  same = contrastive.same_phrase(ids, ids) & has_phrase[None, :] & has_phrase[:, None]
  cross = np.asarray(same) & (owner[:, None] != owner[None, :])
  assert cross.any(), "no text shared across devices"
  assert (~np.asarray(has_phrase)).any()
  true_in_false = contrastive.same_phrase(ids, false_ids) & has_phrase[:, None] & has_false[None, :]
  assert np.asarray(true_in_false).any(), "no false text equals a true one"


def _value_and_grads(fn, region, phrase, ids, has_phrase, scale, false=None, false_ids=None, has_false=None,
                     **kw):
  def loss(r, t, s, tf):
    out = fn(r, t, ids, has_phrase, s, tf, false_ids, has_false, **kw)
    return out["loss"], out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(region, phrase, scale, false)


@pytest.mark.parametrize("sizes, chunk, with_false", [
    ({"data": 8}, 1024, True),   # one tile per block
    ({"data": 2, "fsdp": 4}, 4, True),  # both batch axes in the ring; blocks of 12 in tiles of 4
    ({"data": 4, "fsdp": 1, "tensor": 2}, 5, False),  # replicated over tensor; no false texts
])
def test_region_phrase_ring_equals_global(sizes, chunk, with_false):
  devices = 8 // sizes.get("tensor", 1)
  region, phrase, ids, has_phrase, false, false_ids, has_false = _region_inputs(devices=devices)
  _check_inputs_are_hard(ids, has_phrase, false_ids, has_false, 6)
  extra = (false, false_ids, has_false) if with_false else ()
  scale = jnp.float32(7.5)
  with jax.set_mesh(sharding.make_mesh(sizes)):
    (ref_loss, ref), ref_grads = _value_and_grads(contrastive.region_phrase_loss, region, phrase, ids,
                                                  has_phrase, scale, *extra)
    (loss, out), grads = _value_and_grads(ring.region_phrase_loss, region, phrase, ids, has_phrase,
                                          scale, *extra, chunk=chunk)
  assert float(ref["num_anchors"]) > 0 and float(ref_loss) > 0
  for k in ref:
    assert float(out[k]) == pytest.approx(float(ref[k]), abs=1e-5), k
  names = ("region", "phrase", "scale", "false") if with_false else ("region", "phrase", "scale")
  for name, g, g_ref in zip(names, grads, ref_grads):
    assert np.abs(np.asarray(g_ref)).max() > 0, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, rtol=0, err_msg=name)


def test_ring_sees_texts_on_other_devices():
  """Moving one device's texts away changes the loss: the ring really reaches every block."""
  region, phrase, ids, has_phrase, false, false_ids, has_false = _region_inputs()
  loss = jax.jit(lambda valid, valid_f: ring.region_phrase_loss(
      region, phrase, ids, valid, 7.5, false, false_ids, valid_f)["loss"])
  with jax.set_mesh(sharding.make_mesh({"data": 8})):
    full = loss(has_phrase, has_false)
    cut = loss(has_phrase.at[42:].set(False), has_false)
    cut_false = loss(has_phrase, has_false.at[42:].set(False))
  assert abs(float(full) - float(cut)) > 1e-3 and abs(float(full) - float(cut_false)) > 1e-3


@pytest.mark.parametrize("normalization", ["mean", "siglip"])
def test_image_label_sharded_equals_global(normalization):
  k = jax.random.split(jax.random.key(3), 3)
  image, prompts = _unit(jax.random.normal(k[0], (16, 8))), _unit(jax.random.normal(k[1], (5, 8)))
  labels = jax.random.bernoulli(k[2], 0.3, (16, 5)).astype(jnp.float32)

  def run(fn, normalization):
    def loss(a, b, s, c):
      out = fn(a, b, labels, s, c, normalization)
      return out["loss"], out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        image, prompts, jnp.float32(10.0), jnp.float32(-2.0))

  with jax.set_mesh(sharding.make_mesh({"data": 4, "fsdp": 2})):
    (_, ref), ref_grads = run(contrastive.image_label_loss, normalization)
    (_, out), grads = run(ring.image_label_loss, normalization)
    (_, mean), mean_grads = run(ring.image_label_loss, "mean")
  for k_ in ref:
    assert float(out[k_]) == pytest.approx(float(ref[k_]), abs=1e-5), k_
  for g, g_ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, rtol=0)
  # 'siglip' sums over the 5 classes and averages over images: 5 × the mean, gradients too.
  factor = 5.0 if normalization == "siglip" else 1.0
  assert float(out["loss"]) == pytest.approx(factor * float(mean["loss"]), rel=1e-6)
  for g, g_mean in zip(grads, mean_grads):
    np.testing.assert_allclose(np.asarray(g), factor * np.asarray(g_mean), rtol=1e-5, atol=1e-7)
  assert float(out["pos_logit"]) == pytest.approx(float(mean["pos_logit"]))  # logit statistics unchanged


def test_unknown_global_normalization_names_the_key():
  image, prompts, labels = jnp.ones((8, 4)) / 2, jnp.ones((3, 4)) / 2, jnp.zeros((8, 3))
  for fn in (contrastive.image_label_loss, ring.image_label_loss):
    with pytest.raises(ValueError, match=r"config.loss.global_normalization='sum'; expected one of \('mean', 'siglip'\)"):
      with jax.set_mesh(sharding.make_mesh({"data": 8})):
        fn(image, prompts, labels, 10.0, -2.0, "sum")


def test_global_normalization_reaches_the_train_loss():
  """config.loss.global_normalization travels through make_loss_fn into the image-level term."""
  from avlm_jax.models.anatomy_vlm import build_model
  from avlm_jax.train.step import make_loss_fn
  from tests.conftest import tiny_config

  cfg = tiny_config("holistic")
  model = build_model(cfg.model, vocab_size=60)
  s, lp, c = cfg.data.image_size, cfg.data.max_prompt_len, len(cfg.labels)
  images = jax.random.randint(jax.random.key(0), (4, s, s, 1), 0, 255).astype(jnp.uint8)
  prompts = jax.random.randint(jax.random.key(1), (c, lp), 1, 60)
  params = model.init(jax.random.key(2), images.astype(jnp.float32), None, prompts)["params"]
  batch = {"image": images, "labels": jax.random.bernoulli(jax.random.key(3), 0.4, (4, c)).astype(jnp.float32)}
  losses = {}
  for normalization in ("mean", "siglip"):
    loss_cfg = cfg.loss.copy_and_resolve_references()
    loss_cfg.global_normalization = normalization
    _, metrics = make_loss_fn(model, loss_cfg)(params, batch, prompts, jax.random.key(4), False)
    losses[normalization] = float(metrics["loss_global"])
  assert losses["siglip"] == pytest.approx(c * losses["mean"], rel=1e-5)


def test_ring_needs_a_mesh():
  region, phrase, ids, has_phrase, *_ = _region_inputs(devices=1)
  with pytest.raises(ValueError, match="need a mesh: call them under jax.set_mesh"):
    ring.region_phrase_loss(region, phrase, ids, has_phrase, 7.5)


def test_unknown_loss_implementation():
  with pytest.raises(ValueError, match="config.loss.implementation='rings'"):
    multiscale.anatomy_vlm_loss({}, {}, {}, implementation="rings")

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
  """Random embeddings with few distinct texts (so positives repeat across devices), slots
  without a text, sampled negatives (candidates but not anchors), and one device with no text."""
  n = n_per_device * devices
  k = jax.random.split(jax.random.key(seed), 5)
  region = _unit(jax.random.normal(k[0], (n, emb)))
  phrase = _unit(jax.random.normal(k[1], (n, emb)))
  ids = jax.random.randint(k[2], (n, 2), 0, 4)
  has_phrase = jax.random.bernoulli(k[3], 0.75, (n,)).at[n_per_device:2 * n_per_device].set(False)
  is_anchor = jax.random.bernoulli(k[4], 0.8, (n,))
  # A text on device 0 that also appears on device 7: the two must be positives of each other.
  ids = ids.at[n - 1].set(ids[0])
  has_phrase = has_phrase.at[0].set(True).at[n - 1].set(True)
  is_anchor = is_anchor.at[0].set(True)
  return region, phrase, ids, has_phrase, is_anchor


def _check_inputs_are_hard(ids, has_phrase, is_anchor, n_per_device):
  owner = np.arange(len(ids)) // n_per_device
  same = contrastive.same_phrase(ids, ids) & has_phrase[None, :] & has_phrase[:, None]
  cross = np.asarray(same) & (owner[:, None] != owner[None, :])
  assert cross.any(), "no text shared across devices"
  assert (~np.asarray(has_phrase)).any() and (np.asarray(has_phrase) & ~np.asarray(is_anchor)).any()


def _value_and_grads(fn, region, phrase, ids, has_phrase, scale, is_anchor, **kw):
  def loss(r, t, s):
    out = fn(r, t, ids, has_phrase, s, is_anchor, **kw)
    return out["loss"], out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(region, phrase, scale)


@pytest.mark.parametrize("sizes, chunk, anchors", [
    ({"data": 8}, 1024, True),   # one tile per block
    ({"data": 2, "fsdp": 4}, 4, True),  # both batch axes in the ring; blocks of 6 in tiles of 3
    ({"data": 4, "fsdp": 1, "tensor": 2}, 2, False),  # replicated over tensor; is_anchor=None
])
def test_region_phrase_ring_equals_global(sizes, chunk, anchors):
  devices = 8 // sizes.get("tensor", 1)
  region, phrase, ids, has_phrase, is_anchor = _region_inputs(devices=devices)
  _check_inputs_are_hard(ids, has_phrase, is_anchor, 6)
  is_anchor = is_anchor if anchors else None
  scale = jnp.float32(7.5)
  with jax.set_mesh(sharding.make_mesh(sizes)):
    (ref_loss, ref), ref_grads = _value_and_grads(contrastive.region_phrase_loss, region, phrase, ids,
                                                  has_phrase, scale, is_anchor)
    (loss, out), grads = _value_and_grads(ring.region_phrase_loss, region, phrase, ids, has_phrase,
                                          scale, is_anchor, chunk=chunk)
  assert float(ref["num_anchors"]) > 0 and float(ref_loss) > 0
  for k in ref:
    assert float(out[k]) == pytest.approx(float(ref[k]), abs=1e-5), k
  for name, g, g_ref in zip(("region", "phrase", "scale"), grads, ref_grads):
    assert np.abs(np.asarray(g_ref)).max() > 0, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, rtol=0, err_msg=name)


def test_ring_sees_texts_on_other_devices():
  """Moving one device's texts away changes the loss: the ring really reaches every block."""
  region, phrase, ids, has_phrase, is_anchor = _region_inputs()
  loss = jax.jit(lambda valid: ring.region_phrase_loss(region, phrase, ids, valid, 7.5, is_anchor)["loss"])
  with jax.set_mesh(sharding.make_mesh({"data": 8})):
    full, cut = loss(has_phrase), loss(has_phrase.at[42:].set(False))
  assert abs(float(full) - float(cut)) > 1e-3


def test_image_label_sharded_equals_global():
  k = jax.random.split(jax.random.key(3), 3)
  image, prompts = _unit(jax.random.normal(k[0], (16, 8))), _unit(jax.random.normal(k[1], (5, 8)))
  labels = jax.random.bernoulli(k[2], 0.3, (16, 5)).astype(jnp.float32)

  def run(fn):
    def loss(a, b, s, c):
      out = fn(a, b, labels, s, c)
      return out["loss"], out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        image, prompts, jnp.float32(10.0), jnp.float32(-2.0))

  with jax.set_mesh(sharding.make_mesh({"data": 4, "fsdp": 2})):
    (_, ref), ref_grads = run(contrastive.image_label_loss)
    (_, out), grads = run(ring.image_label_loss)
  for k_ in ref:
    assert float(out[k_]) == pytest.approx(float(ref[k_]), abs=1e-5), k_
  for g, g_ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, rtol=0)


def test_ring_needs_a_mesh():
  region, phrase, ids, has_phrase, is_anchor = _region_inputs(devices=1)
  with pytest.raises(ValueError, match="need a mesh: call them under jax.set_mesh"):
    ring.region_phrase_loss(region, phrase, ids, has_phrase, 7.5, is_anchor)


def test_unknown_loss_implementation():
  with pytest.raises(ValueError, match="config.loss.implementation='rings'"):
    multiscale.anatomy_vlm_loss({}, {}, {}, implementation="rings")

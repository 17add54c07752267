import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avlm_jax.losses import contrastive


def phrase_hash(text: str) -> tuple[int, int]:
  """Test stand-in for the pipeline's text identity (a hash of token ids): equal for texts an
  uncased tokenizer sees alike ('a' and 'A'), (0, 0) for no text. The loss only compares ids."""
  norm = text.strip().lower().rstrip(".")
  return (0, 0) if not norm else (zlib.crc32(norm.encode()) % (2**31 - 1) | 1, len(norm))


def numpy_region_phrase_loss(r, t, phrases, scale, anchors=None):
  """Direct per-anchor computation with strings: no masks, no vectorisation."""
  valid = [j for j, p in enumerate(phrases) if p]
  losses = []
  for i in valid if anchors is None else [i for i in valid if anchors[i]]:
    logits = np.array([scale * float(r[i] @ t[j]) for j in valid], np.float64)
    log_p = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    pos = [k for k, j in enumerate(valid) if phrases[j].lower() == phrases[i].lower()]
    losses.append(-np.mean(log_p[pos]))
  return float(np.mean(losses))


def _unit(rng, n, e):
  x = rng.normal(size=(n, e)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_region_phrase_loss_matches_numpy_with_duplicates_and_missing(seed):
  rng = np.random.default_rng(seed)
  phrases = ["opacity in the right lung", "", "heart size is normal", "Heart size is normal",
             "opacity in the right lung", "", "no pleural effusion", "heart size is normal",
             "nodule", ""]
  n, e = len(phrases), 8
  r, t = _unit(rng, n, e), _unit(rng, n, e)
  ids = np.array([phrase_hash(p) for p in phrases], np.int32)
  has = np.array([bool(p) for p in phrases])
  out = contrastive.region_phrase_loss(jnp.asarray(r), jnp.asarray(t), jnp.asarray(ids), jnp.asarray(has),
                                       jnp.float32(7.0))
  assert float(out["loss"]) == pytest.approx(numpy_region_phrase_loss(r, t, phrases, 7.0), abs=1e-5)
  assert float(out["num_anchors"]) == 7


def test_negative_texts_are_candidates_but_not_anchors():
  """Sampled negatives (negated or hard-negative texts) enter every softmax but anchor nothing."""
  rng = np.random.default_rng(7)
  phrases = ["left pleural effusion", "no left pleural effusion", "", "cardiomegaly", "left pleural effusion",
             "no pneumothorax", "cardiomegaly", ""]
  anchors = np.array([1, 0, 0, 1, 1, 0, 0, 0], bool)  # slot 6 repeats an anchor's text as a negative
  n, e = len(phrases), 6
  r, t = _unit(rng, n, e), _unit(rng, n, e)
  ids = np.array([phrase_hash(p) for p in phrases], np.int32)
  has = np.array([bool(p) for p in phrases])
  out = contrastive.region_phrase_loss(jnp.asarray(r), jnp.asarray(t), jnp.asarray(ids), jnp.asarray(has),
                                       jnp.float32(5.0), jnp.asarray(anchors))
  assert float(out["num_anchors"]) == 3 and float(out["num_candidates"]) == 6
  assert float(out["loss"]) == pytest.approx(numpy_region_phrase_loss(r, t, phrases, 5.0, anchors), abs=1e-5)
  everyone = contrastive.region_phrase_loss(jnp.asarray(r), jnp.asarray(t), jnp.asarray(ids), jnp.asarray(has),
                                            jnp.float32(5.0))
  assert float(everyone["num_anchors"]) == 6 and float(everyone["loss"]) != pytest.approx(float(out["loss"]))


def test_duplicates_are_positives_not_negatives():
  """Slots 0 and 1 carry one phrase (so one text embedding), slot 2 another.

  Labelled as positives of each other, the two copies get identical gradients: nothing pushes a
  text away from itself. Labelled as distinct (a false negative), their gradients differ.
  """
  e = np.eye(3, dtype=np.float32)
  r = jnp.asarray(e[[0, 1, 2]])
  t = jnp.asarray(e[[0, 0, 2]])
  has = jnp.ones(3, bool)
  same = jnp.asarray(np.array([phrase_hash("a"), phrase_hash("A."), phrase_hash("b")], np.int32))
  distinct = jnp.asarray(np.array([phrase_hash("a"), phrase_hash("a2"), phrase_hash("b")], np.int32))
  f = lambda t, ids: contrastive.region_phrase_loss(r, t, ids, has, jnp.float32(10.0))["loss"]
  # Anchor 0: logits (10, 10, 0); anchor 1: (0, 0, 0); anchor 2: (0, 0, 10).
  expected = (np.log(2 + np.exp(-10.0)) + np.log(3.0) + np.log(1 + 2 * np.exp(-10.0))) / 3
  assert float(f(t, same)) == pytest.approx(expected, abs=1e-5)
  assert float(f(t, same)) == pytest.approx(numpy_region_phrase_loss(np.asarray(r), np.asarray(t),
                                                                     ["a", "a", "b"], 10.0), abs=1e-5)
  g_same = np.asarray(jax.grad(f)(t, same))
  g_distinct = np.asarray(jax.grad(f)(t, distinct))
  np.testing.assert_allclose(g_same[0], g_same[1], atol=1e-6)
  assert np.abs(g_distinct[0] - g_distinct[1]).max() > 0.5


def test_no_phrase_anywhere_gives_zero_loss_and_finite_grads():
  rng = np.random.default_rng(0)
  r, t = jnp.asarray(_unit(rng, 4, 6)), jnp.asarray(_unit(rng, 4, 6))
  ids, has = jnp.zeros((4, 2), jnp.int32), jnp.zeros(4, bool)
  f = lambda r, t: contrastive.region_phrase_loss(r, t, ids, has, jnp.float32(5.0))["loss"]
  assert float(f(r, t)) == 0.0
  gr, gt = jax.grad(f, argnums=(0, 1))(r, t)
  assert np.all(np.isfinite(gr)) and np.all(np.isfinite(gt))


def test_image_label_loss_matches_numpy():
  rng = np.random.default_rng(3)
  img, prompts = _unit(rng, 4, 8), _unit(rng, 5, 8)
  labels = (rng.random((4, 5)) < 0.4).astype(np.float32)
  scale, bias = 6.0, -1.5
  z = scale * img @ prompts.T + bias
  p = 1 / (1 + np.exp(-z.astype(np.float64)))
  expected = np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
  out = contrastive.image_label_loss(jnp.asarray(img), jnp.asarray(prompts), jnp.asarray(labels),
                                     jnp.float32(scale), jnp.float32(bias))
  assert float(out["loss"]) == pytest.approx(expected, abs=1e-5)
  assert float(out["pos_logit"]) == pytest.approx(z[labels == 1].mean(), abs=1e-4)

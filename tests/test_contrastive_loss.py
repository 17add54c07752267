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


def numpy_region_phrase_loss(r, t, phrases, scale, tf=None, false_phrases=None):
  """Direct per-anchor computation with strings: no masks, no vectorisation. Rows are the slots
  with a true phrase; candidates are every true phrase, then every false one."""
  cand = [(t[j], p) for j, p in enumerate(phrases) if p]
  if tf is not None:
    cand += [(tf[j], p) for j, p in enumerate(false_phrases) if p]
  losses = []
  for i in [i for i, p in enumerate(phrases) if p]:
    logits = np.array([scale * float(r[i] @ emb) for emb, _ in cand], np.float64)
    log_p = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    pos = [k for k, (_, p) in enumerate(cand) if p.lower() == phrases[i].lower()]
    losses.append(-np.mean(log_p[pos]))
  return float(np.mean(losses))


def _unit(rng, n, e):
  x = rng.normal(size=(n, e)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ids(phrases):
  return (jnp.asarray(np.array([phrase_hash(p) for p in phrases], np.int32)),
          jnp.asarray(np.array([bool(p) for p in phrases])))


@pytest.mark.parametrize("seed", [0, 1])
def test_region_phrase_loss_matches_numpy_with_duplicates_and_missing(seed):
  rng = np.random.default_rng(seed)
  phrases = ["opacity in the right lung", "", "heart size is normal", "Heart size is normal",
             "opacity in the right lung", "", "no pleural effusion", "heart size is normal",
             "nodule", ""]
  n, e = len(phrases), 8
  r, t = _unit(rng, n, e), _unit(rng, n, e)
  ids, has = _ids(phrases)
  out = contrastive.region_phrase_loss(jnp.asarray(r), jnp.asarray(t), ids, has, jnp.float32(7.0))
  assert float(out["loss"]) == pytest.approx(numpy_region_phrase_loss(r, t, phrases, 7.0), abs=1e-5)
  assert float(out["num_anchors"]) == 7


TRUE = ["left pleural effusion", "no pneumothorax at the left apical zone", "", "cardiomegaly",
        "left pleural effusion", "the right costophrenic angle is sharp", "normal cardiac silhouette", ""]
# Each slot's false statement; slot 6's is slot 3's true text (cardiomegaly on another image), and
# slot 1's appears twice.
FALSE = ["no left pleural effusion", "left apical pneumothorax", "", "normal cardiac silhouette",
         "no left pleural effusion", "right pleural effusion", "cardiomegaly", "left apical pneumothorax"]


def test_false_texts_are_candidates_matching_numpy():
  rng = np.random.default_rng(7)
  n, e = len(TRUE), 6
  r, t, tf = _unit(rng, n, e), _unit(rng, n, e), _unit(rng, n, e)
  ids, has = _ids(TRUE)
  fids, fhas = _ids(FALSE)
  out = contrastive.region_phrase_loss(jnp.asarray(r), jnp.asarray(t), ids, has, jnp.float32(5.0),
                                       jnp.asarray(tf), fids, fhas)
  assert float(out["num_anchors"]) == 6 and float(out["num_candidates"]) == 13
  assert float(out["loss"]) == pytest.approx(numpy_region_phrase_loss(r, t, TRUE, 5.0, tf, FALSE), abs=1e-5)
  without = contrastive.region_phrase_loss(jnp.asarray(r), jnp.asarray(t), ids, has, jnp.float32(5.0))
  assert float(without["loss"]) == pytest.approx(numpy_region_phrase_loss(r, t, TRUE, 5.0), abs=1e-5)
  assert float(without["loss"]) < float(out["loss"])  # more candidates, a harder softmax


def test_every_slot_with_a_true_text_trains_its_region():
  """The defect this objective fixes: a normal region (a true statement about itself) and a
  region whose finding text was negated must both get a region-embedding gradient, pulled towards
  their true text and away from their own false one."""
  rng = np.random.default_rng(3)
  n, e = len(TRUE), 6
  r, t, tf = _unit(rng, n, e), _unit(rng, n, e), _unit(rng, n, e)
  ids, has = _ids(TRUE)
  fids, fhas = _ids(FALSE)
  f = lambda r: contrastive.region_phrase_loss(r, jnp.asarray(t), ids, has, jnp.float32(5.0),
                                               jnp.asarray(tf), fids, fhas)["loss"]
  g = np.asarray(jax.grad(f)(jnp.asarray(r)))
  row_norm = np.linalg.norm(g, axis=-1)
  assert (row_norm[np.asarray(has)] > 1e-4).all()
  np.testing.assert_array_equal(row_norm[~np.asarray(has)], 0.0)  # no true text: no row
  # A small step against the gradient raises each slot's true-vs-own-false margin.
  r2 = r - 0.05 * g
  for i in np.flatnonzero(np.asarray(has) & np.asarray(fhas)):
    if FALSE[i].lower() == TRUE[i].lower():
      continue
    before, after = r[i] @ (t[i] - tf[i]), r2[i] @ (t[i] - tf[i])
    assert after > before, (i, TRUE[i], FALSE[i])


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


def test_text_classes_equal_exactly_where_identities_are():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 3, size=(200, 2)).astype(np.int32)  # many repeats, some sharing one half
  cls = np.asarray(contrastive.text_classes(jnp.asarray(ids)))
  same_ids = np.all(ids[:, None] == ids[None], axis=-1)
  np.testing.assert_array_equal(cls[:, None] == cls[None], same_ids)
  assert cls.min() == 0 and cls.max() == len(np.unique(ids, axis=0)) - 1


def _masked_region_phrase_loss(r, t, ids, has, scale, tf, ids_f, has_f):
  """The definition written with an explicit (N, M) positive mask: the reference for values,
  top-1 and gradients of the mask-free implementation."""
  n = r.shape[0]
  cand, cand_ids = jnp.concatenate([t, tf]), jnp.concatenate([ids, ids_f])
  valid = jnp.concatenate([has, has_f])
  logits = jnp.where(valid[None], scale * r @ cand.T, -1e9)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  pos = jnp.all(ids[:, None] == cand_ids[None], -1) & valid[None] & has[:, None]
  per = -jnp.sum(jnp.where(pos, log_p, 0.0), -1) / jnp.maximum(pos.sum(-1), 1)
  loss = jnp.sum(jnp.where(has, per, 0.0)) / jnp.maximum(has.sum(), 1)
  top1 = pos[jnp.arange(n), jnp.argmax(logits, -1)] & has
  return loss, top1.sum() / jnp.maximum(has.sum(), 1)


def test_region_phrase_gradients_match_the_masked_definition():
  rng = np.random.default_rng(3)
  n, e = len(TRUE), 6
  r, t, tf = (jnp.asarray(_unit(rng, n, e)) for _ in range(3))
  ids, has = _ids(TRUE)
  ids_f, has_f = _ids(FALSE)
  scale = jnp.float32(9.0)

  def ours(r, t, tf):
    return contrastive.region_phrase_loss(r, t, ids, has, scale, tf, ids_f, has_f)["loss"]

  ref_loss, ref_top1 = _masked_region_phrase_loss(r, t, ids, has, scale, tf, ids_f, has_f)
  out = contrastive.region_phrase_loss(r, t, ids, has, scale, tf, ids_f, has_f)
  assert float(out["loss"]) == pytest.approx(float(ref_loss), abs=1e-5)
  assert float(out["top1_acc"]) == pytest.approx(float(ref_top1))
  grads = jax.grad(ours, argnums=(0, 1, 2))(r, t, tf)
  ref = jax.grad(lambda *a: _masked_region_phrase_loss(a[0], a[1], ids, has, scale, a[2], ids_f, has_f)[0],
                 argnums=(0, 1, 2))(r, t, tf)
  for g, g_ref in zip(grads, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)

import numpy as np

from avlm_jax.train.text_cache import TextFeatureCache


class CountingEncoder:
  """A deterministic stand-in for the frozen tower: features are a function of the token row."""

  def __init__(self):
    self.rows = 0

  def __call__(self, tokens):
    self.rows += int((tokens != 0).any(axis=1).sum())
    return np.stack([tokens.sum(1), tokens[:, 0], (tokens != 0).sum(1)], axis=1).astype(np.float32)


def test_each_distinct_text_is_encoded_once_and_lookups_are_exact():
  enc = CountingEncoder()
  cache = TextFeatureCache(enc, width=3, rows=4)
  a = np.array([[[2, 5, 3, 0], [2, 6, 3, 0]], [[2, 5, 3, 0], [2, 3, 0, 0]]], np.int32)  # (2, 2, 4), one repeat
  out = cache.features(a)
  assert out.shape == (2, 2, 3)
  np.testing.assert_array_equal(out, enc(a.reshape(-1, 4)).reshape(2, 2, 3))
  assert len(cache) == 3 and cache.misses == 3 and cache.hits == 1
  rows = enc.rows
  again = cache.features(a[::-1])
  np.testing.assert_array_equal(again, out[::-1])
  assert enc.rows == rows and cache.hits == 5


def test_texts_are_encoded_at_their_own_length_bucket():
  seen = []
  enc = lambda t: (seen.append(t.shape), np.asarray(t.sum(1, keepdims=True), np.float32))[1]
  cache = TextFeatureCache(enc, width=1, rows=4)
  tokens = np.zeros((3, 40), np.int32)
  tokens[0, :5] = 7        # 5 tokens  -> bucket 8
  tokens[1, :12] = 7       # 12 tokens -> bucket 16
  tokens[2, :40] = 7       # 40 tokens -> the full width, 40
  np.testing.assert_array_equal(cache.features(tokens)[:, 0], [35, 84, 280])
  assert sorted(seen) == [(4, 8), (4, 16), (4, 40)]


def test_cache_grows_past_its_chunk_size():
  enc = CountingEncoder()
  cache = TextFeatureCache(enc, width=3, rows=4)
  tokens = np.array([[2, i, 3] for i in range(5, 30)], np.int32)  # 25 distinct texts
  out = cache.features(tokens)
  np.testing.assert_array_equal(out, enc(tokens))
  assert len(cache) == 25
  np.testing.assert_array_equal(cache.features(tokens[:3]), out[:3])


def test_the_lru_bound_holds_and_evicted_texts_come_back_the_same():
  enc = CountingEncoder()
  cache = TextFeatureCache(enc, width=3, rows=4, max_entries=4)
  tokens = np.array([[2, i, 3] for i in range(5, 15)], np.int32)  # 10 distinct texts, 4 kept
  np.testing.assert_array_equal(cache.features(tokens), enc(tokens))
  assert len(cache) == 4 and cache.nbytes_bound == 4 * 3 * 4
  for row in tokens:  # one at a time: each call evicts the least recently used
    cache.features(row[None])
    assert len(cache) <= 4
  rows = enc.rows
  np.testing.assert_array_equal(cache.features(tokens[-4:]), enc(tokens[-4:]))  # the 4 kept: no encoding
  assert enc.rows == rows + 4  # (enc() above counted 4 rows itself)
  for row in tokens[-4:]:  # used in this order: tokens[-4] is the next out
    cache.features(row[None])
  cache.features(tokens[:1])
  before = enc.rows
  cache.features(tokens[-1:])
  assert enc.rows == before
  cache.features(tokens[-4:-3])
  assert enc.rows == before + 1  # evicted, encoded again
  m = cache.metrics()
  assert m["text_cache_size"] == 4 and 0 < m["text_features_hit_rate"] < 1 and "text_table_size" not in m

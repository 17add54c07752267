"""Pooled features of a frozen text tower, looked up instead of computed every step.

With the tower frozen (the paper's setting), a text's features never change, so the train step
needs only the image tower and the (trainable) text projection. Texts are keyed by the pipeline's
text identity (`text_table.keys_of`: a hash of the exact token ids), so two texts share a row only
if the tower would see them identically.

A lookup tries, in order: the precomputed feature table (`text_table.FeatureTable`, memory-mapped;
built by `python -m launch.precompute_text_features`), then a bounded LRU cache of texts encoded
during the run, and encodes what neither holds. New texts are encoded in chunks of `rows`, each
cut to its own length bucket (`text_table.encode_in_buckets`), so a text's features depend only
on the text: an evicted text encoded again, or a resumed run, gets the same features.

Host memory: the table's keys (8 bytes a text) and its memory-mapped rows (at most the table's
size), plus `max_entries × width × 4` bytes for the LRU cache.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import ml_collections
import numpy as np

from avlm_jax.train import text_table
from avlm_jax.train.text_table import FeatureTable, encode_in_buckets, keys_of


class TextFeatureCache:

  def __init__(self, encode: Callable[[np.ndarray], np.ndarray], width: int, rows: int = 64,
               max_entries: int = 32768, table: FeatureTable | None = None):
    """`encode(tokens (rows, L) int32) -> (rows, width)` pooled features; at most `max_entries`
    encoded texts are kept (least recently used dropped first)."""
    if max_entries < 1:
      raise ValueError(f"text feature cache: max_entries={max_entries} must be >= 1")
    if table is not None and table.dim != width:
      raise ValueError(f"text feature table {table.path} holds {table.dim}-wide features; the tower's "
                       f"are {width} wide")
    self._encode = encode
    self._rows = rows
    self.width = width
    self.max_entries = max_entries
    self.table = table
    self._slot: collections.OrderedDict[int, int] = collections.OrderedDict()  # key -> row, oldest first
    self._store = np.zeros((max_entries, width), np.float32)  # pages are committed only when written
    self.lookups = 0
    self.table_hits = 0
    self.hits = 0  # served by the LRU cache (or a repeat within the same call)
    self.misses = 0  # distinct texts encoded

  def __len__(self) -> int:
    return len(self._slot)

  @property
  def nbytes_bound(self) -> int:
    """The most host memory these features can take: the table's plus the LRU cache's."""
    return (self.table.nbytes if self.table is not None else 0) + self._store.nbytes

  def _remember(self, key: int, feature: np.ndarray) -> None:
    if len(self._slot) < self.max_entries:
      slot = len(self._slot)
    else:
      _, slot = self._slot.popitem(last=False)
    self._slot[key] = slot
    self._store[slot] = feature

  def features(self, tokens: np.ndarray) -> np.ndarray:
    """tokens (..., L) int32 -> (..., width) float32."""
    flat = np.ascontiguousarray(tokens.reshape(-1, tokens.shape[-1]).astype(np.int32))
    keys = keys_of(flat)
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    out = np.empty((len(uniq), self.width), np.float32)
    todo = np.ones(len(uniq), bool)
    if self.table is not None:
      found, rows = self.table.lookup(uniq)
      out[found] = rows
      todo &= ~found
      self.table_hits += int(found[inverse].sum())
    new = []
    for i in np.flatnonzero(todo):
      slot = self._slot.get(int(uniq[i]))
      if slot is None:
        new.append(i)
      else:
        self._slot.move_to_end(int(uniq[i]))
        out[i] = self._store[slot]
    if new:
      new = np.asarray(new)
      out[new] = encode_in_buckets(self._encode, flat[first[new]], self._rows, self.width)
      for i in new:
        self._remember(int(uniq[i]), out[i])
    self.lookups += len(keys)
    self.misses += len(new)
    self.hits = self.lookups - self.table_hits - self.misses
    return out[inverse].reshape(*tokens.shape[:-1], self.width)

  def metrics(self) -> dict[str, float]:
    """Scalars for the log, counted since this cache was made (the run's start in this process:
    the prefetch thread runs ahead, so per-interval counts would not match the logged steps): the
    share of lookups the table served and the share that needed no encoding, texts encoded, and
    the sizes (rows) of the table and the LRU cache."""
    out = {"text_features_encoded": float(self.misses), "text_cache_size": float(len(self._slot)),
           "text_features_hit_rate": 1.0 - self.misses / max(self.lookups, 1)}
    if self.table is not None:
      out["text_table_size"] = float(len(self.table))
      out["text_table_hit_rate"] = self.table_hits / max(self.lookups, 1)
    return out

def for_run(config: ml_collections.ConfigDict, encode: Callable[[np.ndarray], np.ndarray], text_params: Any,
            tokenizer, data_dir: str, say: Callable[[str], None]) -> TextFeatureCache:
  """The cache of a run with a frozen tower: over the table `config.text_features.table` names
  (checked against this tower and tokenizer; TextFeatureTableError if it does not match), with an
  LRU cache of `config.text_features.cache_entries` texts."""
  tf = config.text_features
  table = None
  if tf.table:
    identity = text_table.tower_identity(config, text_params, tokenizer)
    table = text_table.resolve_table(tf.table, data_dir, identity, say)
  cache = TextFeatureCache(encode, config.model.text.width, max_entries=tf.cache_entries, table=table)
  if table is not None:
    say(f"text features: {len(table)} texts precomputed in {table.path}; host memory for text features "
        f"at most {cache.nbytes_bound / 2**20:.1f} MiB (table, and {tf.cache_entries} cached texts)")
  return cache

"""Pooled features of a frozen text tower, computed once per distinct text and then looked up.

With the tower frozen (the paper's setting), a text's features never change, so the train step
needs only the image tower and the (trainable) text projection. Texts are keyed by their exact
token ids: two texts share a row only if the tower would see them identically.

New texts are encoded in chunks of `rows` texts, each text cut to its own length bucket (the
next power of two >= its token count, at least 8): short texts do not pay for the longest one,
the encoder compiles once per bucket, and a text's features depend only on the text (mean
pooling ignores padding), not on which texts it was encoded with, so a resumed run rebuilds the
same cache.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


class TextFeatureCache:

  def __init__(self, encode: Callable[[np.ndarray], np.ndarray], width: int, rows: int = 64):
    """`encode(tokens (rows, L) int32) -> (rows, width)` pooled features."""
    self._encode = encode
    self._rows = rows
    self._row: dict[bytes, int] = {}
    self._table = np.zeros((0, width), np.float32)
    self.hits = 0
    self.misses = 0

  def __len__(self) -> int:
    return len(self._row)

  def _add(self, tokens: np.ndarray) -> None:
    start = len(self._row)
    need = start + len(tokens)
    if need > len(self._table):
      grown = np.zeros((max(need, 2 * len(self._table), self._rows), self._table.shape[1]), np.float32)
      grown[:start] = self._table[:start]
      self._table = grown
    lengths = (tokens != 0).sum(axis=1)
    buckets = np.minimum(tokens.shape[1], np.maximum(8, 2 ** np.ceil(np.log2(np.maximum(lengths, 1)))))
    for length in np.unique(buckets).astype(int):
      members = np.flatnonzero(buckets == length)
      for i in range(0, len(members), self._rows):
        chunk = members[i:i + self._rows]
        padded = np.zeros((self._rows, length), np.int32)
        padded[:len(chunk)] = tokens[chunk, :length]
        self._table[start + chunk] = np.asarray(self._encode(padded))[:len(chunk)]
    for j, row in enumerate(tokens):
      self._row[row.tobytes()] = start + j

  def features(self, tokens: np.ndarray) -> np.ndarray:
    """tokens (..., L) int32 -> (..., width) float32, encoding only texts not seen before."""
    flat = np.ascontiguousarray(tokens.reshape(-1, tokens.shape[-1]).astype(np.int32))
    keys = [row.tobytes() for row in flat]
    new = {k: i for i, k in enumerate(keys) if k not in self._row}  # dict: first occurrence, ordered
    self.misses += len(new)
    self.hits += len(keys) - len(new)
    if new:
      self._add(flat[list(new.values())])
    out = self._table[[self._row[k] for k in keys]]
    return out.reshape(*tokens.shape[:-1], -1)

"""Input prefetching: a background thread prepares the next `depth` global batches while the
device runs the current step (big_vision's and flax's prefetch, with a checkpointable position).

Preparing a batch can be real work beyond Grain's decode: with a frozen text tower, new texts go
through the tower for the feature cache. Done inline, the step waits for it; done here, it
overlaps the previous step.

The wrapped iterator runs ahead of training, so its own state is not the training position. The
prefetcher records the source's state after each batch it takes and reports, as its own state,
the one belonging to the last batch *handed out*: a checkpoint resumes exactly after the last
batch the step consumed. It implements the `get_state`/`set_state`/`start_prefetch` protocol that
`grain.checkpoint.CheckpointHandler` uses for non-Grain iterators.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Callable, Iterator

_DONE = object()


class BatchPrefetcher:

  def __init__(self, source: Iterator, prepare: Callable[[Any], Any], depth: int = 2):
    """`source`: a Grain DatasetIterator (JSON-able `get_state`); `prepare(item) -> batch`;
    `depth` batches are prepared ahead (0: prepare on demand, in the caller's thread)."""
    if depth < 0:
      raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    self._source = source
    self._prepare = prepare
    self._depth = depth
    self._position = source.get_state()
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  def __iter__(self) -> "BatchPrefetcher":
    return self

  def __next__(self) -> Any:
    if self._depth == 0:
      batch = self._prepare(next(self._source))
      self._position = self._source.get_state()
      return batch
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if item is _DONE:
      self._queue.put(_DONE)  # later calls end too
      raise StopIteration
    if isinstance(item, BaseException):
      self.close()
      raise item
    batch, self._position = item
    return batch

  def _start(self) -> None:
    self._stop.clear()
    self._queue = queue.Queue(maxsize=self._depth)
    self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          raw = next(self._source)
        except StopIteration:
          self._put(_DONE)
          return
        if not self._put((self._prepare(raw), self._source.get_state())):
          return
    except BaseException as e:  # noqa: BLE001 (re-raised in the consumer's thread)
      self._put(e)

  def close(self) -> None:
    """Stop the thread; batches prepared ahead are dropped (the position stays the consumed one)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      self._queue = None

  # grain.checkpoint.CheckpointHandler protocol (bytes state for non-Grain iterators).
  def get_state(self) -> bytes:
    return json.dumps(self._position).encode()

  def set_state(self, state: bytes) -> None:
    self.close()
    self._position = json.loads(state)
    self._source.set_state(self._position)

  def start_prefetch(self) -> None:
    """Called by the handler after a restore; the thread starts on the first `next` instead,
    once the caller has everything `prepare` needs (e.g. the text-feature cache)."""

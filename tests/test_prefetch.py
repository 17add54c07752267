"""BatchPrefetcher: same batches in the same order, a checkpoint position that is the consumed one
(not the read-ahead one), errors surfaced in the caller, and a Grain checkpoint round trip."""

import threading
import time

import grain
import pytest

from avlm_jax.train.prefetch import BatchPrefetcher


def _source(n=10):
  return iter(grain.MapDataset.range(n).map(lambda x: x * 10).to_iter_dataset())


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_and_resume_from_the_consumed_position(depth):
  seen_threads = set()

  def prepare(x):
    seen_threads.add(threading.get_ident())
    return {"x": x}

  pf = BatchPrefetcher(_source(), prepare, depth)
  first = [next(pf)["x"] for _ in range(4)]
  assert first == [0, 10, 20, 30]
  if depth:
    time.sleep(0.2)  # let the thread read ahead: the state must not follow it
    assert threading.get_ident() not in seen_threads
  else:
    assert seen_threads == {threading.get_ident()}
  state = pf.get_state()
  pf.close()

  resumed = BatchPrefetcher(_source(), prepare, depth)
  resumed.set_state(state)
  resumed.start_prefetch()
  assert [b["x"] for b in resumed] == [40, 50, 60, 70, 80, 90]
  with pytest.raises(StopIteration):
    next(resumed)  # stays exhausted


def test_set_state_discards_batches_prepared_ahead():
  pf = BatchPrefetcher(_source(), lambda x: x, depth=3)
  assert next(pf) == 0
  start = pf.get_state()
  assert [next(pf) for _ in range(3)] == [10, 20, 30]
  pf.set_state(start)  # e.g. a restore into a live iterator
  assert [next(pf) for _ in range(2)] == [10, 20]


def test_an_error_while_preparing_reaches_the_caller():
  def prepare(x):
    if x == 20:
      raise ValueError("record 2 is bad")
    return x

  pf = BatchPrefetcher(_source(), prepare, depth=2)
  assert [next(pf), next(pf)] == [0, 10]
  with pytest.raises(ValueError, match="record 2 is bad"):
    next(pf)


def test_negative_depth_is_named():
  with pytest.raises(ValueError, match="prefetch depth must be >= 0, got -1"):
    BatchPrefetcher(_source(), lambda x: x, depth=-1)


def test_grain_checkpoint_handler_round_trip(tmp_path):
  from etils import epath

  pf = BatchPrefetcher(_source(), lambda x: x, depth=2)
  [next(pf) for _ in range(3)]
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=pf)
  fresh = BatchPrefetcher(_source(), lambda x: x, depth=2)
  handler.restore(epath.Path(tmp_path), item=fresh)
  assert next(fresh) == 30

"""A compiled train step is reused only by runs that would compile exactly that step."""

import jax
import numpy as np
import pytest

from avlm_jax import sharding
from avlm_jax.train.compiled_steps import step_key
from avlm_jax.train.loop import train_and_evaluate
from tests.conftest import tiny_config


def _mesh(n=1):
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:n])


def _key(vocab=100, mesh=None, **overrides):
  return step_key(tiny_config(**overrides), vocab, mesh or _mesh())


@pytest.mark.parametrize("key, value", [
    ("log_every", 7), ("checkpoint_every", 3), ("max_checkpoints", 9), ("evals.every_steps", 5),
    ("data.dir", "/elsewhere"), ("data.max_bad_records", 4), ("train.step_timeout_s", 5.0),
    ("train.max_nonfinite_skips", 2), ("data.prefetch", 8), ("log_grad_signal", True)])
def test_cadences_paths_and_limits_do_not_change_the_step(key, value):
  assert _key(**{key: value}) == _key()


@pytest.mark.parametrize("key, value", [
    ("total_steps", 201), ("seed", 1), ("batch_size", 8), ("train.on_nonfinite", "skip"),
    ("model.image.width", 64), ("loss.fine_weight", 0.5), ("optimizer.learning_rate", 1.0),
    ("stages.fine_start", 0.5), ("data.image_size", 48), ("sharding.preset", "fsdp"),
    ("labels", ("nodule",))])
def test_everything_that_enters_the_step_changes_its_key(key, value):
  assert _key(**{key: value}) != _key()


def test_the_vocabulary_and_the_devices_are_part_of_the_key():
  assert _key(vocab=101) != _key()
  assert _key(mesh=_mesh(2)) != _key()
  assert _key(mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[1:2])) != _key()


@pytest.mark.xdist_group("tiny_step_a")  # the faults battery's step
def test_a_second_run_of_the_same_step_reuses_it_and_trains_the_same(synthetic_dir, tmp_path, compiled_steps,
                                                                     capsys):
  cfg = tiny_config(**{"data.kind": "array_record", "data.dir": synthetic_dir, "total_steps": 6,
                       "log_every": 3, "checkpoint_every": 2})  # the faults battery's step
  first = train_and_evaluate(cfg, str(tmp_path / "a"), devices=jax.devices()[:1], stop_after=2,
                             compiled=compiled_steps)
  hits, size = compiled_steps.hits, len(compiled_steps)
  capsys.readouterr()
  cfg.log_every, cfg.checkpoint_every = 1, 1
  second = train_and_evaluate(cfg, str(tmp_path / "b"), devices=jax.devices()[:1], stop_after=2,
                              compiled=compiled_steps)
  assert compiled_steps.hits == hits + 1 and len(compiled_steps) == size
  assert "train step reused from this process's compiled steps" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(first["state"]), jax.tree.leaves(second["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

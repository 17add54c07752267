"""Gradient-signal logging: each loss term's gradient norm on the shared image backbone."""

import jax
import numpy as np
import optax
import pytest

from avlm_jax.train import schedule
from avlm_jax.train.loop import build_trainer
from avlm_jax.train.state import param_path, split_frozen
from avlm_jax.train.step import BACKBONE, make_grad_signal_fn, make_loss_fn
from tests.conftest import tiny_config

TERMS = ("detection", "presence", "fine", "global")
STARTS = (2, 2)  # +global and +fine join at step 3 (state.step 2)


@pytest.fixture(scope="session")
def signals(synthetic_dir, tmp_path_factory):
  """A tiny trainer; (state, batch, grad signal) at state.step 1 (detection only) and 2 (all terms)."""
  cfg = tiny_config(**{"data.kind": "array_record", "data.dir": synthetic_dir, "total_steps": 10,
                       "stages.global_start": 2.0, "stages.fine_start": 2.0, "log_grad_signal": False})
  trainer = build_trainer(cfg, str(tmp_path_factory.mktemp("grad_signal")), devices=jax.devices()[:1])
  state = trainer.plan.initialize(jax.random.key(cfg.seed))
  trainer.start(state)
  signal_fn = jax.jit(make_grad_signal_fn(trainer.model, cfg.loss, cfg.seed, STARTS))
  out = {}
  for _ in range(2):
    state, _ = trainer.step_fn(state, trainer.next_batch(), trainer.prompts)
    batch = trainer.next_batch()
    out[int(state.step)] = (state, batch, jax.device_get(signal_fn(state, batch, trainer.prompts)))
  trainer.data_iter.close()
  return cfg, trainer, out


def _direct_norms(cfg, trainer, state, batch):
  """Per weighted term: the norm of jax.grad of that term alone, on the backbone leaves."""
  loss_fn = make_loss_fn(trainer.model, cfg.loss)
  rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
  weights = schedule.loss_weights(state.step, cfg.loss, STARTS)
  trainable, frozen = split_frozen(state.params, state.frozen)

  def norms(trainable):
    out = {}
    for name in TERMS:
      grads = jax.grad(lambda p: loss_fn({**p, **frozen}, batch, trainer.prompts, rng, True,
                                         weights)[1]["term_" + name])(trainable)
      out[name] = optax.tree.norm([g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
                                   if BACKBONE.fullmatch(param_path(path))])
    return out

  return {k: float(v) for k, v in jax.jit(norms)(trainable).items()}


def test_term_norms_equal_the_gradients_of_each_term_alone(signals):
  cfg, trainer, by_step = signals
  state, batch, signal = by_step[2]
  direct = _direct_norms(cfg, trainer, state, batch)
  assert all(direct[n] > 0 for n in TERMS)
  for name in TERMS:
    np.testing.assert_allclose(signal[f"backbone_grad_norm_{name}"], direct[name], rtol=1e-4, err_msg=name)
  shares = [float(signal[f"backbone_grad_share_{n}"]) for n in TERMS]
  np.testing.assert_allclose(sum(shares), 1.0, rtol=1e-5)
  np.testing.assert_allclose(shares[0], direct["detection"] / sum(direct.values()), rtol=1e-4)
  assert 0 < signal["backbone_grad_norm"] <= sum(direct.values()) * (1 + 1e-5)  # triangle inequality


def test_a_term_before_its_stage_has_no_signal(signals):
  _, _, by_step = signals
  signal = by_step[1][2]  # state.step 1: before the stages at 2
  for name in ("fine", "global"):
    assert signal[f"backbone_grad_norm_{name}"] == 0.0 == signal[f"backbone_grad_share_{name}"]
  assert signal["backbone_grad_share_detection"] > 0 and signal["backbone_grad_share_presence"] > 0
  np.testing.assert_allclose(signal["backbone_grad_share_detection"] + signal["backbone_grad_share_presence"], 1.0,
                             rtol=1e-5)


def test_the_backbone_is_the_shared_encoder_and_not_the_heads(signals):
  _, _, by_step = signals
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(by_step[1][0].params)[0]]
  backbone = {p for p in paths if BACKBONE.fullmatch(p)}
  assert {"image/patch_embedding/kernel", "image/pos_embedding", "image/anatomy_tokens", "image/cls_token",
          "image/block_0/mlp/fc1/kernel", "image/encoder_ln/scale"} <= backbone
  assert not any(("head" in p or "projection" in p or "pool" in p or not p.startswith("image/")) for p in backbone)

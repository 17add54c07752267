"""Evaluators: known answers on hand-built embeddings, then the real model end to end."""

import copy
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avlm_jax import anatomy
from avlm_jax.evaluate import dataset, localisation, metrics, registry, runner, scoring, segmentation
from avlm_jax.evaluate import zeroshot_anatomy, zeroshot_image
from avlm_jax.evaluate.context import EvalContext
from avlm_jax.evaluate.model_runner import random_params
from avlm_jax.losses.contrastive import image_label_loss
from avlm_jax.train.checkpoint import IncompatibleCheckpointError
from tests.conftest import tiny_config

FINDINGS = ("lung opacity", "nodule", "pleural effusion")
R, C = anatomy.NUM_REGIONS, len(FINDINGS)


class HandBuiltRunner:
  """Stands in for ModelRunner: text embeddings are one-hot per finding (negations the opposite)."""

  def __init__(self, config):
    self.config, self.name = config, "hand-built"
    self.scales = {"global_scale": 10.0, "global_bias": 0.0, "region_scale": 10.0}
    prompts = scoring.image_prompts(FINDINGS, config.prompt_template, config.prompt_style)
    pos, neg = scoring.region_texts(FINDINGS, config.evals.zeroshot_anatomy.positive_template,
                                    config.evals.zeroshot_anatomy.negative_template)
    eye = np.eye(C + 1)
    self.table = {t: eye[i] for i, t in enumerate(prompts)}
    self.table.update({t: eye[i % C] for i, t in enumerate(pos)})
    self.table.update({t: -eye[i % C] for i, t in enumerate(neg)})

  def embed_texts(self, texts, max_len=None):
    return np.stack([self.table[t] for t in texts])


def _set(name, labels, region_labels, boxes):
  n = len(labels)
  return dataset.EvalSet(
      name, [f"{name}-{i}" for i in range(n)], np.zeros((n, 32, 32), np.uint8), boxes, np.ones((n, R), bool),
      [[f for f, y in zip(FINDINGS, row) if y] for row in labels],
      [[[f for f, y in zip(FINDINGS, cell) if y] for cell in ex] for ex in region_labels], [{}] * n, 32)


def _hand_built_context(rng, perfect):
  config = tiny_config(**{"evals.zeroshot_image.findings": FINDINGS, "evals.zeroshot_anatomy.findings": FINDINGS})
  sets, enc = [], {}
  for which, n in (("threshold", 12), ("eval", 16)):
    labels = rng.random((n, C)) < 0.4
    labels[:2, 2] = True  # every class has positives ...
    if which == "eval":
      labels[:, 2] = False  # ... except class 2 on the scored split: undefined there
    region_labels = rng.random((n, R, C)) < 0.3
    corner, size = rng.uniform(0, 16, (n, R, 2)), rng.uniform(4, 16, (n, R, 2))
    boxes = np.concatenate([corner, corner + size], axis=-1)
    sets.append(_set(which, labels, region_labels, boxes))
    if perfect:
      image_emb = np.concatenate([labels, np.ones((n, 1))], axis=1).astype(float)
      region_emb = np.concatenate([np.where(region_labels, 1.0, -1.0), np.zeros((n, R, 1))], axis=-1)
    else:
      image_emb = np.ones((n, C + 1))
      region_emb = np.ones((n, R, C + 1))
    x1, y1, x2, y2 = np.moveaxis(boxes / 32, -1, 0)
    enc[which] = {"image_emb": image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True),
                  "region_emb": region_emb / np.linalg.norm(region_emb, axis=-1, keepdims=True),
                  "boxes": np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)}
  return EvalContext(HandBuiltRunner(config), sets[0], sets[1], encodings=enc), config


@pytest.mark.parametrize("perfect", [True, False])
def test_zero_shot_scores_on_hand_built_embeddings(perfect):
  ctx, config = _hand_built_context(np.random.default_rng(0), perfect)
  img = zeroshot_image.evaluate(ctx, config.evals.zeroshot_image)
  anat = zeroshot_anatomy.evaluate(ctx, config.evals.zeroshot_anatomy)
  want = 1.0 if perfect else 0.5
  for f in FINDINGS[:2]:
    assert img["per_finding"][f]["auc"] == want
    assert anat["per_finding"][f]["auc"] == want
  assert img["mean_auc"] == want and img["num_defined_auc"] == 2
  # Class 2 has no positives on the scored split: undefined, null in JSON, not averaged.
  assert math.isnan(img["per_finding"]["pleural effusion"]["auc"])
  assert math.isnan(img["per_finding"]["pleural effusion"]["f1"])
  assert json.loads(json.dumps(metrics.to_json(img)))["per_finding"]["pleural effusion"]["auc"] is None
  if perfect:  # thresholds from the threshold split separate the scored split perfectly too
    assert img["per_finding"]["nodule"]["f1"] == 1.0 and img["per_finding"]["nodule"]["balanced_accuracy"] == 1.0
    assert anat["region_means"]["mean_auc"] == 1.0 and anat["region_means"]["mean_f1"] == 1.0
    assert anat["table"]["left lung"]["nodule"]["auc"] == 1.0
  assert set(anat["table"]) == set(anatomy.REGION_NAMES)


def test_localisation_on_exact_and_shifted_boxes():
  ctx, config = _hand_built_context(np.random.default_rng(1), True)
  exact = localisation.evaluate(ctx, config.evals.localisation)
  assert exact["mean_iou"] == pytest.approx(1.0) and exact["map50"] == 1.0 and exact["map50_95"] == 1.0
  ctx.encodings["eval"]["boxes"] = ctx.encodings["eval"]["boxes"] + np.array([0.5, 0, 0, 0])  # off by half the image
  moved = localisation.evaluate(ctx, config.evals.localisation)
  assert moved["map50"] < 0.2 and moved["mean_iou"] < 0.3


def test_probabilities_are_the_losses_reading():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(4, 8))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  prm = rng.normal(size=(3, 8))
  prm /= np.linalg.norm(prm, axis=1, keepdims=True)
  labels = (rng.random((4, 3)) < 0.5).astype(np.float32)
  p = scoring.image_probabilities(img, prm, 7.0, -1.5)
  bce = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  loss = image_label_loss(img, prm, labels, np.float32(7.0), np.float32(-1.5))["loss"]
  assert bce == pytest.approx(float(loss), rel=1e-5)


def test_unknown_finding_name_is_named():
  ctx, config = _hand_built_context(np.random.default_rng(0), True)
  config.evals.zeroshot_image.findings = ("nodule", "pneumonitiss")
  with pytest.raises(KeyError, match="pneumonitiss"):
    zeroshot_image.evaluate(ctx, config.evals.zeroshot_image)
  with pytest.raises(KeyError, match="unknown evaluator.*'zeroshot'"):
    registry.enabled(config, ["zeroshot"])


def test_all_evaluators_on_the_real_model(synthetic_dir, tokenizer, tmp_path):
  """Random-init tiny model on the built-in corpus: the evaluators run and draw their pictures
  (segmentation: the slow test below)."""
  config = tiny_config()
  params = random_params(config, tokenizer.vocab_size, seed=0)
  res = runner.evaluate_params(config, params, tokenizer, synthetic_dir,
                               ["zeroshot_image", "zeroshot_anatomy", "localisation"], picture_dir=str(tmp_path))
  img = res["zeroshot_image"]
  assert img["threshold_split"] == "validation[0::2]" and img["eval_split"] == "validation[1::2]"
  assert all(0 <= r["auc"] <= 1 for r in img["per_finding"].values() if not math.isnan(r["auc"]))
  anat = res["zeroshot_anatomy"]
  assert anat["num_eval_with_labels"] == 8 and len(anat["table"]) == R
  loc = res["localisation"]
  assert 0 <= loc["mean_iou"] <= 1 and 0 <= loc["map50_95"] <= loc["map50"] <= 1
  for name in ("roc_image_level", "region_finding_auc", "region_heat_overlay", "boxes"):
    assert os.path.getsize(tmp_path / f"{name}.png") > 1000
  json.dumps(metrics.to_json(res), allow_nan=False)
  assert set(registry.headline_scalars(res)) >= {"eval/zeroshot_image/AUC", "eval/localisation/mAP@0.5"}


def test_evaluations_inside_training(tiny_checkpoint):
  workdir, _ = tiny_checkpoint
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [l for l in lines if any(k.startswith("eval/") for k in l)]
  assert [l["step"] for l in evals] == [2]
  assert {"eval/localisation/mean IoU", "eval/localisation/mAP@0.5"} <= set(evals[0])
  full = json.load(open(os.path.join(workdir, "eval", "step_2.json")))
  assert set(full) == {"step", "zeroshot_image", "localisation"}


def test_standalone_evaluation_writes_metrics_and_report(tiny_checkpoint, holistic_checkpoint, tmp_path):
  workdir, trained = tiny_checkpoint
  config = copy.deepcopy(trained)
  config.evals.segmentation.enabled = False
  config.evals.holistic_checkpoint = holistic_checkpoint[0]
  res = runner.evaluate_checkpoint(workdir, config, str(tmp_path), log=lambda s: None)
  assert set(res["subjects"]) == {"model", "random_init", "holistic"}
  saved = json.load(open(tmp_path / "metrics.json"))
  model, holistic = saved["subjects"]["model"], saved["subjects"]["holistic"]
  assert model["localisation"]["map50"] == pytest.approx(res["subjects"]["model"]["localisation"]["map50"])
  # The holistic model (its own saved config, no anatomy tokens) is scored image-level only.
  assert holistic["localisation"] == {"skipped": "the model has no anatomy tokens (holistic ablation)",
                                      "seconds": holistic["localisation"]["seconds"]}
  assert "skipped" in holistic["zeroshot_anatomy"]
  assert set(holistic["zeroshot_image"]["per_finding"]) == set(model["zeroshot_image"]["per_finding"])
  assert holistic["zeroshot_image"]["per_finding"] != model["zeroshot_image"]["per_finding"]
  assert saved["subjects"]["random_init"]["zeroshot_image"]["per_finding"] != model["zeroshot_image"]["per_finding"]
  report = open(tmp_path / "report.md").read()
  assert "| metric | model | random_init | holistic |" in report
  assert "| localisation: mean IoU | " in report and report.split("| localisation: mean IoU | ")[1].split("\n")[0].endswith("| – |")
  assert "![zeroshot_image roc](pictures/roc_image_level.png)" in report
  assert os.path.getsize(tmp_path / "pictures" / "boxes.png") > 1000


def test_a_baseline_with_other_labels_is_refused(tiny_checkpoint, holistic_checkpoint, tmp_path):
  workdir, trained = tiny_checkpoint
  config = copy.deepcopy(trained)
  config.labels = tuple(config.labels)[:-1]
  config.evals.holistic_checkpoint = holistic_checkpoint[0]
  with pytest.raises(IncompatibleCheckpointError, match=r"baseline checkpoint .*/2 was trained with labels="):
    runner.evaluate_checkpoint(workdir, config, str(tmp_path), names=["localisation"], log=lambda s: None)


def test_standalone_evaluation_refuses_a_checkpoint_of_another_config(tiny_checkpoint, tmp_path):
  workdir, trained = tiny_checkpoint
  wider = copy.deepcopy(trained)
  wider.model.image.width = 64
  with pytest.raises(IncompatibleCheckpointError, match=r"model.image.width: 32 in the checkpoint, 64 now"):
    runner.evaluate_checkpoint(workdir, wider, str(tmp_path), names=["localisation"], log=lambda s: None)


@pytest.mark.slow
def test_segmentation_decoder_learns_the_masks(synthetic_dir, tokenizer, tmp_path):
  config = tiny_config(**{"evals.segmentation.steps": 30, "evals.segmentation.batch_size": 8,
                          "evals.segmentation.width": 32,
                          "evals.segmentation.modes": ("frozen",)})
  params = random_params(config, tokenizer.vocab_size, seed=0)
  res = runner.evaluate_params(config, params, tokenizer, synthetic_dir, ["segmentation"],
                               picture_dir=str(tmp_path))["segmentation"]
  assert res["num_train"] == 64 and res["layers"] == [0, 0, 1]
  assert os.path.getsize(tmp_path / "segmentation_frozen.png") > 1000
  assert res["frozen"]["train_loss"][-1] < 0.5 * res["frozen"]["train_loss"][0]
  assert res["frozen"]["mean_dice"] > 0.7, res["frozen"]
  # The image-blind floor: the training masks' per-pixel majority, recomputed here.
  size = config.data.image_size
  train_masks, _ = dataset.load_split(synthetic_dir, "train", size, 0).mask_stack(config.evals.segmentation.structures)
  _, eval_set = dataset.threshold_and_eval_sets(synthetic_dir, size, 0)
  eval_masks, _ = eval_set.mask_stack(config.evals.segmentation.structures)
  prior = np.broadcast_to(train_masks.mean(0) > 0.5, eval_masks.shape)
  want = segmentation.mask_scores(prior, eval_masks, config.evals.segmentation.structures)["mean_dice"]
  assert res["mean_mask_prior"]["mean_dice"] == pytest.approx(want)


@pytest.mark.parametrize("pixel_stem", [True, False])
def test_segmentation_decoder_pixel_stem(pixel_stem):
  """Without the pixel stem the masks depend on the encoder features only, not on the pixels."""
  dec = segmentation.UNetDecoder(num_classes=3, levels=2, width=4, pixel_stem=pixel_stem)
  feats = [jax.random.normal(jax.random.key(i), (1, 2, 2, 6)) for i in range(2)]
  a, b = jnp.zeros((1, 8, 8, 1)), jnp.ones((1, 8, 8, 1))
  params = dec.init(jax.random.key(0), feats, a)
  out_a, out_b = dec.apply(params, feats, a), dec.apply(params, feats, b)
  assert out_a.shape == (1, 8, 8, 3)
  assert bool(jnp.any(out_a != out_b)) == pixel_stem


def test_segmentation_taps_and_bad_patch_size():
  assert segmentation.tap_layers(12, 4) == [2, 5, 8, 11]
  assert segmentation.tap_layers(2, 3) == [0, 0, 1]
  with pytest.raises(ValueError, match="layers=.*need 3 block indices"):
    segmentation.tap_layers(2, 3, (0, 5, 1))
  with pytest.raises(ValueError, match="power-of-two patch size, got 12"):
    segmentation.upsampling_levels(12)


@pytest.mark.slow
def test_evaluate_command_line(tiny_checkpoint, synthetic_dir, tmp_path):
  """`python -m launch.evaluate` on a checkpoint: metrics.json and report.md; a bad key and a
  missing checkpoint each end with one line naming them."""
  import subprocess
  import sys

  workdir, _ = tiny_checkpoint
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  base = [sys.executable, "-m", "launch.evaluate", "--config=configs/tiny.py:data=shapes",
          "--config.data.kind=array_record", f"--config.data.dir={synthetic_dir}"]
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run([*base, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
  ok = run(f"--checkpoint={workdir}", "--only=localisation", f"--out={tmp_path}", "--config.evals.random_baseline=False")
  assert ok.returncode == 0, ok.stderr[-2000:]
  saved = json.load(open(tmp_path / "metrics.json"))
  assert set(saved["subjects"]) == {"model"} and "map50" in saved["subjects"]["model"]["localisation"]
  assert (tmp_path / "report.md").exists()
  bad = run(f"--checkpoint={workdir}", "--config.evals.bogus=1")
  assert bad.returncode != 0 and "config key 'evals.bogus' does not exist" in bad.stderr
  missing = run(f"--checkpoint={tmp_path / 'nothere'}")
  assert missing.returncode != 0 and "does not exist" in missing.stderr.strip().splitlines()[-1]

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
from avlm_jax.evaluate import label_frequency, zeroshot_anatomy, zeroshot_image
from avlm_jax.evaluate.context import EvalContext
from avlm_jax.evaluate.model_runner import random_params
from avlm_jax.knowledge import load_knowledge_base
from avlm_jax.losses.contrastive import image_label_loss
from avlm_jax.train.checkpoint import IncompatibleCheckpointError
from tests.conftest import tiny_config

FINDINGS = ("lung opacity", "nodule", "pleural effusion")
R, C = anatomy.NUM_REGIONS, len(FINDINGS)


class HandBuiltRunner:
  """Stands in for ModelRunner: text embeddings are one-hot per finding (negations the opposite).

  Held-out wordings: the first text of a finding's ensemble points at its finding, the others at
  nothing (zero vector); with `heldout_mix` the second one points at the next finding, so the
  ensemble's mean cosine ranks images by both findings."""

  def __init__(self, config, heldout_mix=False):
    self.config, self.name = config, "hand-built"
    self.scales = {"global_scale": 10.0, "global_bias": 0.0, "region_scale": 10.0}
    prompts = scoring.image_prompts(FINDINGS, config.prompt_template, config.prompt_style)
    pos, neg = scoring.region_texts(FINDINGS, config.evals.zeroshot_anatomy.positive_template,
                                    config.evals.zeroshot_anatomy.negative_template)
    eye = np.eye(C + 1)
    self.table = {t: eye[i] for i, t in enumerate(prompts)}
    self.table.update({t: eye[i % C] for i, t in enumerate(pos)})
    self.table.update({t: -eye[i % C] for i, t in enumerate(neg)})
    kb = load_knowledge_base()
    for c, f in enumerate(FINDINGS):
      direction = lambda k: eye[c] if k == 0 else eye[(c + 1) % C] if (k == 1 and heldout_mix) else 0 * eye[c]
      for k, p in enumerate(kb.heldout_label_prompts(f)):
        self.table[p] = direction(k)
      for region in anatomy.REGION_NAMES:
        for k, (p, n) in enumerate(kb.heldout_region_texts(f, region)):
          self.table[p], self.table[n] = direction(k), -direction(k)
    self.kinds = {}  # text -> the projection kinds it was embedded with

  def embed_texts(self, texts, max_len=None, *, kind):
    for t in texts:
      self.kinds.setdefault(t, set()).add(kind)
    return np.stack([self.table[t] for t in texts])


def _set(name, labels, region_labels, boxes):
  n = len(labels)
  return dataset.EvalSet(
      name, [f"{name}-{i}" for i in range(n)], np.zeros((n, 32, 32), np.uint8), boxes, np.ones((n, R), bool),
      [[f for f, y in zip(FINDINGS, row) if y] for row in labels],
      [[[f for f, y in zip(FINDINGS, cell) if y] for cell in ex] for ex in region_labels], [{}] * n, 32)


def _hand_built_context(rng, perfect, heldout_mix=False):
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
                  "boxes": np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1),
                  "presence_logits": np.zeros((n, R))}
  return EvalContext(HandBuiltRunner(config, heldout_mix), sets[0], sets[1], encodings=enc), config


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
  # Held-out wording (here: embedded like the train wording, so it ranks alike), same undefined rules.
  heldout = img["heldout_wording"]
  assert img["heldout_mean_auc"] == heldout["mean_auc"] == want and heldout["num_defined_auc"] == 2
  assert math.isnan(heldout["per_finding"]["pleural effusion"]["auc"])
  assert json.loads(json.dumps(metrics.to_json(img)))["heldout_wording"]["per_finding"]["pleural effusion"]["f1"] is None
  assert heldout["prompts"]["nodule"] == list(load_knowledge_base().heldout_label_prompts("nodule"))
  assert anat["heldout_wording"]["finding_means"]["mean_auc"] == want and "table" not in anat["heldout_wording"]


def test_heldout_wording_averages_the_cosine_over_its_ensemble():
  """With a second held-out prompt pointing at the next finding, finding c is ranked by the mean
  cosine, i.e. by y_c + y_(c+1): the AUC of exactly that score, not of the first prompt alone."""
  ctx, config = _hand_built_context(np.random.default_rng(0), True, heldout_mix=True)
  img = zeroshot_image.evaluate(ctx, config.evals.zeroshot_image)
  anat = zeroshot_anatomy.evaluate(ctx, config.evals.zeroshot_anatomy)
  y = ctx.eval_set.labels(FINDINGS)
  cos = ctx.encodings["eval"]["image_emb"][:, :C]
  y_reg, k = ctx.eval_set.region_labels(FINDINGS)
  reg = ctx.encodings["eval"]["region_emb"][k][..., :C]
  for c, f in enumerate(FINDINGS[:2]):
    assert img["per_finding"][f]["auc"] == 1.0  # the train wording is untouched
    want = metrics.roc_auc(y[:, c], cos[:, c] + cos[:, (c + 1) % C])
    assert img["heldout_wording"]["per_finding"][f]["auc"] == pytest.approx(want)
    assert want < 1.0 or c == 1  # (finding 2, nodule's partner, has no positives on the scored split)
    want = metrics.roc_auc(y_reg[..., c], reg[..., c] + reg[..., (c + 1) % C])
    assert want < 1.0 and anat["heldout_wording"]["per_finding"][f]["auc"] == pytest.approx(want)
    # The per-image scores kept for bootstrapping are the ones scored.
    kept = ctx.kept
    assert metrics.roc_auc(kept["zeroshot_image/labels"][:, c], kept["zeroshot_image/heldout_scores"][:, c]) == (
        img["heldout_wording"]["per_finding"][f]["auc"])
    assert metrics.roc_auc(kept["zeroshot_anatomy/labels"][..., c], kept["zeroshot_anatomy/heldout_scores"][..., c]) == (
        anat["heldout_wording"]["per_finding"][f]["auc"])
  assert list(ctx.kept["zeroshot_anatomy/index"]) == list(k)


def test_heldout_wording_is_skipped_when_the_run_trained_on_it():
  """A config whose own label-prompt template is a held-out template has no held-out wording."""
  ctx, config = _hand_built_context(np.random.default_rng(0), True)
  config.prompt_template = "x-ray with {name}"
  ctx.runner.table.update({p: ctx.runner.table[q] for p, q in zip(
      scoring.image_prompts(FINDINGS, config.prompt_template, "plain"),
      scoring.image_prompts(FINDINGS, "chest radiograph showing {name}", "plain"))})
  img = zeroshot_image.evaluate(ctx, config.evals.zeroshot_image)
  assert "'x-ray with' occurs in the training label prompt 'x-ray with lung opacity'" in img["heldout_wording"]["skipped"]
  assert math.isnan(img["heldout_mean_auc"]) and img["mean_auc"] == 1.0
  assert json.loads(json.dumps(metrics.to_json(img)))["heldout_mean_auc"] is None


def test_label_frequency_baseline_is_scored_like_the_model():
  """Constant scores: image AUC exactly 0.5, F1 of calling every image positive; at anatomy level
  the per-region frequencies rank typical cells first, pooled AUC above 0.5 (computed here)."""
  rng = np.random.default_rng(0)
  ctx, config = _hand_built_context(rng, True)
  # Findings concentrated in a few regions, as in real data.
  typical = np.zeros((R, C), bool)
  typical[:6, 0], typical[3:9, 1], typical[20:, 2] = True, True, True
  for s in (ctx.threshold_set, ctx.eval_set):
    cells = rng.random((len(s), R, C)) < np.where(typical, 0.5, 0.03)
    s.region_findings[:] = [[[f for f, y in zip(FINDINGS, cell) if y] for cell in ex] for ex in cells]
  train = rng.random((200, R, C)) < np.where(typical, 0.5, 0.03)
  counts = label_frequency.LabelCounts("train", 400, {"lung opacity": 100, "nodule": 40}, 200,
                                       {f: train[:, :, c].sum(axis=0) for c, f in enumerate(FINDINGS)})
  img = zeroshot_image.label_frequency_result(ctx, config.evals.zeroshot_image, config.labels, counts)
  y = ctx.eval_set.labels(FINDINGS)
  assert img["prevalence"] == {"lung opacity": 0.25, "nodule": 0.1, "pleural effusion": 0.0}
  for c, f in enumerate(FINDINGS[:2]):
    assert img["per_finding"][f]["auc"] == 0.5
    assert img["per_finding"][f]["f1"] == pytest.approx(metrics.f1_score(y[:, c], np.ones(len(y), bool)))
  assert math.isnan(img["per_finding"]["pleural effusion"]["auc"])  # undefined stays undefined
  assert img["heldout_mean_auc"] == img["mean_auc"] == 0.5
  anat = zeroshot_anatomy.label_frequency_result(ctx, config.evals.zeroshot_anatomy, config.labels, counts)
  y_reg, _ = ctx.eval_set.region_labels(FINDINGS)
  freq = counts.region_frequency(FINDINGS)
  for c, f in enumerate(FINDINGS):
    want = metrics.roc_auc(y_reg[..., c], np.broadcast_to(freq[:, c], y_reg.shape[:2]))
    assert anat["per_finding"][f]["auc"] == pytest.approx(want) and want > 0.8
  cells = [r["auc"] for row in anat["table"].values() for r in row.values() if not math.isnan(r["auc"])]
  assert cells and set(cells) == {0.5}
  assert anat["frequency"]["left lung"]["nodule"] == pytest.approx(freq[anatomy.region_id("left lung"), 1])
  json.dumps(metrics.to_json({"img": img, "anat": anat}), allow_nan=False)


def test_label_counts_of_a_triple_folder(synthetic_dir):
  counts = label_frequency.count_labels(synthetic_dir)
  train = dataset.load_split(synthetic_dir, "train", 48)
  names = ["nodule", "pleural effusion", "kidney stone"]
  assert counts.num_records == counts.num_region_records == 64
  np.testing.assert_allclose(counts.prevalence(names), train.labels(names).mean(axis=0))
  y, _ = train.region_labels(names)
  np.testing.assert_allclose(counts.region_frequency(names), y.mean(axis=0))


def test_evaluators_embed_prompts_and_region_statements_with_their_own_projection():
  """Image-level zero-shot embeds label prompts as kind 'prompt', anatomy-level zero-shot embeds
  region statements as kind 'phrase' (model.separate_text_projections gives them different ones)."""
  ctx, config = _hand_built_context(np.random.default_rng(0), True)
  zeroshot_image.evaluate(ctx, config.evals.zeroshot_image)
  prompts = scoring.image_prompts(FINDINGS, config.prompt_template, config.prompt_style)
  assert {t: ctx.runner.kinds[t] for t in prompts} == {t: {"prompt"} for t in prompts}
  zeroshot_anatomy.evaluate(ctx, config.evals.zeroshot_anatomy)
  pos, neg = scoring.region_texts(FINDINGS, config.evals.zeroshot_anatomy.positive_template,
                                  config.evals.zeroshot_anatomy.negative_template)
  kb = load_knowledge_base()
  heldout_prompts = {p for f in FINDINGS for p in kb.heldout_label_prompts(f)}
  heldout_statements = {t for f in FINDINGS for r in anatomy.REGION_NAMES for pair in kb.heldout_region_texts(f, r)
                        for t in pair}
  assert set(ctx.runner.kinds) == set(prompts) | set(pos) | set(neg) | heldout_prompts | heldout_statements
  assert all(ctx.runner.kinds[t] == {"phrase"} for t in list(pos) + list(neg) + list(heldout_statements))
  assert all(ctx.runner.kinds[t] == {"prompt"} for t in heldout_prompts)


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
  assert set(img["heldout_wording"]["per_finding"]) == set(img["per_finding"])
  assert all(0 <= r["auc"] <= 1 for r in img["heldout_wording"]["per_finding"].values() if not math.isnan(r["auc"]))
  anat = res["zeroshot_anatomy"]
  assert anat["num_eval_with_labels"] == 8 and len(anat["table"]) == R
  loc = res["localisation"]
  assert 0 <= loc["mean_iou"] <= 1 and 0 <= loc["map50_95"] <= loc["map50"] <= 1
  for name in ("roc_image_level", "roc_image_level_heldout", "region_finding_auc", "region_heat_overlay", "boxes"):
    assert os.path.getsize(tmp_path / f"{name}.png") > 1000
  json.dumps(metrics.to_json(res), allow_nan=False)
  assert set(registry.headline_scalars(res)) >= {"eval/zeroshot_image/AUC", "eval/zeroshot_image/AUC, held-out wording",
                                                 "eval/zeroshot_anatomy/finding AUC, held-out wording",
                                                 "eval/localisation/mAP@0.5"}


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
  assert set(res["subjects"]) == {"model", "random_init", "holistic", "box_prior", "label_frequency"}
  saved = json.load(open(tmp_path / "metrics.json"))
  # The image-blind box prior is scored on localisation only (tests/test_box_prior.py checks its values).
  prior = saved["subjects"]["box_prior"]
  assert set(prior) == {"localisation"} and prior["localisation"]["num_train"] == 64
  assert 0 < prior["localisation"]["mean_iou"] < 1 and 0 <= prior["localisation"]["map50"] <= 1
  # The label-frequency baseline: zero-shot only, constant image scores (AUC 0.5), a region prior.
  freq = saved["subjects"]["label_frequency"]
  assert set(freq) == {"zeroshot_image", "zeroshot_anatomy"} and freq["zeroshot_image"]["num_train"] == 64
  assert freq["zeroshot_image"]["mean_auc"] == freq["zeroshot_image"]["heldout_mean_auc"] == 0.5
  assert freq["zeroshot_anatomy"]["finding_means"]["mean_auc"] > 0.5  # typical regions, pooled over regions
  model, holistic = saved["subjects"]["model"], saved["subjects"]["holistic"]
  assert 0 <= holistic["zeroshot_image"]["heldout_mean_auc"] <= 1
  assert model["localisation"]["map50"] == pytest.approx(res["subjects"]["model"]["localisation"]["map50"])
  # The holistic model (its own saved config, no anatomy tokens) is scored image-level only.
  assert holistic["localisation"] == {"skipped": "the model has no anatomy tokens (holistic ablation)",
                                      "seconds": holistic["localisation"]["seconds"]}
  assert "skipped" in holistic["zeroshot_anatomy"]
  assert set(holistic["zeroshot_image"]["per_finding"]) == set(model["zeroshot_image"]["per_finding"])
  assert holistic["zeroshot_image"]["per_finding"] != model["zeroshot_image"]["per_finding"]
  assert saved["subjects"]["random_init"]["zeroshot_image"]["per_finding"] != model["zeroshot_image"]["per_finding"]
  report = open(tmp_path / "report.md").read()
  assert "| metric | model | random_init | holistic | box_prior | label_frequency |" in report
  row = report.split("| zeroshot_image: AUC, held-out wording | ")[1].split("\n")[0].strip(" |").split(" | ")
  assert row[4] == "0.500" and row[3] == "–"  # label frequency scored, box prior not
  assert "| finding | AUC | balanced acc. | F1 | threshold | pos | neg | held-out AUC | held-out F1 | train prevalence" in report
  row = report.split("| localisation: mean IoU | ")[1].split("\n")[0].strip(" |").split(" | ")
  assert row[2] == "–" and row[3] == f"{prior['localisation']['mean_iou']:.3f}"  # holistic skipped, prior scored
  assert "![zeroshot_image roc](pictures/roc_image_level.png)" in report
  assert os.path.getsize(tmp_path / "pictures" / "boxes.png") > 1000
  # metrics.json names its pictures relative to the output folder, so the folder can be moved.
  assert model["zeroshot_image"]["pictures"]["roc"] == "pictures/roc_image_level.png"
  assert all(not os.path.isabs(p) for p in model["localisation"]["pictures"].values())


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
  """`python -m launch.evaluate` on a checkpoint, with no --config (the one saved beside it):
  metrics.json and report.md; a bad key and a missing checkpoint each end with one line naming them."""
  import subprocess
  import sys

  workdir, _ = tiny_checkpoint
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  base = [sys.executable, "-m", "launch.evaluate", "--config=configs/tiny.py:data=shapes",
          "--config.data.kind=array_record", f"--config.data.dir={synthetic_dir}"]
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run([*base, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
  # --out relative to the working directory, as the README's commands write it.
  ok = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--checkpoint={workdir}", "--only=localisation",
                       "--out=eval"], cwd=tmp_path, env={**env, "PYTHONPATH": root}, capture_output=True, text=True,
                      timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  saved = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert set(saved["subjects"]) == {"model", "random_init", "box_prior"}
  assert "map50" in saved["subjects"]["model"]["localisation"]
  pictures = saved["subjects"]["model"]["localisation"]["pictures"]
  assert pictures and all(p.startswith("pictures/") and (tmp_path / "eval" / p).is_file() for p in pictures.values())
  assert "](pictures/" in (tmp_path / "eval" / "report.md").read_text()  # links that work from the report
  bad = run(f"--checkpoint={workdir}", "--config.evals.bogus=1")
  assert bad.returncode != 0 and "config key 'evals.bogus' does not exist" in bad.stderr
  missing = run(f"--checkpoint={tmp_path / 'nothere'}")
  assert missing.returncode != 0 and "does not exist" in missing.stderr.strip().splitlines()[-1]

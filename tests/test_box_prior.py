"""Localisation scored with presence confidences, and the image-blind box prior beside the model."""

import json
import math
import os
import types

import numpy as np
import pytest

from avlm_jax import anatomy
from avlm_jax.evaluate import dataset, localisation
from avlm_jax.evaluate.context import EvalContext
from data_pipelines import input_pipeline
from tests.conftest import tiny_config

R = anatomy.NUM_REGIONS


def _iou(a, b):
  """xyxy IoU written out here, independently of metrics.box_iou."""
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return w * h / (area(a) + area(b) - w * h)


def _context(rng, n=12, size=32):
  """An eval set with random boxes, ~25 % of them absent, and a stand-in runner."""
  xy = rng.uniform(0, 16, (n, R, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(4, 16, (n, R, 2))], axis=-1).astype(np.float32)
  present = rng.random((n, R)) < 0.75
  s = dataset.EvalSet("eval", [f"e{i}" for i in range(n)], np.zeros((n, size, size), np.uint8), boxes, present,
                      [[] for _ in range(n)], [None] * n, [{}] * n, size)
  x1, y1, x2, y2 = np.moveaxis(boxes / size, -1, 0)
  enc = {"boxes": np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)}
  return EvalContext(types.SimpleNamespace(name="stand-in"), s, s, encodings={"eval": enc}), present


def test_localisation_ranks_boxes_by_the_presence_logits():
  ctx, present = _context(np.random.default_rng(0))
  # Exact boxes everywhere. Confident where the region is there, not where it is absent: every
  # true positive ranks before every false positive, so AP is 1 at every IoU threshold.
  ctx.encodings["eval"]["presence_logits"] = np.where(present, 4.0, -4.0)
  good = localisation.evaluate(ctx, None)
  assert good["map50"] == pytest.approx(1.0) and good["map50_95"] == pytest.approx(1.0)
  # The reverse: the boxes of absent regions come first and cost precision. IoU and hit rates do
  # not read the confidences.
  ctx.encodings["eval"]["presence_logits"] = np.where(present, -4.0, 4.0)
  bad = localisation.evaluate(ctx, None)
  assert bad["map50"] < 0.9
  for key in ("mean_iou", "mean_hit_rate50", "mean_hit_rate75"):
    assert bad[key] == good[key] == pytest.approx(1.0)
  region = anatomy.REGION_NAMES[0]
  assert bad["per_region"][region]["num_absent"] == int((~present[:, 0]).sum())
  del ctx.encodings["eval"]["presence_logits"]
  with pytest.raises(KeyError, match="stand-in: the model outputs \\['boxes'\\] and no 'presence_logits'"):
    localisation.evaluate(ctx, None)


def test_box_prior_is_the_mean_training_box_scored_like_the_model(synthetic_dir):
  size = tiny_config().data.image_size  # 64; the corpus' images are about 48 px, not square
  train = dataset.load_split(synthetic_dir, "train", size)
  _, eval_set = dataset.threshold_and_eval_sets(synthetic_dir, size)
  assert not train.box_present.all() and not eval_set.box_present.all()  # absent regions on both sides
  # The mean training target of each region (normalised cxcywh where present) and its frequency,
  # from the evaluation loader's letterboxed boxes.
  want_boxes = np.stack([input_pipeline.xyxy_to_normalized_cxcywh(train.boxes[train.box_present[:, r], r], size)
                         .astype(np.float64).mean(0) for r in range(R)])
  prior = localisation.train_box_prior(synthetic_dir, size)
  np.testing.assert_allclose(prior["boxes"], want_boxes, rtol=1e-6)
  np.testing.assert_array_equal(prior["presence"], train.box_present.mean(0))
  assert prior["num_train"] == 64

  res = localisation.box_prior_result(synthetic_dir, eval_set)
  cx, cy, w, h = want_boxes.T
  mean_xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1) * size
  iou = _iou(np.broadcast_to(mean_xyxy, eval_set.boxes.shape), eval_set.boxes.astype(np.float64))
  per_region = [iou[eval_set.box_present[:, r], r] for r in range(R)]
  assert res["mean_iou"] == pytest.approx(np.mean([v.mean() for v in per_region]), rel=1e-5)
  assert res["mean_hit_rate50"] == pytest.approx(np.mean([(v >= 0.5).mean() for v in per_region]))
  assert res["num_train"] == 64 and res["num_eval"] == len(eval_set)
  assert 0 < res["map50"] <= 1 and res["map50_95"] <= res["map50"]
  assert res["prior"]["cardiac silhouette"]["presence"] == pytest.approx(
      train.box_present[:, anatomy.region_id("cardiac silhouette")].mean())
  assert localisation.box_prior_result(None, eval_set)["skipped"].startswith("no train split")


def test_box_prior_is_logged_during_training(tiny_checkpoint):
  workdir, _ = tiny_checkpoint
  saved = json.load(open(os.path.join(workdir, "eval", "box_prior.json")))["localisation"]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [l for l in lines if "eval/box_prior/localisation/mean IoU" in l]
  assert [l["step"] for l in evals] == [2]
  assert evals[0]["eval/box_prior/localisation/mean IoU"] == pytest.approx(saved["mean_iou"])
  assert not math.isnan(evals[0]["eval/localisation/mean IoU"])
  assert evals[0]["eval/box_prior/localisation/mAP@0.5"] == pytest.approx(saved["map50"])

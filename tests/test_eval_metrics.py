"""Metrics on hand-built inputs whose right answers are known, including the undefined cases."""

import json
import math

import numpy as np
import pytest

from avlm_jax.evaluate import metrics


def test_auc_perfect_constant_inverted_and_ties():
  y = np.array([0, 0, 1, 1, 0, 1])
  assert metrics.roc_auc(y, y * 2.0 + 0.1) == 1.0
  assert metrics.roc_auc(y, np.full(6, 0.3)) == 0.5
  assert metrics.roc_auc(y, -y) == 0.0
  # Positives score [0.8, 0.4, 0.4], negatives [0.4, 0.1, 0.9]. Of the 9 pairs, 0.8 wins 2; each
  # 0.4 ties one (0.5) and wins one (1): 2 + 1.5 + 1.5 = 5 of 9.
  s = np.array([0.4, 0.1, 0.8, 0.4, 0.9, 0.4])
  assert metrics.roc_auc(y, s) == pytest.approx(5 / 9)


def test_class_without_positives_is_undefined_not_a_number():
  y = np.zeros(5)
  s = np.linspace(0, 1, 5)
  assert math.isnan(metrics.roc_auc(y, s))
  assert math.isnan(metrics.f1_score(y, s > 0.5))
  assert math.isnan(metrics.balanced_accuracy(y, s > 0.5))
  assert math.isnan(metrics.choose_threshold(y, s))
  report = metrics.binary_report(y, s, y, s)
  assert all(math.isnan(report[k]) for k in ("auc", "balanced_accuracy", "f1", "threshold"))
  assert report["num_positive"] == 0
  # ... and it is null in metrics.json, and skipped (and counted as such) by the means.
  assert json.loads(json.dumps(metrics.to_json(report)))["auc"] is None
  assert metrics.mean_defined([0.5, float("nan"), 1.0]) == (0.75, 2)
  assert math.isnan(metrics.mean_defined([float("nan")])[0])


def test_threshold_is_chosen_on_validation_and_applied_to_eval():
  y_val = np.array([0, 0, 1, 1])
  s_val = np.array([0.1, 0.2, 0.6, 0.7])
  t = metrics.choose_threshold(y_val, s_val, "f1")
  assert 0.2 < t < 0.6 and t == pytest.approx(0.4)
  # On the scored split the same threshold misses one positive (0.35 < 0.4) and admits no negative.
  y_eval = np.array([0, 1, 1, 0])
  s_eval = np.array([0.3, 0.35, 0.9, 0.05])
  r = metrics.binary_report(y_val, s_val, y_eval, s_eval, "youden")
  assert r["threshold"] == pytest.approx(0.4)
  assert r["f1"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 1))
  assert r["balanced_accuracy"] == pytest.approx(0.5 * (0.5 + 1.0))
  assert r["auc"] == 1.0
  with pytest.raises(ValueError, match="threshold criterion 'mcc'"):
    metrics.choose_threshold(y_val, s_val, "mcc")


def test_roc_curve_groups_ties():
  fpr, tpr, thr = metrics.roc_curve([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1])
  np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
  assert thr[0] == np.inf


def test_average_precision_hand_computed():
  # Ranked TP, FP, TP, FP with 3 true objects: precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3.
  # Envelope: 1 on (0, 1/3], 2/3 on (1/3, 2/3] -> AP = 1/3·1 + 1/3·2/3 = 5/9.
  ap = metrics.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], num_gt=3)
  assert ap == pytest.approx(5 / 9)
  # A late true positive is worth less than an early one.
  assert metrics.average_precision([0.9, 0.8], [0, 1], 1) == pytest.approx(0.5)
  assert math.isnan(metrics.average_precision([0.5], [0], 0))


def test_box_iou_and_fixed_query_map():
  a = np.array([0, 0, 10, 10])
  assert metrics.box_iou(a, a) == 1.0
  assert metrics.box_iou(a, [5, 0, 15, 10]) == pytest.approx(50 / 150)
  assert metrics.box_iou(a, [20, 20, 30, 30]) == 0.0
  # Region 0 on 4 images: IoUs 1, 1/3 (shifted by half), 0.6 (cut to 6 of 10 rows), and one
  # image with no true box (ignored). Region 1 never has a box: undefined.
  gt = np.zeros((4, 2, 4))
  gt[:, 0] = [0, 0, 10, 10]
  pred = np.zeros((4, 2, 4))
  pred[0, 0] = [0, 0, 10, 10]          # IoU 1
  pred[1, 0] = [5, 0, 15, 10]          # IoU 1/3
  pred[2, 0] = [0, 0, 10, 6]           # IoU 0.6
  pred[3, 0] = [50, 50, 60, 60]        # image 3: region 0 not annotated
  present = np.array([[1, 0], [1, 0], [1, 0], [0, 0]], bool)
  per = metrics.fixed_query_detection(pred, gt, present)
  assert per[0]["num_boxes"] == 3
  assert per[0]["iou"] == pytest.approx((1 + 1 / 3 + 0.6) / 3)
  # At IoU 0.5 two of three boxes hit: one operating point, AP = (2/3)·(2/3).
  assert per[0]["hit_rate"][0.5] == pytest.approx(2 / 3)
  assert per[0]["ap"][0.5] == pytest.approx(4 / 9)
  # At 0.65 only the perfect box hits; at 0.95 too.
  assert per[0]["ap"][0.65] == pytest.approx(1 / 9)
  assert per[0]["ap"][0.95] == pytest.approx(1 / 9)
  assert math.isnan(per[1]["iou"]) and math.isnan(per[1]["ap"][0.5])
  # With confidences that rank the two hits first, AP at 0.5 is 2/3 (precision 1 up to recall 2/3);
  # ranked hit, miss, hit it is 1/3 + 1/3·2/3.
  per = metrics.fixed_query_detection(pred, gt, present, np.array([[0.9, 0], [0.1, 0], [0.8, 0], [0.5, 0]]))
  assert per[0]["ap"][0.5] == pytest.approx(2 / 3)
  per = metrics.fixed_query_detection(pred, gt, present, np.array([[0.9, 0], [0.8, 0], [0.1, 0], [0.5, 0]]))
  assert per[0]["ap"][0.5] == pytest.approx(1 / 3 + 1 / 3 * (2 / 3))


def test_dice_iou():
  a = np.zeros((4, 4), bool)
  a[:2] = True
  b = np.zeros((4, 4), bool)
  b[1:3] = True
  assert metrics.dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
  assert metrics.dice_iou(a, a) == (1.0, 1.0)
  assert all(math.isnan(v) for v in metrics.dice_iou(np.zeros((2, 2)), np.zeros((2, 2))))


def test_bad_scores_are_refused():
  with pytest.raises(ValueError, match="differ in length"):
    metrics.roc_auc([0, 1], [0.5])
  with pytest.raises(ValueError, match="NaN"):
    metrics.roc_auc([0, 1], [0.5, float("nan")])

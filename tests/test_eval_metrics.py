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


def _brute_force_threshold(y, s, criterion):
  """The pre-issue-12 algorithm: score every candidate threshold separately (O(n²))."""
  y, s = np.asarray(y).astype(bool), np.asarray(s, np.float64)
  if y.all() or not y.any():
    return float("nan")
  distinct = np.unique(s)
  candidates = np.r_[distinct[0] - 1.0, (distinct[1:] + distinct[:-1]) / 2.0, distinct[-1] + 1.0]
  metric = metrics.f1_score if criterion == "f1" else metrics.balanced_accuracy
  values = np.array([metric(y, s >= t) for t in candidates])
  best = np.flatnonzero(values >= np.nanmax(values) - 1e-12)
  return float(candidates[best[len(best) // 2]])


@pytest.mark.parametrize("criterion", metrics.THRESHOLD_CRITERIA)
def test_threshold_from_cumulative_counts_equals_brute_force(criterion):
  rng = np.random.default_rng(0)
  for trial in range(200):
    n = int(rng.integers(2, 60))
    y = rng.random(n) < rng.uniform(0.05, 0.95)
    # Few distinct values, so most trials have ties within and across the classes.
    s = rng.integers(0, int(rng.integers(1, 8)), n) / 4.0 if trial % 2 else rng.normal(size=n)
    want = _brute_force_threshold(y, s, criterion)
    got = metrics.choose_threshold(y, s, criterion)
    assert got == want or (math.isnan(got) and math.isnan(want)), (trial, y, s)
  # Adjacent floats: the midpoint rounds onto one of them; counting must still follow `s >= t`.
  s = np.array([1.0, np.nextafter(1.0, 2.0), 0.5, 2.0])
  for y in ([0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]):
    assert metrics.choose_threshold(y, s, criterion) == _brute_force_threshold(y, s, criterion)
  # One class only: no threshold, whatever the scores.
  assert math.isnan(metrics.choose_threshold(np.ones(7), rng.normal(size=7), criterion))
  assert math.isnan(metrics.choose_threshold(np.zeros(7), rng.normal(size=7), criterion))
  assert math.isnan(metrics.choose_threshold([1], [0.3], criterion))


def test_coco_average_precision_hand_computed():
  # Ranked TP, FP, TP, FP with 3 true objects: precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3,
  # 2/3, made non-increasing: 1, 2/3, 2/3, 1/2. Of the 101 recall points 0..0.33 (34) read 1,
  # 0.34..0.66 (33) read 2/3, and 0.67..1 (34) lie beyond the last recall and read 0.
  ap = metrics.coco_average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], num_gt=3)
  assert ap == pytest.approx((34 + 33 * 2 / 3) / 101)
  # A late true positive is worth less than an early one; all hits give exactly 1.
  assert metrics.coco_average_precision([0.9, 0.8], [0, 1], 1) == pytest.approx(0.5)
  assert metrics.coco_average_precision([0.9, 0.8], [1, 0], 1) == 1.0
  # Tied scores keep the order given (pycocotools: image order), like a stable sort.
  assert metrics.coco_average_precision([0.5, 0.5], [0, 1], 1) == pytest.approx(0.5)
  assert metrics.coco_average_precision([0.5, 0.5], [1, 0], 1) == 1.0
  assert metrics.coco_average_precision([], [], 2) == 0.0
  assert math.isnan(metrics.coco_average_precision([0.5], [0], 0))
  with pytest.raises(ValueError, match="3 true positives for num_gt=2"):
    metrics.coco_average_precision([0.1, 0.2, 0.3], [1, 1, 1], 2)


def test_box_iou_and_fixed_query_detection():
  a = np.array([0, 0, 10, 10])
  assert metrics.box_iou(a, a) == 1.0
  assert metrics.box_iou(a, [5, 0, 15, 10]) == pytest.approx(50 / 150)
  assert metrics.box_iou(a, [20, 20, 30, 30]) == 0.0
  # Region 0 on 4 images: IoUs 1, 1/3 (shifted by half), 0.6 (cut to 6 of 10 rows), and image 3
  # without that region, where the token's box is a false positive. Region 1 never has a box.
  gt = np.zeros((4, 2, 4))
  gt[:, 0] = [0, 0, 10, 10]
  pred = np.zeros((4, 2, 4))
  pred[0, 0] = [0, 0, 10, 10]          # IoU 1
  pred[1, 0] = [5, 0, 15, 10]          # IoU 1/3
  pred[2, 0] = [0, 0, 10, 6]           # IoU 0.6
  pred[3, 0] = [0, 0, 10, 10]          # region absent on image 3: a false positive at any IoU
  present = np.array([[1, 0], [1, 0], [1, 0], [0, 0]], bool)
  # The absent region is the least confident: hit, hit, miss, absent. At IoU 0.5 precision is 1 up
  # to recall 2/3, so the 67 recall points 0..0.66 read 1.
  scores = np.array([[0.9, 0.0], [0.1, 0.0], [0.8, 0.0], [0.05, 0.0]])
  per = metrics.fixed_query_detection(pred, gt, present, scores)
  assert per[0]["num_boxes"] == 3
  assert per[0]["iou"] == pytest.approx((1 + 1 / 3 + 0.6) / 3)
  assert per[0]["hit_rate"][0.5] == pytest.approx(2 / 3) and per[0]["hit_rate"][0.75] == pytest.approx(1 / 3)
  assert per[0]["ap"][0.5] == pytest.approx(67 / 101)
  # At 0.65 only the perfect box hits (ranked first): precision 1 up to recall 1/3.
  assert per[0]["ap"][0.65] == pytest.approx(34 / 101)
  # The absent region made most confident costs precision: FP, hit, hit, miss -> 2/3 up to 2/3.
  scores[3, 0] = 0.95
  per = metrics.fixed_query_detection(pred, gt, present, scores)
  assert per[0]["ap"][0.5] == pytest.approx(67 * (2 / 3) / 101)
  # The hit rate and IoU do not look at the scores; a region without a true box has no AP even
  # though it has detections.
  assert per[0]["hit_rate"][0.5] == pytest.approx(2 / 3)
  assert math.isnan(per[1]["iou"]) and math.isnan(per[1]["ap"][0.5]) and math.isnan(per[1]["hit_rate"][0.5])
  with pytest.raises(ValueError, match=r"scores \(4,\) must be \(N, R\) = \(4, 2\)"):
    metrics.fixed_query_detection(pred, gt, present, scores[:, 0])
  with pytest.raises(ValueError, match="NaN or infinite"):
    metrics.fixed_query_detection(pred, gt, present, np.full((4, 2), np.nan))


def _random_detection_problem(rng, n=60, r=6):
  """Boxes in a 64-pixel image. Region r-1 never has a true box; elsewhere ~30 % are absent.
  Predictions are the true boxes jittered (IoUs spread over 0..1); scores take 5 values (ties)."""
  xy = rng.uniform(0, 40, (n, r, 2))
  gt = np.concatenate([xy, xy + rng.uniform(4, 24, (n, r, 2))], axis=-1)
  pred = gt + rng.normal(0, 1, (n, r, 1)) * rng.uniform(0, 6, (n, r, 4))
  pred[..., 2:] = np.maximum(pred[..., 2:], pred[..., :2] + 0.5)
  present = rng.random((n, r)) < 0.7
  present[:, -1] = False
  scores = rng.integers(0, 5, (n, r)) / 4.0
  return pred, gt, present, scores


def _pycocotools_ap(pred, gt, present, scores):
  """(T, R) AP from pycocotools' COCOeval on the same problem, NaN for a category without
  ground truth. Area range 'all', maxDets 100 (one detection per image and region here)."""
  import contextlib
  import io

  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  n, r = present.shape
  xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
  anns = []
  for i, k in zip(*np.nonzero(present)):
    x, y, w, h = xywh(gt[i, k])
    anns.append({"id": len(anns) + 1, "image_id": int(i) + 1, "category_id": int(k) + 1,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {"images": [{"id": i + 1} for i in range(n)], "annotations": anns,
                       "categories": [{"id": k + 1} for k in range(r)]}
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes([{"image_id": i + 1, "category_id": k + 1, "bbox": xywh(pred[i, k]),
                                "score": float(scores[i, k])} for i in range(n) for k in range(r)])
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    assert ev.params.areaRngLbl[0] == "all" and ev.params.maxDets[-1] >= 1
    ev.evaluate()
    ev.accumulate()
  precision = ev.eval["precision"][:, :, :, 0, -1]  # (T, recall points, K)
  ap = precision.mean(axis=1)
  return np.where((precision > -1).all(axis=1), ap, np.nan), ev.params.iouThrs


def test_fixed_query_detection_equals_pycocotools():
  pytest.importorskip("pycocotools", reason="pycocotools (the `test` extra) checks COCO AP; pip install pycocotools")
  for seed in range(3):
    pred, gt, present, scores = _random_detection_problem(np.random.default_rng(seed))
    want, thresholds = _pycocotools_ap(pred, gt, present, scores)
    np.testing.assert_allclose(thresholds, metrics.COCO_IOU_THRESHOLDS)
    per = metrics.fixed_query_detection(pred, gt, present, scores)
    got = np.array([[r["ap"][t] for r in per] for t in metrics.COCO_IOU_THRESHOLDS])
    assert np.isnan(got[:, -1]).all() and np.isnan(want[:, -1]).all()  # the region with no box
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # Not a degenerate problem: APs spread from near 0 (IoU 0.95) to well above.
    assert np.nanmin(got) < 0.05 and 0.2 < np.nanmax(got) < 0.95
    # mAP as COCO summarises it: the mean over thresholds and categories with ground truth.
    assert np.nanmean(got) == pytest.approx(np.nanmean(want))


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

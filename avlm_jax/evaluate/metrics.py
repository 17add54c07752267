"""Classification and detection metrics in numpy, with undefined values kept undefined.

A metric that has no meaning on the data it is given (AUC or F1 of a class with no positives,
balanced accuracy of a class with no negatives, AP of a region with no true box) is NaN here,
never 0 or 0.5, and `to_json` turns NaN into `null` in metrics.json. Means over classes skip
undefined entries and say how many they averaged (`mean_defined`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

NAN = float("nan")
THRESHOLD_CRITERIA = ("f1", "youden")
# COCO's localisation thresholds: 0.50, 0.55, ..., 0.95.
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# COCO's recall points for interpolated precision, computed as pycocotools does (0, 0.01, ..., 1).
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _binary(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
  y = np.asarray(y_true).astype(bool).ravel()
  s = np.asarray(scores, np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
  if not np.all(np.isfinite(s)):
    raise ValueError("scores hold NaN or infinite values")
  return y, s


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of `x`, tied values sharing the mean of their ranks."""
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  ranks = np.empty(len(x), np.float64)
  for a, b in zip(starts, ends):
    ranks[order[a:b]] = (a + b + 1) / 2.0
  return ranks


def roc_auc(y_true: Any, scores: Any) -> float:
  """Area under the ROC curve (Mann–Whitney U with tie-averaged ranks: a constant scorer gives
  exactly 0.5). NaN when either class is absent."""
  y, s = _binary(y_true, scores)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return NAN
  ranks = average_ranks(s)
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds), one point per distinct score (predict positive when score >=
  threshold), starting at (0, 0). NaN rates for an absent class."""
  y, s = _binary(y_true, scores)
  order = np.argsort(-s, kind="mergesort")
  s, y = s[order], y[order]
  last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each tie group
  tp = np.cumsum(y)[last].astype(np.float64)
  fp = np.cumsum(~y)[last].astype(np.float64)
  n_pos, n_neg = tp[-1] if len(tp) else 0.0, fp[-1] if len(fp) else 0.0
  tpr = np.r_[0.0, tp / n_pos] if n_pos else np.full(len(tp) + 1, NAN)
  fpr = np.r_[0.0, fp / n_neg] if n_neg else np.full(len(fp) + 1, NAN)
  return fpr, tpr, np.r_[np.inf, s[last]]


def confusion(y_true: Any, y_pred: Any) -> tuple[int, int, int, int]:
  """(tp, fp, fn, tn)."""
  y = np.asarray(y_true).astype(bool).ravel()
  p = np.asarray(y_pred).astype(bool).ravel()
  return int((y & p).sum()), int((~y & p).sum()), int((y & ~p).sum()), int((~y & ~p).sum())


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
  """(sensitivity + specificity) / 2; NaN when either class is absent."""
  tp, fp, fn, tn = confusion(y_true, y_pred)
  if tp + fn == 0 or tn + fp == 0:
    return NAN
  return 0.5 * (tp / (tp + fn) + tn / (tn + fp))


def f1_score(y_true: Any, y_pred: Any) -> float:
  """2·TP / (2·TP + FP + FN); NaN when the class has no positives (there is nothing to find)."""
  tp, fp, fn, _ = confusion(y_true, y_pred)
  if tp + fn == 0:
    return NAN
  return 2.0 * tp / (2.0 * tp + fp + fn)


def choose_threshold(y_true: Any, scores: Any, criterion: str = "f1") -> float:
  """The decision threshold that maximises `criterion` on these (validation) scores.

  Candidates are midpoints between consecutive distinct scores, plus one below and one above all
  of them; among equally good thresholds (within 1e-12) the middle one is taken. NaN when either
  class is absent: such a split cannot choose a threshold.

  O(n log n): each candidate's TP and FP counts (scores >= candidate) come from binary searches
  in the sorted positive and negative scores, so every candidate is scored at once.
  """
  if criterion not in THRESHOLD_CRITERIA:
    raise ValueError(f"threshold criterion {criterion!r}; expected one of {list(THRESHOLD_CRITERIA)}")
  y, s = _binary(y_true, scores)
  if y.all() or not y.any():
    return NAN
  distinct = np.unique(s)
  candidates = np.r_[distinct[0] - 1.0, (distinct[1:] + distinct[:-1]) / 2.0, distinct[-1] + 1.0]
  pos, neg = np.sort(s[y]), np.sort(s[~y])
  # Counting against the candidate values themselves (not the tie groups) keeps `s >= t` exact
  # even where a midpoint of two adjacent floats rounds onto one of them.
  tp = (len(pos) - np.searchsorted(pos, candidates, side="left")).astype(np.float64)
  fp = (len(neg) - np.searchsorted(neg, candidates, side="left")).astype(np.float64)
  fn, tn = len(pos) - tp, len(neg) - fp
  # The same expressions as f1_score / balanced_accuracy, so ties between candidates break alike.
  if criterion == "f1":
    values = 2.0 * tp / (2.0 * tp + fp + fn)
  else:
    values = 0.5 * (tp / (tp + fn) + tn / (tn + fp))
  best = np.flatnonzero(values >= np.max(values) - 1e-12)
  return float(candidates[best[len(best) // 2]])


def binary_report(y_val: Any, s_val: Any, y_eval: Any, s_eval: Any, criterion: str = "f1") -> dict[str, Any]:
  """AUC on the evaluation split; balanced accuracy and F1 there at the threshold chosen on the
  validation split. An undefined threshold makes both thresholded metrics undefined."""
  y_eval = np.asarray(y_eval).astype(bool)
  s_eval = np.asarray(s_eval, np.float64)
  threshold = choose_threshold(y_val, s_val, criterion)
  defined = math.isfinite(threshold)
  pred = s_eval >= threshold if defined else None
  return {
      "auc": roc_auc(y_eval, s_eval),
      "balanced_accuracy": balanced_accuracy(y_eval, pred) if defined else NAN,
      "f1": f1_score(y_eval, pred) if defined else NAN,
      "threshold": threshold,
      "num_positive": int(y_eval.sum()),
      "num_negative": int((~y_eval).sum()),
  }


def mean_defined(values: Sequence[float]) -> tuple[float, int]:
  """(mean of the finite values, how many there were); (NaN, 0) when none is defined."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  return (float(v.mean()) if len(v) else NAN), int(len(v))


# --- boxes -----------------------------------------------------------------------------------------
def box_iou(a: Any, b: Any) -> np.ndarray:
  """Element-wise IoU of xyxy boxes a (..., 4) and b (..., 4); 0 where the union is empty."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = iw * ih
  area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def coco_average_precision(scores: Any, is_tp: Any, num_gt: int) -> float:
  """COCO's AP of one category at one IoU threshold, as pycocotools' COCOeval.accumulate computes it.

  Detections are ranked by descending score with a stable sort, so tied detections keep the
  order they are given in (pycocotools: image order). Precision is made non-increasing from the
  right and read at the 101 recall points 0, 0.01, ..., 1; a recall point beyond the highest
  recall reached counts 0. NaN when there is no ground truth (COCO leaves such a category out).
  """
  if num_gt <= 0:
    return NAN
  s = np.asarray(scores, np.float64).ravel()
  hits = np.asarray(is_tp).astype(bool).ravel()
  if s.shape != hits.shape:
    raise ValueError(f"scores {s.shape} and true-positive flags {hits.shape} differ in length")
  if int(hits.sum()) > num_gt:
    raise ValueError(f"{int(hits.sum())} true positives for num_gt={num_gt} ground-truth boxes")
  if len(s) == 0:
    return 0.0
  hits = hits[np.argsort(-s, kind="mergesort")]
  tp = np.cumsum(hits).astype(np.float64)
  fp = np.cumsum(~hits).astype(np.float64)
  recall = tp / num_gt
  envelope = np.maximum.accumulate((tp / (tp + fp))[::-1])[::-1]
  at = np.searchsorted(recall, COCO_RECALL_POINTS, side="left")
  return float(np.where(at < len(s), envelope[np.minimum(at, len(s) - 1)], 0.0).mean())


def fixed_query_detection(pred: Any, gt: Any, present: Any, scores: Any,
                          iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS) -> list[dict[str, Any]]:
  """COCO-style detection scores when query m always predicts region m.

  pred, gt: (N, R, 4) xyxy boxes; present: (N, R) bool, region r has a true box on image n;
  scores: (N, R) finite confidences (any monotone transform of them gives the same APs).
  Each region is a category and each image gives exactly one detection per region: its box with
  its score. At IoU threshold t a detection is a true positive when its image has that region's
  box and their IoU is >= t; otherwise it is a false positive, in particular every detection on
  an image without that region's box (so a confident box for an absent region costs precision).
  AP per region is `coco_average_precision` over the N detections in image order, which equals
  pycocotools' bbox AP with area range 'all' and maxDets >= 1.

  Returns per region: `ap` {t: AP} (NaN without any true box), `iou` (mean over true boxes),
  `hit_rate` {t: fraction of true boxes with IoU >= t} (score-free), `num_boxes`.
  """
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  present = np.asarray(present, bool)
  scores = np.asarray(scores, np.float64)
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 4:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (N, R, 4) xyxy boxes")
  if present.shape != pred.shape[:2] or scores.shape != pred.shape[:2]:
    raise ValueError(f"present {present.shape} and scores {scores.shape} must be (N, R) = {pred.shape[:2]}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("detection scores hold NaN or infinite values")
  iou = box_iou(pred, gt)
  out = []
  for r in range(present.shape[1]):
    m = present[:, r]
    n = int(m.sum())
    out.append({
        "iou": float(iou[m, r].mean()) if n else NAN,
        "ap": {t: coco_average_precision(scores[:, r], m & (iou[:, r] >= t), n) for t in iou_thresholds},
        "hit_rate": {t: float((iou[m, r] >= t).mean()) if n else NAN for t in iou_thresholds},
        "num_boxes": n,
    })
  return out


# --- masks -----------------------------------------------------------------------------------------
def dice_iou(pred: Any, true: Any) -> tuple[float, float]:
  """Dice and IoU of two binary masks; both NaN when both masks are empty (nothing to overlap)."""
  p, t = np.asarray(pred).astype(bool), np.asarray(true).astype(bool)
  inter, ps, ts = float((p & t).sum()), float(p.sum()), float(t.sum())
  if ps + ts == 0:
    return NAN, NAN
  return 2 * inter / (ps + ts), inter / (ps + ts - inter)


def to_json(tree: Any) -> Any:
  """A metrics tree with numpy scalars made plain and NaN/inf made None (JSON null)."""
  if isinstance(tree, dict):
    return {str(k): to_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_json(v) for v in tree]
  if isinstance(tree, np.ndarray):
    return to_json(tree.tolist())
  if isinstance(tree, (np.bool_, bool)):
    return bool(tree)
  if isinstance(tree, (np.integer, int)):
    return int(tree)
  if isinstance(tree, (np.floating, float)):
    return float(tree) if math.isfinite(tree) else None
  return tree

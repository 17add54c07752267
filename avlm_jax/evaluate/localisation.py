"""Anatomy localisation: COCO-style box AP per region with the presence head's confidences, and
the score-free hit rates and IoU beside it; plus the box prior, which never looks at the image.

Each of the 29 regions is a COCO category. Every image gives exactly one detection per region,
anatomy token m's box, with confidence sigmoid(presence_logit[m]) (ranked by the logit itself:
the same order, without ties made by float saturation). A detection on an image where the region
has no true box is a false positive, so a confident box for an absent region costs precision.
AP at IoU t follows pycocotools (area 'all', 101 recall points; `metrics.fixed_query_detection`,
checked against pycocotools in tests/test_eval_metrics.py). Reported:
  * per region: `ap50`, `ap50_95` (AP averaged over IoU 0.5:0.05:0.95), `iou` (mean over the
    true boxes), `hit_rate50` / `hit_rate75` (fraction of true boxes with IoU >= 0.5 / 0.75, no
    confidences involved), `num_boxes`, `num_absent` (images whose detection can only be a FP);
  * means over regions with at least one true box: `map50`, `map50_95`, `mean_iou`,
    `mean_hit_rate50`, `mean_hit_rate75` (each with `num_defined_<name>`).

The box prior (`box_prior_result`) predicts, for every image, each region's mean training box
(normalised cxcywh averaged over the train split's records that have it) with confidence = the
region's presence frequency in training. It is scored by `score_boxes`, the model's own path.
Its confidences tie within a region, so, as in pycocotools, its detections are ranked in the
eval set's image order: its AP is that of one arbitrary ordering, its IoU and hit rates are exact.
"""

from __future__ import annotations

import io
import time
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from avlm_jax import anatomy
from avlm_jax.evaluate import metrics, pictures
from avlm_jax.evaluate.context import EvalContext
from avlm_jax.evaluate.dataset import EvalSet
from data_pipelines import input_pipeline, schema

# (name in a region's result, name of the mean over regions)
_MEANS = (("iou", "mean_iou"), ("ap50", "map50"), ("ap50_95", "map50_95"),
          ("hit_rate50", "mean_hit_rate50"), ("hit_rate75", "mean_hit_rate75"))


def score_boxes(s: EvalSet, boxes: np.ndarray, confidence: np.ndarray) -> dict[str, Any]:
  """The localisation result for predicted boxes (N, R, 4) normalised cxcywh with confidences
  (N, R) (any monotone scale: logits or probabilities) on the eval set `s`."""
  boxes, confidence = np.asarray(boxes), np.asarray(confidence)
  want = (len(s), anatomy.NUM_REGIONS)
  if boxes.shape != want + (4,) or confidence.shape != want:
    raise ValueError(f"boxes {boxes.shape} and confidences {confidence.shape}; expected {want + (4,)} and {want}")
  pred = pictures.cxcywh_to_xyxy(boxes, s.image_size)
  per = metrics.fixed_query_detection(pred, s.boxes, s.box_present, confidence)
  per_region = {}
  for name, r, absent in zip(anatomy.REGION_NAMES, per, (~s.box_present).sum(0)):
    defined = r["num_boxes"] > 0
    per_region[name] = {
        "iou": r["iou"], "ap50": r["ap"][0.5],
        "ap50_95": float(np.mean(list(r["ap"].values()))) if defined else metrics.NAN,
        "hit_rate50": r["hit_rate"][0.5], "hit_rate75": r["hit_rate"][0.75],
        "num_boxes": r["num_boxes"], "num_absent": int(absent)}
  out: dict[str, Any] = {"per_region": per_region, "eval_split": s.name, "num_eval": len(s)}
  for key, name in _MEANS:
    out[name], out[f"num_defined_{name}"] = metrics.mean_defined([v[key] for v in per_region.values()])
  return out


def evaluate(ctx: EvalContext, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  del cfg
  s = ctx.eval_set
  enc = ctx.encoded("eval")
  if "presence_logits" not in enc:
    raise KeyError(f"{ctx.runner.name}: the model outputs {sorted(enc)} and no 'presence_logits'; "
                   "detection AP ranks each region's box by its presence logit")
  out = score_boxes(s, enc["boxes"], enc["presence_logits"])
  ctx.keep("localisation", iou=metrics.box_iou(pictures.cxcywh_to_xyxy(enc["boxes"], s.image_size), s.boxes),
           present=s.box_present, confidence=enc["presence_logits"])
  path = ctx.picture("boxes")
  if path and len(s):
    pred = pictures.cxcywh_to_xyxy(enc["boxes"][0], s.image_size)
    pictures.save(pictures.boxes_figure(s.images[0], pred, s.boxes[0], s.box_present[0],
                                        title=f"{s.ids[0]}: predicted (solid) and true (dashed) boxes"), path)
    out["pictures"] = {"boxes": path}
  return out


def _letterboxed_boxes(image_bytes: bytes, boxes: np.ndarray, size: int, where: str) -> np.ndarray:
  """`boxes` as `input_pipeline.letterbox` maps them to the size-`size` square, from the image's
  header alone (its pixels are never decoded: the prior needs only the geometry)."""
  try:
    with Image.open(io.BytesIO(image_bytes)) as im:
      w, h = im.size
  except Exception as e:  # PIL raises many types for corrupt/truncated files.
    raise schema.RecordError(f"{where}: image header does not decode ({type(e).__name__}: {e})") from e
  # The same arithmetic as input_pipeline.letterbox (tests check both agree on a real split).
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  top, left = (size - nh) // 2, (size - nw) // 2
  sx, sy = nw / w, nh / h
  return boxes * np.array([sx, sy, sx, sy], np.float32) + np.array([left, top, left, top], np.float32)


def train_box_prior(train_dir: str, image_size: int) -> dict[str, Any]:
  """Each region's mean training box and presence frequency over the `train` split of `train_dir`.

  Returns `boxes` (R, 4) normalised cxcywh, the mean of the training targets (letterboxed to
  `image_size`, as the input pipeline makes them) over the records that have the region's box,
  or a zero-size box at the centre for a region never present; `presence` (R,) the fraction of
  records that have it; `num_train` the number of records.
  """
  source = input_pipeline.TripleSource(schema.shard_paths(train_dir, "train"))
  n = len(source)
  if n == 0:
    raise ValueError(f"{train_dir!r}: the train split has no records to take the box prior from")
  total = np.zeros((anatomy.NUM_REGIONS, 4), np.float64)
  count = np.zeros(anatomy.NUM_REGIONS, np.int64)
  for i in range(n):
    shard, local = source.locate(i)
    where = f"{shard}, record {local}"
    try:
      t = schema.decode(source[i][1])
    except schema.RecordError as e:
      raise schema.RecordError(f"{where}: {e}") from e
    b = _letterboxed_boxes(t.image, t.boxes, image_size, f"{where} ({t.id!r})")
    # Present as the evaluation set and the training targets define it: a box left after letterboxing.
    ok = t.box_present & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    total[ok] += input_pipeline.xyxy_to_normalized_cxcywh(b[ok], image_size)
    count += ok
  boxes = np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], [0.5, 0.5, 0.0, 0.0])
  return {"boxes": boxes, "presence": count / n, "num_train": n}


def box_prior_result(train_dir: str | None, s: EvalSet) -> dict[str, Any]:
  """The localisation result of the box prior on eval set `s` (skipped without a train split)."""
  t0 = time.perf_counter()
  if train_dir is None:
    return {"skipped": "no train split beside the evaluation data to take the mean boxes from", "seconds": 0.0}
  prior = train_box_prior(train_dir, s.image_size)
  n = len(s)
  out = score_boxes(s, np.broadcast_to(prior["boxes"], (n,) + prior["boxes"].shape),
                    np.broadcast_to(prior["presence"], (n, anatomy.NUM_REGIONS)))
  out["num_train"] = prior["num_train"]
  out["prior"] = {name: {"box_cxcywh": prior["boxes"][r], "presence": float(prior["presence"][r])}
                  for r, name in enumerate(anatomy.REGION_NAMES)}
  out["seconds"] = time.perf_counter() - t0
  return out

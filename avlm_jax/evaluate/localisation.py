"""Anatomy localisation: per-region IoU of the predicted boxes, mean IoU, and box mAP at IoU 0.5
and averaged over 0.5:0.95 (COCO's thresholds).

Anatomy token m always predicts region m and gives no confidence, so every box scores 1 and a
region's AP at threshold t is (fraction of its boxes with IoU >= t)² (metrics.fixed_query_detection);
the hit rates themselves are reported beside it. Regions without a true box are not counted.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from avlm_jax import anatomy
from avlm_jax.evaluate import metrics, pictures
from avlm_jax.evaluate.context import EvalContext


def evaluate(ctx: EvalContext, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  del cfg
  s = ctx.eval_set
  pred = pictures.cxcywh_to_xyxy(ctx.encoded("eval")["boxes"], s.image_size)
  per = metrics.fixed_query_detection(pred, s.boxes, s.box_present)
  thresholds = metrics.COCO_IOU_THRESHOLDS
  per_region = {}
  for name, r in zip(anatomy.REGION_NAMES, per):
    per_region[name] = {
        "iou": r["iou"], "ap50": r["ap"][0.5],
        "ap50_95": float(np.mean([r["ap"][t] for t in thresholds])) if r["num_boxes"] else metrics.NAN,
        "hit_rate50": r["hit_rate"][0.5], "num_boxes": r["num_boxes"]}
  out: dict[str, Any] = {"per_region": per_region, "eval_split": s.name, "num_eval": len(s)}
  for key, name in (("iou", "mean_iou"), ("ap50", "map50"), ("ap50_95", "map50_95"), ("hit_rate50", "mean_hit_rate50")):
    out[name], out[f"num_defined_{name}"] = metrics.mean_defined([v[key] for v in per_region.values()])
  path = ctx.picture("boxes")
  if path and len(s):
    pictures.save(pictures.boxes_figure(s.images[0], pred[0], s.boxes[0], s.box_present[0],
                                        title=f"{s.ids[0]}: predicted (solid) and true (dashed) boxes"), path)
    out["pictures"] = {"boxes": path}
  return out

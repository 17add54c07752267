"""Zero-shot anatomy-wise interpretation: each of the 29 region embeddings against finding texts.

For region r and finding f the score is the region's preference for "<f> in the <r>" over
"no <f> in the <r>" (see scoring.py). Ground truth is the records' `region_findings`; records
without them are left out (and a folder with none is reported as skipped, not as a score).
Reports the region × finding table and, pooling the table's cells, per-region and per-finding
AUC, balanced accuracy and F1 (thresholds chosen on the threshold split, per cell or per pool).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from avlm_jax import anatomy
from avlm_jax.evaluate import metrics, pictures, scoring
from avlm_jax.evaluate.context import EvalContext

METRICS = ("auc", "balanced_accuracy", "f1")


def region_scores(ctx: EvalContext, which: str, findings: list[str], cfg) -> np.ndarray:
  pos_t, neg_t = scoring.region_texts(findings, cfg.positive_template, cfg.negative_template)
  max_len = ctx.runner.config.data.max_phrase_len
  shape = (anatomy.NUM_REGIONS, len(findings), -1)
  pos = ctx.runner.embed_texts(pos_t, max_len).reshape(shape)
  neg = ctx.runner.embed_texts(neg_t, max_len).reshape(shape)
  return scoring.region_probabilities(ctx.encoded(which)["region_emb"], pos, neg,
                                      ctx.runner.scales["region_scale"])


def _means(reports: dict[str, dict]) -> dict[str, Any]:
  out = {}
  for m in METRICS:
    out[f"mean_{m}"], out[f"num_defined_{m}"] = metrics.mean_defined([r[m] for r in reports.values()])
  return out


def evaluate(ctx: EvalContext, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  config = ctx.runner.config
  findings = scoring.check_findings(cfg.findings or config.labels, "config.evals.zeroshot_anatomy.findings")
  y_thr, k_thr = ctx.threshold_set.region_labels(findings)
  y_eval, k_eval = ctx.eval_set.region_labels(findings)
  if len(k_thr) == 0 or len(k_eval) == 0:
    return {"skipped": "the dataset's records carry no region_findings", **ctx.splits()}
  p_thr = region_scores(ctx, "threshold", findings, cfg)[k_thr]
  p_eval = region_scores(ctx, "eval", findings, cfg)[k_eval]
  crit = cfg.threshold_criterion
  table = {region: {f: metrics.binary_report(y_thr[:, r, c], p_thr[:, r, c], y_eval[:, r, c],
                                             p_eval[:, r, c], crit)
                    for c, f in enumerate(findings)}
           for r, region in enumerate(anatomy.REGION_NAMES)}
  per_region = {region: metrics.binary_report(y_thr[:, r], p_thr[:, r], y_eval[:, r], p_eval[:, r], crit)
                for r, region in enumerate(anatomy.REGION_NAMES)}
  per_finding = {f: metrics.binary_report(y_thr[:, :, c], p_thr[:, :, c], y_eval[:, :, c], p_eval[:, :, c], crit)
                 for c, f in enumerate(findings)}
  out: dict[str, Any] = {
      "findings": findings, "num_threshold_with_labels": int(len(k_thr)),
      "num_eval_with_labels": int(len(k_eval)), **ctx.splits(),
      "per_region": per_region, "per_finding": per_finding, "table": table,
      "region_means": _means(per_region), "finding_means": _means(per_finding),
  }
  if ctx.picture_dir:
    auc = np.array([[table[r][f]["auc"] for f in findings] for r in anatomy.REGION_NAMES], np.float64)
    mean_p = p_eval.mean(axis=0)
    paths = {"table_auc": ctx.picture("region_finding_auc"), "table_score": ctx.picture("region_finding_score"),
             "heat_overlay": ctx.picture("region_heat_overlay")}
    pictures.save(pictures.table_heatmap(auc, anatomy.REGION_NAMES, findings,
                                         "Zero-shot anatomy-wise AUC (blank: undefined)", vmin=0, vmax=1), paths["table_auc"])
    pictures.save(pictures.table_heatmap(mean_p, anatomy.REGION_NAMES, findings,
                                         "Mean region finding probability", vmin=0, vmax=1), paths["table_score"])
    i = int(k_eval[int(np.argmax(y_eval.sum(axis=(1, 2))))])  # the example with most region findings
    boxes = pictures.cxcywh_to_xyxy(ctx.encoded("eval")["boxes"][i], ctx.eval_set.image_size)
    pictures.save(pictures.region_heat_figure(ctx.eval_set.images[i], boxes, p_eval[list(k_eval).index(i)], findings,
                                              title=f"{ctx.eval_set.ids[i]}: top finding per region"), paths["heat_overlay"])
    out["pictures"] = paths
  return out

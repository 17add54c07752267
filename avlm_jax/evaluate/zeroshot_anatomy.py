"""Zero-shot anatomy-wise interpretation: each of the 29 region embeddings against finding texts.

For region r and finding f the score is the region's preference for "<f> in the <r>" over
"no <f> in the <r>" (see scoring.py; `config.evals.zeroshot_anatomy` templates, wording the
region-text sampler also writes). Ground truth is the records' `region_findings`; records without
them are left out (and a folder with none is reported as skipped, not as a score). Reports the
region × finding table and, pooling the table's cells, per-region and per-finding AUC, balanced
accuracy and F1 (thresholds chosen on the threshold split, per cell or per pool).

`heldout_wording` scores the same way with the knowledge base's held-out statements
(`eval_templates['region']` pairs × the finding's `eval_synonyms`, wording no training text uses):
a cell's preference is the mean over that ensemble of cos(r, positive) − cos(r, negative). It
holds the pooled reports (per region, per finding, their means), not the 29 × F table.

`label_frequency_result` scores the image-blind baseline (label_frequency.py) the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import ml_collections
import numpy as np

from avlm_jax import anatomy
from avlm_jax.evaluate import metrics, pictures, scoring
from avlm_jax.evaluate.context import EvalContext
from avlm_jax.knowledge import load_knowledge_base

if TYPE_CHECKING:
  from avlm_jax.evaluate.label_frequency import LabelCounts

METRICS = ("auc", "balanced_accuracy", "f1")
WHERE = "config.evals.zeroshot_anatomy.findings"


def _region_probabilities(ctx: EvalContext, pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
  """(R, F, E) positive and negative text embeddings -> 'threshold'/'eval' (N, R, F) probabilities."""
  return {w: scoring.region_probabilities(ctx.encoded(w)["region_emb"], pos, neg, ctx.runner.scales["region_scale"])
          for w in ("threshold", "eval")}


def region_scores(ctx: EvalContext, findings: list[str], cfg) -> dict[str, np.ndarray]:
  """Train wording: the config's positive/negative templates filled with the finding names."""
  pos_t, neg_t = scoring.region_texts(findings, cfg.positive_template, cfg.negative_template)
  max_len = ctx.runner.config.data.max_phrase_len
  shape = (anatomy.NUM_REGIONS, len(findings), -1)
  pos = ctx.runner.embed_texts(pos_t, max_len, kind="phrase").reshape(shape)
  neg = ctx.runner.embed_texts(neg_t, max_len, kind="phrase").reshape(shape)
  return _region_probabilities(ctx, pos, neg)


def heldout_region_scores(ctx: EvalContext, findings: list[str]) -> dict[str, np.ndarray] | str:
  """Held-out wording: each cell's ensemble of held-out (positive, negative) statements, averaged;
  or why it cannot be scored (a finding without held-out wording in the knowledge base)."""
  kb = load_knowledge_base()
  try:
    pairs = [kb.heldout_region_texts(f, region) for region in anatomy.REGION_NAMES for f in findings]
  except ValueError as e:
    return str(e)
  sizes = np.array([len(cell) for cell in pairs])  # findings may hold different numbers of synonyms
  starts = np.r_[0, np.cumsum(sizes)[:-1]]
  max_len = ctx.runner.config.data.max_phrase_len
  means = []
  for side in (0, 1):  # positives, then negatives
    emb = ctx.runner.embed_texts([p[side] for cell in pairs for p in cell], max_len, kind="phrase")
    means.append(np.add.reduceat(np.asarray(emb, np.float64), starts, axis=0) / sizes[:, None])
  shape = (anatomy.NUM_REGIONS, len(findings), -1)
  # The mean of cos(r, p_i) - cos(r, n_i) is cos(r, ·) with the un-normalised mean embeddings.
  return _region_probabilities(ctx, means[0].reshape(shape), means[1].reshape(shape))


def _means(reports: dict[str, dict]) -> dict[str, Any]:
  out = {}
  for m in METRICS:
    out[f"mean_{m}"], out[f"num_defined_{m}"] = metrics.mean_defined([r[m] for r in reports.values()])
  return out


def score(findings: Sequence[str], y_thr: np.ndarray, p_thr: np.ndarray, y_eval: np.ndarray, p_eval: np.ndarray,
          criterion: str, table: bool = True) -> dict[str, Any]:
  """Reports from (M, R, F) labels and probabilities on the threshold and scored splits: the one
  scoring path of the model, its baselines and both wordings."""
  out: dict[str, Any] = {}
  out["per_region"] = {region: metrics.binary_report(y_thr[:, r], p_thr[:, r], y_eval[:, r], p_eval[:, r], criterion)
                       for r, region in enumerate(anatomy.REGION_NAMES)}
  out["per_finding"] = {f: metrics.binary_report(y_thr[:, :, c], p_thr[:, :, c], y_eval[:, :, c], p_eval[:, :, c],
                                                 criterion)
                        for c, f in enumerate(findings)}
  out["region_means"], out["finding_means"] = _means(out["per_region"]), _means(out["per_finding"])
  if table:
    out["table"] = {region: {f: metrics.binary_report(y_thr[:, r, c], p_thr[:, r, c], y_eval[:, r, c],
                                                      p_eval[:, r, c], criterion)
                             for c, f in enumerate(findings)}
                    for r, region in enumerate(anatomy.REGION_NAMES)}
  return out


def _labels(ctx: EvalContext, findings: list[str]):
  y_thr, k_thr = ctx.threshold_set.region_labels(findings)
  y_eval, k_eval = ctx.eval_set.region_labels(findings)
  header = {"findings": findings, "num_threshold_with_labels": int(len(k_thr)),
            "num_eval_with_labels": int(len(k_eval)), **ctx.splits()}
  return y_thr, k_thr, y_eval, k_eval, header


def evaluate(ctx: EvalContext, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  config = ctx.runner.config
  findings = scoring.check_findings(cfg.findings or config.labels, WHERE)
  y_thr, k_thr, y_eval, k_eval, header = _labels(ctx, findings)
  if len(k_thr) == 0 or len(k_eval) == 0:
    return {"skipped": "the dataset's records carry no region_findings", **ctx.splits()}
  crit = cfg.threshold_criterion
  probs = region_scores(ctx, findings, cfg)
  p_thr, p_eval = probs["threshold"][k_thr], probs["eval"][k_eval]
  out: dict[str, Any] = {**header, **score(findings, y_thr, p_thr, y_eval, p_eval, crit)}
  # Per-cell scores of the scored split's labelled images (`index`: their rows in the split).
  ctx.keep("zeroshot_anatomy", labels=y_eval, scores=p_eval, index=k_eval)
  heldout = heldout_region_scores(ctx, findings)
  if isinstance(heldout, str):
    out["heldout_wording"] = {"skipped": heldout}
  else:
    ctx.keep("zeroshot_anatomy", heldout_scores=heldout["eval"][k_eval])
    out["heldout_wording"] = {
        **score(findings, y_thr, heldout["threshold"][k_thr], y_eval, heldout["eval"][k_eval], crit, table=False),
        "templates": [list(p) for p in load_knowledge_base().eval_region_templates]}
  if ctx.picture_dir:
    table = out["table"]
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


def label_frequency_result(ctx: EvalContext, cfg: ml_collections.ConfigDict, labels: Sequence[str],
                           counts: "LabelCounts") -> dict[str, Any]:
  """The label-frequency baseline: every image scores each (region, finding) cell with how often
  the training records have that finding in that region."""
  findings = scoring.check_findings(cfg.findings or labels, WHERE)
  y_thr, k_thr, y_eval, k_eval, header = _labels(ctx, findings)
  if len(k_thr) == 0 or len(k_eval) == 0:
    return {"skipped": "the dataset's records carry no region_findings", **ctx.splits()}
  if counts.num_region_records == 0:
    return {"skipped": f"the {counts.split} split's records carry no region_findings to count", **ctx.splits()}
  freq = counts.region_frequency(findings)  # (R, F)
  out: dict[str, Any] = {
      **header, **score(findings, y_thr, np.broadcast_to(freq, y_thr.shape), y_eval,
                        np.broadcast_to(freq, y_eval.shape), cfg.threshold_criterion),
      "frequency": {region: dict(zip(findings, freq[r].tolist())) for r, region in enumerate(anatomy.REGION_NAMES)},
      "num_train_with_labels": counts.num_region_records,
      # It reads no text: the held-out wording cannot change its scores.
      "heldout_wording": {"note": "reads no text: the held-out wording scores equal the train wording's"}}
  out["heldout_wording"].update({k: out[k] for k in ("region_means", "finding_means")})
  return out

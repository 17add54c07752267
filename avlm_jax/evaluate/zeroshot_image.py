"""Zero-shot image-level diagnosis: label prompts from the knowledge base against the CLS embedding.

Per finding: AUC on the scored split; balanced accuracy and F1 there at the threshold chosen on
the threshold split. Means are over findings where the metric is defined.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from avlm_jax.evaluate import metrics, pictures, scoring
from avlm_jax.evaluate.context import EvalContext


def evaluate(ctx: EvalContext, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  config = ctx.runner.config
  findings = scoring.check_findings(cfg.findings or config.labels, "config.evals.zeroshot_image.findings")
  prompts = scoring.image_prompts(findings, config.prompt_template, config.prompt_style)
  prompt_emb = ctx.runner.embed_texts(prompts, config.data.max_prompt_len)
  sc = ctx.runner.scales
  probs = {w: scoring.image_probabilities(ctx.encoded(w)["image_emb"], prompt_emb, sc["global_scale"],
                                          sc["global_bias"]) for w in ("threshold", "eval")}
  y_thr, y_eval = ctx.threshold_set.labels(findings), ctx.eval_set.labels(findings)
  per_class = {f: metrics.binary_report(y_thr[:, c], probs["threshold"][:, c], y_eval[:, c],
                                        probs["eval"][:, c], cfg.threshold_criterion)
               for c, f in enumerate(findings)}
  out: dict[str, Any] = {"per_finding": per_class, **ctx.splits()}
  for m in ("auc", "balanced_accuracy", "f1"):
    out[f"mean_{m}"], out[f"num_defined_{m}"] = metrics.mean_defined([v[m] for v in per_class.values()])
  path = ctx.picture("roc_image_level")
  if path:
    curves = {f: metrics.roc_curve(y_eval[:, c], probs["eval"][:, c]) + (per_class[f]["auc"],)
              for c, f in enumerate(findings)}
    pictures.save(pictures.roc_figure(curves, "Zero-shot image-level ROC"), path)
    out["pictures"] = {"roc": path}
  return out

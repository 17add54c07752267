"""Zero-shot image-level diagnosis: finding prompts against the image embedding, in two wordings.

- Train wording (`per_finding`, `mean_*`; prompts under `prompts`): the label prompts exactly as
  training builds them (`config.prompt_template`, `config.prompt_style`). This is closed-set: the
  image-level loss (and the holistic ablation, which has no other loss) trains on these very texts.
- Held-out wording (`heldout_wording`; headline `heldout_mean_*`): each finding's held-out prompt
  ensemble from the knowledge base (`eval_templates['image']` × the finding's `eval_synonyms`,
  wording no training text uses; tests/test_heldout_wording.py checks that). A finding's cosine is
  the mean cosine over its ensemble (as CLIP's prompt ensembling), then the same sigmoid and
  threshold machinery. Reported as skipped, saying why, when the knowledge base has no held-out
  wording for a finding or the run's own label prompts use one.

Per finding: AUC on the scored split; balanced accuracy and F1 there at the threshold chosen on
the threshold split. Means are over findings where the metric is defined.

`label_frequency_result` scores the image-blind baseline (label_frequency.py) the same way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

import ml_collections
import numpy as np

from avlm_jax.evaluate import metrics, pictures, scoring
from avlm_jax.evaluate.context import EvalContext
from avlm_jax.knowledge import load_knowledge_base

if TYPE_CHECKING:
  from avlm_jax.evaluate.label_frequency import LabelCounts

METRICS = ("auc", "balanced_accuracy", "f1")
WHERE = "config.evals.zeroshot_image.findings"


def score(ctx: EvalContext, findings: Sequence[str], p_thr: np.ndarray, p_eval: np.ndarray,
          criterion: str) -> dict[str, Any]:
  """Per-finding reports and their means from (N, C) probabilities on the threshold and scored
  splits: the one scoring path of the model, its baselines and both wordings."""
  y_thr, y_eval = ctx.threshold_set.labels(findings), ctx.eval_set.labels(findings)
  per_class = {f: metrics.binary_report(y_thr[:, c], p_thr[:, c], y_eval[:, c], p_eval[:, c], criterion)
               for c, f in enumerate(findings)}
  out: dict[str, Any] = {"per_finding": per_class}
  for m in METRICS:
    out[f"mean_{m}"], out[f"num_defined_{m}"] = metrics.mean_defined([v[m] for v in per_class.values()])
  return out


def _occurs(wording: str, text: str) -> bool:
  body = r"\s+".join(re.escape(w) for w in wording.split())
  return re.search(rf"(?<![\w-]){body}(?![\w-])", text, re.I) is not None


def heldout_prompts(findings: Sequence[str], training_prompts: Sequence[str]
                    ) -> tuple[dict[str, tuple[str, ...]] | None, str | None]:
  """({finding: held-out prompt ensemble}, None), or (None, why they cannot be scored).

  `training_prompts`: the run's own label prompts. The knowledge base keeps its held-out wordings
  out of every text it builds, but a config's template is free text: if it uses a held-out
  template's words or a held-out synonym, that wording is not held out for this run.
  """
  kb = load_knowledge_base()
  try:
    prompts = {f: kb.heldout_label_prompts(f) for f in findings}
  except ValueError as e:
    return None, str(e)
  pieces = [p.strip() for t in kb.eval_image_templates for p in t.split("{name}") if p.strip()]
  synonyms = [s for f in findings for s in kb.get(f).eval_synonyms]
  for wording in pieces + synonyms:
    used = [p for p in training_prompts if _occurs(wording, p)]
    if used:
      return None, (f"the held-out wording {wording!r} occurs in the training label prompt {used[0]!r}, "
                    f"so it is not held out for this run")
  return prompts, None


def _ensemble_mean(emb: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
  """(sum(sizes), E) -> (len(sizes), E) group means. The image's cosine with a group's mean
  embedding equals its mean cosine over the group (the embedding is not re-normalised)."""
  starts = np.cumsum([0, *sizes[:-1]])
  return np.add.reduceat(np.asarray(emb, np.float64), starts, axis=0) / np.asarray(sizes, np.float64)[:, None]


def evaluate(ctx: EvalContext, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  config = ctx.runner.config
  findings = scoring.check_findings(cfg.findings or config.labels, WHERE)
  sc = ctx.runner.scales

  def probabilities(prompt_emb: np.ndarray) -> dict[str, np.ndarray]:
    return {w: scoring.image_probabilities(ctx.encoded(w)["image_emb"], prompt_emb, sc["global_scale"],
                                           sc["global_bias"]) for w in ("threshold", "eval")}

  prompts = scoring.image_prompts(findings, config.prompt_template, config.prompt_style)
  probs = probabilities(ctx.runner.embed_texts(prompts, config.data.max_prompt_len, kind="prompt"))
  out: dict[str, Any] = {**score(ctx, findings, probs["threshold"], probs["eval"], cfg.threshold_criterion),
                         "prompts": dict(zip(findings, prompts)), **ctx.splits()}
  # Per-image scores of the scored split, for bootstrapped intervals (runner.py saves them).
  ctx.keep("zeroshot_image", labels=ctx.eval_set.labels(findings), scores=probs["eval"])
  # Every label prompt the run trained on, not only the evaluated findings'.
  trained = scoring.image_prompts(config.labels, config.prompt_template, config.prompt_style)
  ensembles, why = heldout_prompts(findings, trained)
  heldout_probs = None
  if ensembles is None:
    out["heldout_wording"] = {"skipped": why}
  else:
    flat = [p for f in findings for p in ensembles[f]]
    emb = ctx.runner.embed_texts(flat, config.data.max_prompt_len, kind="prompt")
    heldout_probs = probabilities(_ensemble_mean(emb, [len(ensembles[f]) for f in findings]))
    ctx.keep("zeroshot_image", heldout_scores=heldout_probs["eval"])
    out["heldout_wording"] = {
        **score(ctx, findings, heldout_probs["threshold"], heldout_probs["eval"], cfg.threshold_criterion),
        "prompts": {f: list(ensembles[f]) for f in findings}}
  for m in METRICS:  # headline copies (NaN when skipped: undefined, not zero)
    out[f"heldout_mean_{m}"] = out["heldout_wording"].get(f"mean_{m}", metrics.NAN)
  path = ctx.picture("roc_image_level")
  if path:
    y_eval = ctx.eval_set.labels(findings)
    out["pictures"] = {}
    for key, name, p, per_class, title in (
        ("roc", "roc_image_level", probs, out["per_finding"], "Zero-shot image-level ROC (train wording)"),
        ("roc_heldout", "roc_image_level_heldout", heldout_probs, out["heldout_wording"].get("per_finding"),
         "Zero-shot image-level ROC (held-out wording)")):
      if p is None:
        continue
      curves = {f: metrics.roc_curve(y_eval[:, c], p["eval"][:, c]) + (per_class[f]["auc"],)
                for c, f in enumerate(findings)}
      out["pictures"][key] = ctx.picture(name)
      pictures.save(pictures.roc_figure(curves, title), out["pictures"][key])
  return out


def label_frequency_result(ctx: EvalContext, cfg: ml_collections.ConfigDict, labels: Sequence[str],
                           counts: "LabelCounts") -> dict[str, Any]:
  """The label-frequency baseline: every image scores each finding's training prevalence."""
  findings = scoring.check_findings(cfg.findings or labels, WHERE)
  if counts.num_records == 0:
    return {"skipped": f"the {counts.split} split has no records to count label frequencies on"}
  prevalence = counts.prevalence(findings)
  p_thr = np.broadcast_to(prevalence, (len(ctx.threshold_set), len(findings)))
  p_eval = np.broadcast_to(prevalence, (len(ctx.eval_set), len(findings)))
  out: dict[str, Any] = {**score(ctx, findings, p_thr, p_eval, cfg.threshold_criterion),
                         "prevalence": dict(zip(findings, prevalence.tolist())),
                         "num_train": counts.num_records, **ctx.splits()}
  # It reads no text, so the wording cannot change its scores: the same numbers serve both rows.
  out["heldout_wording"] = {"note": "reads no text: the held-out wording scores equal the train wording's"}
  for m in METRICS:
    out[f"heldout_mean_{m}"] = out[f"mean_{m}"]
  return out

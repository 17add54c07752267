"""The evaluators by name (`config.evals.<name>`), and running a list of them on one model."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import ml_collections

from avlm_jax.evaluate import localisation, segmentation, zeroshot_anatomy, zeroshot_image
from avlm_jax.evaluate.context import EvalContext

EVALUATORS: dict[str, Callable[[EvalContext, ml_collections.ConfigDict], dict[str, Any]]] = {
    "zeroshot_image": zeroshot_image.evaluate,
    "zeroshot_anatomy": zeroshot_anatomy.evaluate,
    "localisation": localisation.evaluate,
    "segmentation": segmentation.evaluate,
}

# Evaluators that read the anatomy tokens' outputs (boxes, region embeddings): a model without
# them (the holistic ablation) is reported as skipped there, not scored.
NEEDS_ANATOMY_TOKENS = ("zeroshot_anatomy", "localisation")

# The numbers a summary shows for each evaluator: (label, path into its result).
HEADLINES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    # Unqualified labels are the train wording; "held-out wording": prompts no training text uses.
    "zeroshot_image": (("AUC", ("mean_auc",)), ("balanced accuracy", ("mean_balanced_accuracy",)),
                       ("F1", ("mean_f1",)), ("AUC, held-out wording", ("heldout_mean_auc",)),
                       ("F1, held-out wording", ("heldout_mean_f1",))),
    "zeroshot_anatomy": (("region AUC", ("region_means", "mean_auc")),
                         ("region balanced accuracy", ("region_means", "mean_balanced_accuracy")),
                         ("region F1", ("region_means", "mean_f1")),
                         ("finding AUC", ("finding_means", "mean_auc")),
                         ("region AUC, held-out wording", ("heldout_wording", "region_means", "mean_auc")),
                         ("finding AUC, held-out wording", ("heldout_wording", "finding_means", "mean_auc"))),
    "localisation": (("mean IoU", ("mean_iou",)), ("hit rate@0.5", ("mean_hit_rate50",)),
                     ("hit rate@0.75", ("mean_hit_rate75",)), ("mAP@0.5", ("map50",)),
                     ("mAP@0.5:0.95", ("map50_95",))),
    "segmentation": (("Dice, no image (mask prior)", ("mean_mask_prior", "mean_dice")),
                     ("Dice, frozen", ("frozen", "mean_dice")), ("mIoU, frozen", ("frozen", "miou")),
                     ("Dice, fine-tuned", ("finetune", "mean_dice")), ("mIoU, fine-tuned", ("finetune", "miou"))),
}


def enabled(config: ml_collections.ConfigDict, names: Sequence[str] | None = None) -> list[str]:
  """`names` (default: every evaluator), checked, keeping those whose entry is enabled."""
  names = list(EVALUATORS) if names is None else list(names)
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise KeyError(f"unknown evaluator(s) {unknown}; known: {list(EVALUATORS)}")
  return [n for n in names if config.evals[n].enabled]


def run_evals(ctx: EvalContext, names: Sequence[str], log: Callable[[str], None] = lambda s: None
              ) -> dict[str, Any]:
  config = ctx.runner.config
  results = {}
  for name in names:
    t0 = time.perf_counter()
    if name in NEEDS_ANATOMY_TOKENS and not config.model.image.anatomy_tokens:
      results[name] = {"skipped": "the model has no anatomy tokens (holistic ablation)"}
    else:
      results[name] = EVALUATORS[name](ctx, config.evals[name])
    results[name]["seconds"] = time.perf_counter() - t0
    log(f"  {ctx.runner.name} / {name}: {results[name]['seconds']:.1f}s")
  return results


def lookup(result: dict[str, Any], path: tuple[str, ...]) -> float:
  node: Any = result
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return math.nan
    node = node[key]
  return float(node) if isinstance(node, (int, float)) else math.nan


def headline_scalars(results: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
  """Flat {'eval/zeroshot_image/AUC': 0.71, ...} for metrics.jsonl; undefined values are left out."""
  out = {}
  for name, result in results.items():
    for label, path in HEADLINES.get(name, ()):
      v = lookup(result, path)
      if math.isfinite(v):
        out[f"{prefix}{name}/{label}"] = v
  return out

"""The Markdown report: a summary table (model beside its baselines), then each evaluator's detail
with its pictures. Undefined values print as "–"."""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from avlm_jax.evaluate import registry


def _fmt(v: Any) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "–"
  return f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _picture(path: str, out_dir: str, alt: str) -> str:
  """`path`: absolute, or relative to `out_dir` (as metrics.json stores it)."""
  return f"![{alt}]({os.path.relpath(os.path.join(out_dir, path), out_dir)})\n"


def _get(node: Any, *path: str) -> Any:
  """The value at `path`, or None (printed "–") where the result has no such entry."""
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node


def _heldout_line(heldout: dict[str, Any]) -> str:
  if "skipped" in heldout:
    return f"Held-out wording skipped: {heldout['skipped']}.\n\n"
  prompts = next(iter(heldout.get("prompts", {}).values()), None)
  example = (f"e.g. {', '.join(map(repr, prompts[:2]))}" if prompts else "templates " + ", ".join(
      repr(t) for pair in heldout.get("templates", []) for t in pair) + " filled with held-out synonyms")
  return ("\"held-out\": the knowledge base's evaluation-only wording, which no training text uses "
          f"({example}); each finding's score averages the cosine over its ensemble. \"label-freq.\": "
          "training label frequencies, no image (AUC 0.5 where a score is constant).\n\n")


def markdown(results: dict[str, Any], config: ml_collections.ConfigDict, out_dir: str) -> str:
  subjects = results["subjects"]
  names = list(subjects)
  model = subjects["model"]
  md = [f"# Evaluation of `{results['checkpoint']}`\n",
        f"Data: `{results['data_dir']}`; thresholds chosen on `{results['threshold_split']}`, scores on "
        f"`{results['eval_split']}`. Written {results['written']}. \"–\" = undefined (e.g. a class "
        "with no positives in the scored split).\n",
        "## Summary\n"]
  rows = []
  for ev in model:
    for label, path in registry.HEADLINES.get(ev, ()):
      rows.append([f"{ev}: {label}"] + [registry.lookup(subjects[s].get(ev, {}), path) for s in names])
  md.append(_table(["metric"] + names, rows))
  for ev, result in model.items():
    md.append(f"\n## {ev}\n")
    if "skipped" in result:
      md.append(f"Skipped: {result['skipped']}.\n")
      continue
    # The label-frequency baseline (no image, no text) and the held-out wording beside the model.
    freq = subjects.get("label_frequency", {}).get(ev, {})
    heldout = result.get("heldout_wording", {})
    if ev == "zeroshot_image":
      md.append(_heldout_line(heldout))
      extra = ["train prevalence", "label-freq. F1"] if "per_finding" in freq else []
      rows = []
      for f, r in result["per_finding"].items():
        rows.append([f, r["auc"], r["balanced_accuracy"], r["f1"], r["threshold"], r["num_positive"],
                     r["num_negative"], _get(heldout, "per_finding", f, "auc"), _get(heldout, "per_finding", f, "f1")]
                    + ([_get(freq, "prevalence", f), _get(freq, "per_finding", f, "f1")] if extra else []))
      md.append(_table(["finding", "AUC", "balanced acc.", "F1", "threshold", "pos", "neg", "held-out AUC",
                        "held-out F1"] + extra, rows))
    elif ev == "zeroshot_anatomy":
      md.append(_heldout_line(heldout))
      extra = ["label-freq. AUC"] if "per_finding" in freq else []
      md.append("Per finding (pooled over regions):\n\n")
      md.append(_table(["finding", "AUC", "balanced acc.", "F1", "pos", "held-out AUC"] + extra,
                       [[f, r["auc"], r["balanced_accuracy"], r["f1"], r["num_positive"],
                         _get(heldout, "per_finding", f, "auc")] + ([_get(freq, "per_finding", f, "auc")] if extra else [])
                        for f, r in result["per_finding"].items()]))
      md.append("\nPer region (pooled over findings; regions with positives):\n\n")
      md.append(_table(["region", "AUC", "balanced acc.", "F1", "pos", "held-out AUC"] + extra,
                       [[g, r["auc"], r["balanced_accuracy"], r["f1"], r["num_positive"],
                         _get(heldout, "per_region", g, "auc")] + ([_get(freq, "per_region", g, "auc")] if extra else [])
                        for g, r in result["per_region"].items() if r["num_positive"]]))
    elif ev == "localisation":
      md.append("AP ranks each region's box by its presence confidence; a box on an image without that "
                "region is a false positive. Hit rates and IoU are over the true boxes.\n\n")
      prior = subjects.get("box_prior", {}).get("localisation", {}).get("per_region", {})
      md.append(_table(["region", "IoU", "hit@0.5", "hit@0.75", "AP@0.5", "AP@0.5:0.95", "boxes", "absent"]
                       + (["box prior IoU", "box prior AP@0.5"] if prior else []),
                       [[g, r["iou"], r["hit_rate50"], r["hit_rate75"], r["ap50"], r["ap50_95"], r["num_boxes"],
                         r["num_absent"]] + ([prior[g]["iou"], prior[g]["ap50"]] if prior else [])
                        for g, r in result["per_region"].items()]))
    elif ev == "segmentation":
      rows = []
      if "mean_mask_prior" in result:
        r = result["mean_mask_prior"]
        rows.append(["none (training masks' majority)"] + [r["dice"][s] for s in result["structures"]]
                    + [r["mean_dice"], r["miou"]])
      for mode in config.evals.segmentation.modes:
        if mode in result:
          r = result[mode]
          rows.append([mode] + [r["dice"][s] for s in result["structures"]] + [r["mean_dice"], r["miou"]])
      stem = "with" if result.get("pixel_stem", True) else "without"
      md.append(f"Decoder on blocks {result['layers']}, {stem} the full-resolution pixel stem, "
                f"{result['num_train']} training images.\n\n")
      md.append(_table(["encoder"] + [f"Dice {s}" for s in result["structures"]] + ["mean Dice", "mIoU"], rows))
    pics = dict(result.get("pictures", {}))
    for mode in ("frozen", "finetune"):
      pics.update({f"{mode} {k}": v for k, v in result.get(mode, {}).get("pictures", {}).items()} if isinstance(result.get(mode), dict) else {})
    for alt, path in pics.items():
      md.append("\n" + _picture(path, out_dir, f"{ev} {alt}"))
  return "\n".join(md)

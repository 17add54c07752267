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
  return f"![{alt}]({os.path.relpath(path, out_dir)})\n"


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
    if ev == "zeroshot_image":
      md.append(_table(["finding", "AUC", "balanced acc.", "F1", "threshold", "pos", "neg"],
                       [[f, r["auc"], r["balanced_accuracy"], r["f1"], r["threshold"], r["num_positive"],
                         r["num_negative"]] for f, r in result["per_finding"].items()]))
    elif ev == "zeroshot_anatomy":
      md.append("Per finding (pooled over regions):\n\n")
      md.append(_table(["finding", "AUC", "balanced acc.", "F1", "pos"],
                       [[f, r["auc"], r["balanced_accuracy"], r["f1"], r["num_positive"]]
                        for f, r in result["per_finding"].items()]))
      md.append("\nPer region (pooled over findings; regions with positives):\n\n")
      md.append(_table(["region", "AUC", "balanced acc.", "F1", "pos"],
                       [[g, r["auc"], r["balanced_accuracy"], r["f1"], r["num_positive"]]
                        for g, r in result["per_region"].items() if r["num_positive"]]))
    elif ev == "localisation":
      md.append(_table(["region", "IoU", "AP@0.5", "AP@0.5:0.95", "boxes"],
                       [[g, r["iou"], r["ap50"], r["ap50_95"], r["num_boxes"]]
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

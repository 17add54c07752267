"""The ablation table: each row's scores over seeds, with bootstrap 95 % intervals over test images.

`collect_run` turns one evaluated run (`<out>/metrics.json` and `<out>/arrays/model.npz`, the
per-image scores the evaluators kept) into `<results>/<name>.json` (headline numbers) and
`<results>/<name>.npz` (those arrays). `write_table` reads every result there and writes
`TABLE.md` and `table.json`: per row and metric, the mean over seeds of the metric and a
percentile bootstrap interval (`scipy.stats.bootstrap`) where one resample draws test images with
replacement and recomputes the seed-mean metric on them (seeds share the test split, so the
images are paired across seeds and rows).

Metrics (each computed from the kept arrays by the same functions the evaluators use):
  * `image_auc` / `image_auc_heldout`: zero-shot image-level AUC, mean over findings, with the
    training wording of the label prompts and with held-out wordings;
  * `anatomy_auc`: anatomy-wise AUC per finding (pooled over the (image, region) cells), mean
    over findings; `anatomy_auc_region`: the same per region, mean over regions;
  * `map50`: detection mAP at IoU 0.5 with the presence confidences; `hit_rate50`: the fraction
    of true boxes found at IoU ≥ 0.5; `mean_iou`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Callable

import numpy as np

from avlm_jax.evaluate import metrics

ROWS = ("global", "detection", "global_detection", "full")
ROW_NAMES = {"global": "global only (holistic)", "detection": "detection only",
             "global_detection": "global + detection", "full": "full (global + detection + fine)"}
# The paper's ablation (shared/docs/paper.md §5.5): image-level zero-shot AUC on its own data.
PAPER_IMAGE_AUC = {"global": 0.82, "global_detection": 0.90, "full": 0.91}
METRICS = ("image_auc", "image_auc_heldout", "anatomy_auc", "anatomy_auc_region", "map50", "hit_rate50",
           "mean_iou")


def _nanmean(values) -> float:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  return float(v.mean()) if len(v) else float("nan")


# --- metrics on a subset of test images --------------------------------------------------------
def image_auc(labels: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> float:
  """Mean over findings of the AUC on images `idx`; labels, scores (N, C)."""
  return _nanmean([metrics.roc_auc(labels[idx, c], scores[idx, c]) for c in range(labels.shape[1])])


def anatomy_auc(labels: np.ndarray, scores: np.ndarray, idx: np.ndarray, axis: str = "finding") -> float:
  """Mean over findings (or regions) of the AUC pooled over the other axis; labels, scores (N, R, F)."""
  y, s = labels[idx], scores[idx]
  if axis == "finding":
    return _nanmean([metrics.roc_auc(y[:, :, f], s[:, :, f]) for f in range(y.shape[2])])
  return _nanmean([metrics.roc_auc(y[:, r], s[:, r]) for r in range(y.shape[1])])


def detection(iou: np.ndarray, present: np.ndarray, confidence: np.ndarray, idx: np.ndarray) -> dict[str, float]:
  """map50, hit_rate50 and mean_iou on images `idx`, from per-(image, region) IoU, presence and
  confidence (the COCO AP of `metrics.coco_average_precision`, as the localisation evaluator)."""
  iou, present, confidence = iou[idx], present[idx], confidence[idx]
  ap, hit, mean_iou = [], [], []
  for r in range(iou.shape[1]):
    m = present[:, r]
    n = int(m.sum())
    ap.append(metrics.coco_average_precision(confidence[:, r], m & (iou[:, r] >= 0.5), n))
    hit.append(float((iou[m, r] >= 0.5).mean()) if n else float("nan"))
    mean_iou.append(float(iou[m, r].mean()) if n else float("nan"))
  return {"map50": _nanmean(ap), "hit_rate50": _nanmean(hit), "mean_iou": _nanmean(mean_iou)}


def run_metrics(arrays: dict[str, np.ndarray], idx: np.ndarray | None = None,
                only: str | None = None) -> dict[str, float]:
  """Every table metric one run's kept arrays allow (or just `only`), on images `idx` (default: all)."""
  n = len(arrays["ids"])
  idx = np.arange(n) if idx is None else idx
  want = lambda *names: only is None or only in names
  out = {}
  if "zeroshot_image/labels" in arrays and want("image_auc"):
    out["image_auc"] = image_auc(arrays["zeroshot_image/labels"], arrays["zeroshot_image/scores"], idx)
  if "zeroshot_image/heldout_scores" in arrays and want("image_auc_heldout"):
    out["image_auc_heldout"] = image_auc(arrays["zeroshot_image/labels"],
                                         arrays["zeroshot_image/heldout_scores"], idx)
  if "zeroshot_anatomy/labels" in arrays and want("anatomy_auc", "anatomy_auc_region"):
    # Anatomy arrays cover the images with region labels: map image indices onto their rows.
    rows = _rows_of(arrays["zeroshot_anatomy/index"], idx)
    y, s = arrays["zeroshot_anatomy/labels"], arrays["zeroshot_anatomy/scores"]
    out["anatomy_auc"] = anatomy_auc(y, s, rows, "finding")
    out["anatomy_auc_region"] = anatomy_auc(y, s, rows, "region")
  if "localisation/iou" in arrays and want("map50", "hit_rate50", "mean_iou"):
    out.update(detection(arrays["localisation/iou"], arrays["localisation/present"],
                         arrays["localisation/confidence"], idx))
  return out


def _rows_of(index: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Rows of a subset array whose image indices are `index`, for the images `idx` (with repeats)."""
  where = {int(i): k for k, i in enumerate(index)}
  return np.asarray([where[int(i)] for i in idx if int(i) in where], np.int64)


# --- per run ---------------------------------------------------------------------------------------
def collect_run(eval_dir: str, results_dir: str, name: str, *, row: str, seed: int,
                extra: dict[str, Any] | None = None) -> list[str]:
  """Write `<results_dir>/<name>.json` and `.npz` from an evaluated run; returns their paths."""
  with open(os.path.join(eval_dir, "metrics.json")) as f:
    evaluated = json.load(f)
  arrays_path = os.path.join(eval_dir, "arrays", "model.npz")
  if not os.path.exists(arrays_path):
    raise FileNotFoundError(f"{arrays_path} is missing: the evaluation kept no per-image arrays")
  with np.load(arrays_path) as z:
    arrays = {k: z[k] for k in z.files}
  subjects = evaluated["subjects"]
  baselines = {s: _headline(v) for s, v in subjects.items() if s != "model"}
  result = {"name": name, "row": row, "seed": seed, "headline": run_metrics(arrays),
            "evaluator_headline": _headline(subjects["model"]), "baselines": baselines,
            "checkpoint": evaluated.get("checkpoint"), **(extra or {})}
  os.makedirs(results_dir, exist_ok=True)
  json_path, npz_path = (os.path.join(results_dir, f"{name}.{ext}") for ext in ("json", "npz"))
  shutil.copyfile(arrays_path, npz_path)
  with open(json_path + ".tmp", "w") as f:
    json.dump(metrics.to_json(result), f, indent=1)
  os.replace(json_path + ".tmp", json_path)  # the JSON marks the run done: write it last, whole
  return [json_path, npz_path]


_HEADLINE_KEYS = ("mean_auc", "heldout_mean_auc", "map50", "map50_95", "mean_iou", "mean_hit_rate50",
                  "mean_hit_rate75")


def _headline(subject: dict[str, Any]) -> dict[str, Any]:
  """The evaluators' own headline numbers of one subject (for the baselines' rows)."""
  out = {}
  for evaluator, res in subject.items():
    if not isinstance(res, dict) or "skipped" in res:
      continue
    for k in _HEADLINE_KEYS:
      if k in res:
        out[f"{evaluator}/{k}"] = res[k]
    for group in ("finding_means", "region_means"):
      if group in res:
        out[f"{evaluator}/{group}/mean_auc"] = res[group].get("mean_auc")
  return out


# --- the table -------------------------------------------------------------------------------------
def load_results(results_dir: str) -> dict[str, list[tuple[dict, dict[str, np.ndarray]]]]:
  """row -> [(result JSON, arrays)] over the seeds there are, in seed order."""
  out: dict[str, list] = {}
  for path in sorted(glob.glob(os.path.join(results_dir, "*_seed*.json"))):
    with open(path) as f:
      result = json.load(f)
    with np.load(path[:-len(".json")] + ".npz") as z:
      arrays = {k: z[k] for k in z.files}
    out.setdefault(result["row"], []).append((result, arrays))
  for runs in out.values():
    runs.sort(key=lambda ra: ra[0]["seed"])
  return out


def seed_mean_ci(runs: list[dict[str, np.ndarray]], metric: str, *, n_resamples: int = 1000,
                 seed: int = 0) -> tuple[float, float, float]:
  """(mean over seeds, CI low, CI high): percentile bootstrap over test images, paired across seeds."""
  from scipy import stats

  n = len(runs[0]["ids"])
  for r in runs[1:]:
    if not np.array_equal(r["ids"], runs[0]["ids"]):
      raise ValueError(f"{metric}: the runs were scored on different test images; they cannot be paired")
  stat: Callable[[np.ndarray], float] = lambda idx: _nanmean(
      [run_metrics(r, np.asarray(idx, np.int64), only=metric).get(metric, np.nan) for r in runs])
  point = stat(np.arange(n))
  if not np.isfinite(point):
    return point, float("nan"), float("nan")
  res = stats.bootstrap((np.arange(n),), stat, vectorized=False, n_resamples=n_resamples,
                        method="percentile", random_state=seed)
  return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def _fmt(v: float | None, ci: tuple[float, float] | None = None) -> str:
  if v is None or not np.isfinite(v):
    return "–"
  if ci is None or not np.isfinite(ci[0]):
    return f"{v:.3f}"
  return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def build_table(results_dir: str, n_resamples: int = 1000) -> dict[str, Any]:
  loaded = load_results(results_dir)
  rows = {}
  for row in ROWS:
    if row not in loaded:
      continue
    runs = [arrays for _, arrays in loaded[row]]
    cells = {}
    for metric in METRICS:
      per_seed = [run_metrics(a).get(metric) for a in runs]
      if all(v is None for v in per_seed):
        continue
      point, lo, hi = seed_mean_ci(runs, metric, n_resamples=n_resamples)
      cells[metric] = {"mean": point, "ci95": [lo, hi], "per_seed": per_seed}
    rows[row] = {"seeds": [r["seed"] for r, _ in loaded[row]], "metrics": cells}
  baselines = {}
  for row in loaded.values():
    for result, _ in row:
      baselines.update(result.get("baselines", {}))
  return {"rows": rows, "baselines": baselines, "paper_image_auc": PAPER_IMAGE_AUC,
          "n_resamples": n_resamples}


def render_markdown(table: dict[str, Any]) -> str:
  heads = {"image_auc": "image AUC (train wording)", "image_auc_heldout": "image AUC (held-out wording)",
           "anatomy_auc": "anatomy AUC (per finding)", "anatomy_auc_region": "anatomy AUC (per region)",
           "map50": "box mAP@0.5", "hit_rate50": "hit rate@0.5", "mean_iou": "mean IoU"}
  lines = ["| row | seeds | " + " | ".join(heads[m] for m in METRICS) + " | paper image AUC |",
           "|---|---|" + "---|" * len(METRICS) + "---|"]
  for row, data in table["rows"].items():
    cells = [_fmt(data["metrics"][m]["mean"], data["metrics"][m]["ci95"]) if m in data["metrics"] else "–"
             for m in METRICS]
    paper = table["paper_image_auc"].get(row)
    lines.append(f"| {ROW_NAMES[row]} | {len(data['seeds'])} | " + " | ".join(cells)
                 + f" | {paper if paper is not None else '–'} |")
  lines.append("")
  lines.append(f"Mean over seeds; [95 % percentile bootstrap over test images, {table['n_resamples']} "
               "resamples, paired across seeds]. Paper: Anatomy-VLM §5.5, on its own data.")
  if table["baselines"]:
    lines += ["", "Free baselines (evaluators' own numbers, seed 0):", ""]
    for subject, values in sorted(table["baselines"].items()):
      shown = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(values.items()))
      lines.append(f"- `{subject}`: {shown}")
  return "\n".join(lines) + "\n"


def write_table(results_dir: str, n_resamples: int = 1000) -> str:
  table = build_table(results_dir, n_resamples)
  text = render_markdown(table)
  with open(os.path.join(results_dir, "table.json"), "w") as f:
    json.dump(metrics.to_json(table), f, indent=1)
  with open(os.path.join(results_dir, "TABLE.md"), "w") as f:
    f.write(text)
  return text

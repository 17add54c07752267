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
from typing import Any

import numpy as np

from avlm_jax.evaluate import metrics

ROWS = ("global", "detection", "global_detection", "full")
ROW_NAMES = {"global": "global only (holistic)", "detection": "detection only",
             "global_detection": "global + detection", "full": "full (global + detection + fine)"}
# The paper's ablation (shared/docs/paper.md §5.5): image-level zero-shot AUC on its own data.
PAPER_IMAGE_AUC = {"global": 0.82, "global_detection": 0.90, "full": 0.91}
METRICS = ("image_auc", "image_auc_heldout", "anatomy_auc", "anatomy_auc_region", "map50", "hit_rate50",
           "mean_iou")


# --- metrics under image weights --------------------------------------------------------------
# A bootstrap resample of the test images is a vector of counts (how often each image was drawn),
# so every metric below takes image weights W (B, N) and returns (B,) values: all resamples at
# once, each with one sort per finding. Integer weights give exactly the metric on the resampled
# list (tests/test_ablation_table.py checks against metrics.roc_auc / coco_average_precision).
def weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
  """AUC (Mann–Whitney, ties count 1/2) of cells y, s (M,) under cell weights w (B, M); NaN per
  weighting without both classes."""
  y, s = np.asarray(y).astype(bool).ravel(), np.asarray(s, np.float64).ravel()
  order = np.argsort(s, kind="mergesort")
  s, y, w = s[order], y[order], w[:, order]
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups
  pos = np.add.reduceat(w * y, starts, axis=1)
  neg = np.add.reduceat(w * ~y, starts, axis=1)
  below = np.cumsum(neg, axis=1) - neg
  n_pos, n_neg = pos.sum(1), neg.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
  return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def weighted_coco_ap(scores: np.ndarray, is_tp: np.ndarray, is_gt: np.ndarray, w: np.ndarray) -> np.ndarray:
  """`metrics.coco_average_precision` of one region whose detections are weighted (B, M): a
  detection of weight k counts as k copies (NaN without ground truth)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
  tp, ww = np.asarray(is_tp, bool)[order], w[:, order]
  n_gt = (w * np.asarray(is_gt, bool)).sum(1)
  cum_tp, cum_all = np.cumsum(ww * tp, axis=1), np.cumsum(ww, axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    precision = np.where(cum_all > 0, cum_tp / cum_all, 0.0)  # zero-weight leaders sit at recall 0
    recall = cum_tp / n_gt[:, None]
  envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
  m = recall.shape[1]
  at = (recall[:, :, None] < metrics.COCO_RECALL_POINTS).sum(1)  # searchsorted 'left', per row
  ap = np.where(at < m, np.take_along_axis(envelope, np.minimum(at, m - 1), axis=1), 0.0).mean(1)
  return np.where(n_gt > 0, ap, np.nan)


def _nanmean_rows(values: list[np.ndarray]) -> np.ndarray:
  """Mean over the list (findings, regions) per weighting, ignoring NaNs; NaN when all are."""
  v = np.stack(values, 1)
  ok = np.isfinite(v)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(ok.any(1), np.where(ok, v, 0).sum(1) / ok.sum(1), np.nan)


def image_auc(labels: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Mean over findings of the AUC under image weights w (B, N); labels, scores (N, C)."""
  return _nanmean_rows([weighted_auc(labels[:, c], scores[:, c], w) for c in range(labels.shape[1])])


def anatomy_auc(labels: np.ndarray, scores: np.ndarray, w: np.ndarray, axis: str = "finding") -> np.ndarray:
  """Mean over findings (or regions) of the AUC pooled over the other axis; labels, scores (M, R, F)
  and row weights w (B, M)."""
  _, n_regions, n_findings = labels.shape
  if axis == "finding":
    cells = np.repeat(w, n_regions, axis=1)  # (row, region) cells in ravel order
    return _nanmean_rows([weighted_auc(labels[:, :, f], scores[:, :, f], cells) for f in range(n_findings)])
  cells = np.repeat(w, n_findings, axis=1)
  return _nanmean_rows([weighted_auc(labels[:, r], scores[:, r], cells) for r in range(n_regions)])


def detection(iou: np.ndarray, present: np.ndarray, confidence: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
  """map50, hit_rate50 and mean_iou under image weights w (B, N), from per-(image, region) IoU,
  presence and confidence (the COCO AP of `metrics.coco_average_precision`, as the evaluator)."""
  present = present.astype(bool)
  hit = present & (iou >= 0.5)
  ap, hit_rate, mean_iou = [], [], []
  for r in range(iou.shape[1]):
    ap.append(weighted_coco_ap(confidence[:, r], hit[:, r], present[:, r], w))
    n = w @ present[:, r]
    with np.errstate(invalid="ignore", divide="ignore"):
      hit_rate.append(np.where(n > 0, (w @ hit[:, r]) / n, np.nan))
      mean_iou.append(np.where(n > 0, (w @ np.where(present[:, r], iou[:, r], 0.0)) / n, np.nan))
  return {"map50": _nanmean_rows(ap), "hit_rate50": _nanmean_rows(hit_rate), "mean_iou": _nanmean_rows(mean_iou)}


def run_metrics(arrays: dict[str, np.ndarray], idx: np.ndarray | None = None,
                only: str | None = None) -> dict[str, float]:
  """Every table metric one run's kept arrays allow (or just `only`), on the test images `idx`
  (a list with repeats allowed; default: all)."""
  n = len(arrays["ids"])
  counts = np.ones(n) if idx is None else np.bincount(np.asarray(idx, np.int64), minlength=n)
  return {k: float(v[0]) for k, v in weighted_metrics(arrays, counts[None].astype(np.float64), only).items()}


def weighted_metrics(arrays: dict[str, np.ndarray], w: np.ndarray,
                     only: str | None = None) -> dict[str, np.ndarray]:
  """`run_metrics` under image weights w (B, N): each metric as (B,) values."""
  want = lambda *names: only is None or only in names
  out = {}
  if "zeroshot_image/labels" in arrays and want("image_auc"):
    out["image_auc"] = image_auc(arrays["zeroshot_image/labels"], arrays["zeroshot_image/scores"], w)
  if "zeroshot_image/heldout_scores" in arrays and want("image_auc_heldout"):
    out["image_auc_heldout"] = image_auc(arrays["zeroshot_image/labels"],
                                         arrays["zeroshot_image/heldout_scores"], w)
  if "zeroshot_anatomy/labels" in arrays and want("anatomy_auc", "anatomy_auc_region"):
    # Anatomy arrays cover the images with region labels: their rows take their images' weights.
    rows_w = w[:, np.asarray(arrays["zeroshot_anatomy/index"], np.int64)]
    y, s = arrays["zeroshot_anatomy/labels"], arrays["zeroshot_anatomy/scores"]
    if want("anatomy_auc"):
      out["anatomy_auc"] = anatomy_auc(y, s, rows_w, "finding")
    if want("anatomy_auc_region"):
      out["anatomy_auc_region"] = anatomy_auc(y, s, rows_w, "region")
  if "localisation/iou" in arrays and want("map50", "hit_rate50", "mean_iou"):
    found = detection(arrays["localisation/iou"], arrays["localisation/present"],
                      arrays["localisation/confidence"], w)
    out.update({k: v for k, v in found.items() if want(k)})
  return out


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


def _check_paired(runs: list[dict[str, np.ndarray]], metric: str) -> int:
  n = len(runs[0]["ids"])
  for r in runs[1:]:
    if not np.array_equal(r["ids"], runs[0]["ids"]):
      raise ValueError(f"{metric}: the runs were scored on different test images; they cannot be paired")
  return n


def _seed_mean_stat(runs: list[dict[str, np.ndarray]], metric: str, n: int):
  """idx (..., n) resampled index lists -> (...) seed-mean metric, all resamples at once."""
  def stat(idx: np.ndarray) -> np.ndarray:
    idx = np.asarray(idx, np.int64)
    batch = idx.reshape(-1, n)
    counts = np.zeros(batch.shape, np.float64)
    np.add.at(counts, (np.arange(len(batch))[:, None], batch), 1.0)
    per_seed = [weighted_metrics(r, counts, only=metric).get(metric, np.full(len(batch), np.nan)) for r in runs]
    return _nanmean_rows(per_seed).reshape(idx.shape[:-1])
  return stat


def _bootstrap(stat, n: int, n_resamples: int, seed: int) -> tuple[float, float, float]:
  from scipy import stats

  point = float(stat(np.arange(n)))
  if not np.isfinite(point):
    return point, float("nan"), float("nan")
  res = stats.bootstrap((np.arange(n),), lambda idx, axis=-1: stat(idx), vectorized=True,
                        n_resamples=n_resamples, batch=250, method="percentile", random_state=seed)
  return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def seed_mean_ci(runs: list[dict[str, np.ndarray]], metric: str, *, n_resamples: int = 1000,
                 seed: int = 0) -> tuple[float, float, float]:
  """(mean over seeds, CI low, CI high): percentile bootstrap over test images, paired across seeds.

  `scipy.stats.bootstrap` draws the resamples; the statistic turns each batch of resampled index
  lists into image counts and scores every resample at once (`weighted_metrics`)."""
  n = _check_paired(runs, metric)
  return _bootstrap(_seed_mean_stat(runs, metric, n), n, n_resamples, seed)


def difference_ci(runs_a: list[dict[str, np.ndarray]], runs_b: list[dict[str, np.ndarray]], metric: str, *,
                  n_resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
  """(seed mean of A − seed mean of B, CI low, CI high), both rows scored on the same resample of
  test images each time: the paired interval an ordering claim needs (two rows' own intervals
  may overlap while their difference is clear of 0, and the reverse)."""
  n = _check_paired(runs_a + runs_b, metric)
  a, b = _seed_mean_stat(runs_a, metric, n), _seed_mean_stat(runs_b, metric, n)
  return _bootstrap(lambda idx: a(idx) - b(idx), n, n_resamples, seed)


# The targets as orderings: (row A, row B, metric), claiming A ≥ B.
TARGETS = (("full", "global_detection", "image_auc_heldout"), ("global_detection", "global", "image_auc_heldout"),
           ("full", "global", "image_auc_heldout"), ("full", "global", "image_auc"),
           ("full", "detection", "map50"))


def _fmt(v: float | None, ci: tuple[float, float] | None = None) -> str:
  if v is None or not np.isfinite(v):
    return "–"
  if ci is None or not np.isfinite(ci[0]):
    return f"{v:.3f}"
  return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def per_finding(runs: list[dict[str, np.ndarray]], labels: tuple[str, ...]) -> dict[str, dict[str, float]]:
  """finding -> seed-mean image AUC (both wordings) and anatomy AUC pooled over regions, where the
  runs kept those arrays (no intervals: a detail table beside the headline one)."""
  one = np.ones((1, len(runs[0]["ids"])))
  out: dict[str, dict[str, float]] = {f: {} for f in labels}
  for key, name in (("zeroshot_image/scores", "image_auc"), ("zeroshot_image/heldout_scores", "image_auc_heldout")):
    if key in runs[0]:
      for c, f in enumerate(labels):
        out[f][name] = float(np.nanmean([weighted_auc(r["zeroshot_image/labels"][:, c], r[key][:, c], one)[0]
                                         for r in runs]))
  if "zeroshot_anatomy/scores" in runs[0] and runs[0]["zeroshot_anatomy/labels"].shape[-1] == len(labels):
    for c, f in enumerate(labels):
      out[f]["anatomy_auc"] = float(np.nanmean([weighted_auc(
          r["zeroshot_anatomy/labels"][..., c], r["zeroshot_anatomy/scores"][..., c],
          np.ones((1, r["zeroshot_anatomy/labels"][..., c].size)))[0] for r in runs]))
  return out


def build_table(results_dir: str, n_resamples: int = 1000, labels: tuple[str, ...] | None = None) -> dict[str, Any]:
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
  findings = {}
  if labels is not None:
    for row, runs in loaded.items():
      arrays = [x for _, x in runs]
      if arrays[0]["zeroshot_image/labels"].shape[1] != len(labels):
        raise ValueError(f"{row}: its runs score {arrays[0]['zeroshot_image/labels'].shape[1]} findings, "
                         f"the labels given are {len(labels)}: {labels}")
      findings[row] = per_finding(arrays, labels)
  targets = []
  for a, b, metric in TARGETS:
    if a in loaded and b in loaded:
      diff, lo, hi = difference_ci([x for _, x in loaded[a]], [x for _, x in loaded[b]], metric,
                                   n_resamples=n_resamples)
      targets.append({"a": a, "b": b, "metric": metric, "difference": diff, "ci95": [lo, hi]})
  baselines = {}
  for row in loaded.values():
    for result, _ in row:
      baselines.update(result.get("baselines", {}))
  return {"rows": rows, "targets": targets, "per_finding": findings, "baselines": baselines, "paper_image_auc": PAPER_IMAGE_AUC,
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
  if table.get("targets"):
    lines += ["", "The orderings the targets claim (the paper's, at image level), as paired differences "
              "(A − B on the same resampled test images; seed means):", "", "| A ≥ B? | metric | A − B [95 % CI] | verdict |", "|---|---|---|---|"]
    for t in table["targets"]:
      lo, hi = t["ci95"]
      verdict = ("holds (CI above 0)" if lo > 0 else "fails (CI below 0)" if hi < 0
                 else "holds, CI includes 0" if t["difference"] >= 0 else "fails, CI includes 0")
      lines.append(f"| {ROW_NAMES[t['a']]} ≥ {ROW_NAMES[t['b']]} | {heads[t['metric']]} | "
                   f"{t['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {verdict} |")
  if table.get("per_finding"):
    rows = [r for r in ROWS if r in table["per_finding"]]
    cols = [(r, m) for r in rows for m in ("image_auc_heldout", "anatomy_auc")
            if any(m in v for v in table["per_finding"][r].values())]
    short = {"image_auc_heldout": "image AUC, held-out", "anatomy_auc": "anatomy AUC"}
    lines += ["", "Per finding (mean over seeds):", "",
              "| finding | " + " | ".join(f"{ROW_NAMES[r]}: {short[m]}" for r, m in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for f in next(iter(table["per_finding"].values())):
      lines.append(f"| {f} | " + " | ".join(_fmt(table["per_finding"][r][f].get(m)) for r, m in cols) + " |")
  if table["baselines"]:
    lines += ["", "Free baselines (evaluators' own numbers, seed 0):", ""]
    for subject, values in sorted(table["baselines"].items()):
      shown = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(values.items()))
      lines.append(f"- `{subject}`: {shown}")
  return "\n".join(lines) + "\n"


def write_table(results_dir: str, n_resamples: int = 1000, labels: tuple[str, ...] | None = None) -> str:
  """TABLE.md and table.json from every result there; `labels` (the config's, in score order) adds
  the per-finding table."""
  table = build_table(results_dir, n_resamples, labels)
  text = render_markdown(table)
  with open(os.path.join(results_dir, "table.json"), "w") as f:
    json.dump(metrics.to_json(table), f, indent=1)
  with open(os.path.join(results_dir, "TABLE.md"), "w") as f:
    f.write(text)
  return text

"""The ablation table: metrics from kept per-image arrays, paired bootstrap intervals, collection."""

import json
import os

import numpy as np
import pytest

from avlm_jax.evaluate import ablation_table, metrics

N, C, R, F = 60, 5, 29, 5  # C: the tiny shapes config's labels (the runner test names them)


def _arrays(seed: int, signal: float) -> dict[str, np.ndarray]:
  """A run's kept arrays: scores that follow the labels with strength `signal`."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((N, C)) < 0.4).astype(np.float32)
  region_labels = (rng.random((N - 10, R, F)) < 0.1).astype(np.float32)
  present = rng.random((N, R)) < 0.9
  iou = np.clip(rng.normal(0.6, 0.2, (N, R)), 0, 1)
  return {
      "ids": np.array([f"test/{i}" for i in range(N)]),
      "zeroshot_image/labels": labels,
      "zeroshot_image/scores": signal * labels + rng.random((N, C)),
      "zeroshot_image/heldout_scores": 0.5 * signal * labels + rng.random((N, C)),
      "zeroshot_anatomy/index": np.arange(10, N),  # images 0..9 carry no region labels
      "zeroshot_anatomy/labels": region_labels,
      "zeroshot_anatomy/scores": signal * region_labels + rng.random(region_labels.shape),
      "localisation/iou": iou,
      "localisation/present": present,
      "localisation/confidence": present + rng.random((N, R)),
  }


def test_metrics_equal_the_evaluators_functions():
  a = _arrays(0, 0.5)
  out = ablation_table.run_metrics(a)
  y, s = a["zeroshot_image/labels"], a["zeroshot_image/scores"]
  assert out["image_auc"] == pytest.approx(np.mean([metrics.roc_auc(y[:, c], s[:, c]) for c in range(C)]))
  ya, sa = a["zeroshot_anatomy/labels"], a["zeroshot_anatomy/scores"]
  assert out["anatomy_auc"] == pytest.approx(np.mean([metrics.roc_auc(ya[..., f], sa[..., f]) for f in range(F)]))
  iou, present, conf = a["localisation/iou"], a["localisation/present"], a["localisation/confidence"]
  ap = [metrics.coco_average_precision(conf[:, r], present[:, r] & (iou[:, r] >= 0.5), present[:, r].sum())
        for r in range(R)]
  assert out["map50"] == pytest.approx(np.mean(ap))
  assert out["mean_iou"] == pytest.approx(np.mean([iou[present[:, r], r].mean() for r in range(R)]))
  # A subset of images: the anatomy arrays are indexed by image, not by row.
  idx = np.arange(10, 40)
  sub = ablation_table.run_metrics(a, idx)
  assert sub["anatomy_auc"] == pytest.approx(np.mean([metrics.roc_auc(ya[:30, :, f], sa[:30, :, f])
                                                      for f in range(F)]))


def _resampled(a: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
  """The run's arrays on the image list `idx` itself (repeats as copies): what a slow bootstrap scores."""
  out = {k: v[idx] for k, v in a.items() if not k.startswith("zeroshot_anatomy")}
  where = {int(i): k for k, i in enumerate(a["zeroshot_anatomy/index"])}
  rows = np.asarray([where[int(i)] for i in idx if int(i) in where])
  for k in ("zeroshot_anatomy/labels", "zeroshot_anatomy/scores"):
    out[k] = a[k][rows]
  out["zeroshot_anatomy/index"] = np.arange(len(rows))
  return out


@pytest.mark.parametrize("draw", range(4))
def test_weighted_metrics_equal_the_metrics_of_the_resampled_list(draw):
  """A resample scored as image counts (all resamples at once) equals the evaluators' functions on
  the resampled list with its repeats, ties in the scores included."""
  a = _arrays(draw, 0.5)
  rng = np.random.default_rng(100 + draw)
  a["zeroshot_image/scores"] = np.round(a["zeroshot_image/scores"], 1)  # many ties
  a["localisation/confidence"] = np.round(a["localisation/confidence"], 2)
  idx = rng.integers(0, N, N)
  got = ablation_table.run_metrics(a, idx)
  r = _resampled(a, idx)
  y, s = r["zeroshot_image/labels"], r["zeroshot_image/scores"]
  assert got["image_auc"] == pytest.approx(np.nanmean([metrics.roc_auc(y[:, c], s[:, c]) for c in range(C)]), abs=1e-12)
  ya, sa = r["zeroshot_anatomy/labels"], r["zeroshot_anatomy/scores"]
  assert got["anatomy_auc"] == pytest.approx(np.nanmean([metrics.roc_auc(ya[..., f], sa[..., f]) for f in range(F)]), abs=1e-12)
  assert got["anatomy_auc_region"] == pytest.approx(np.nanmean([metrics.roc_auc(ya[:, q], sa[:, q]) if 0 < ya[:, q].sum() < ya[:, q].size else np.nan for q in range(R)]), abs=1e-12)
  iou, present, conf = r["localisation/iou"], r["localisation/present"], r["localisation/confidence"]
  # Sorted by image so tied confidences meet in the same order as in the weighted form.
  order = np.argsort(idx, kind="mergesort")
  iou, present, conf = iou[order], present[order], conf[order]
  ap = [metrics.coco_average_precision(conf[:, q], present[:, q] & (iou[:, q] >= 0.5), present[:, q].sum())
        for q in range(R)]
  assert got["map50"] == pytest.approx(np.nanmean(ap), abs=1e-12)
  assert got["hit_rate50"] == pytest.approx(np.mean([(iou[present[:, q], q] >= 0.5).mean() for q in range(R)]), abs=1e-12)
  assert got["mean_iou"] == pytest.approx(np.mean([iou[present[:, q], q].mean() for q in range(R)]), abs=1e-12)


def test_bootstrap_interval_brackets_the_seed_mean_and_shrinks_with_signal():
  weak = [_arrays(s, 0.3) for s in range(3)]
  point, lo, hi = ablation_table.seed_mean_ci(weak, "image_auc", n_resamples=200)
  assert point == pytest.approx(np.mean([ablation_table.run_metrics(a)["image_auc"] for a in weak]))
  assert lo < point < hi and hi - lo > 0.02
  perfect = [_arrays(s, 5.0) for s in range(2)]
  point, lo, hi = ablation_table.seed_mean_ci(perfect, "image_auc", n_resamples=100)
  assert point == lo == hi == 1.0


def test_a_paired_difference_is_a_minus_b_on_the_same_resampled_images():
  strong, weak = [_arrays(s, 1.0) for s in range(2)], [_arrays(s, 0.3) for s in range(2)]
  diff, lo, hi = ablation_table.difference_ci(strong, weak, "image_auc", n_resamples=200)
  means = [np.mean([ablation_table.run_metrics(a)["image_auc"] for a in runs]) for runs in (strong, weak)]
  assert diff == pytest.approx(means[0] - means[1]) and 0 < lo < diff < hi
  # Both rows see the same resample each time: a row against itself differs by exactly 0.
  assert ablation_table.difference_ci(weak, weak, "image_auc", n_resamples=50) == (0.0, 0.0, 0.0)
  # The same scores with the labels of other images: the difference is not paired, and is refused.
  shuffled = [{**a, "ids": a["ids"][::-1].copy()} for a in weak]
  with pytest.raises(ValueError, match="different test images"):
    ablation_table.difference_ci(strong, shuffled, "image_auc", n_resamples=10)


def test_runs_on_other_test_images_are_refused():
  a, b = _arrays(0, 0.5), _arrays(1, 0.5)
  b["ids"] = b["ids"][::-1].copy()
  with pytest.raises(ValueError, match="different test images"):
    ablation_table.seed_mean_ci([a, b], "image_auc", n_resamples=10)


def _fake_eval(tmp_path, name, arrays, subjects=None):
  out = tmp_path / "runs" / name / "eval"
  os.makedirs(out / "arrays")
  np.savez_compressed(out / "arrays" / "model.npz", **arrays)
  subjects = subjects or {"model": {"zeroshot_image": {"mean_auc": 0.7}}}
  (out / "metrics.json").write_text(json.dumps({"subjects": subjects, "checkpoint": "x"}))
  return str(out)


def test_collect_and_table(tmp_path):
  results = str(tmp_path / "results")
  baselines = {"model": {"localisation": {"map50": 0.5}},
               "box_prior": {"localisation": {"map50": 0.3, "mean_iou": 0.6}}}
  for row, signal in (("global", 0.2), ("full", 1.0)):
    for seed in (0, 1):
      name = f"{row}_seed{seed}"
      arrays = _arrays(seed, signal)
      if row == "global":  # the holistic model has no region outputs
        arrays = {k: v for k, v in arrays.items() if not k.startswith(("zeroshot_anatomy", "localisation"))}
      ev = _fake_eval(tmp_path, name, arrays, baselines if row == "full" and seed == 0 else None)
      written = ablation_table.collect_run(ev, results, name, row=row, seed=seed)
      assert all(os.path.exists(p) for p in written)
  text = ablation_table.write_table(results, n_resamples=50, labels=("effusion", "edema", "nodule", "mass", "atelectasis"))
  table = json.loads((tmp_path / "results" / "table.json").read_text())
  assert list(table["rows"]) == ["global", "full"]
  assert "map50" not in table["rows"]["global"]["metrics"]
  full = table["rows"]["full"]["metrics"]["image_auc"]
  assert full["mean"] > table["rows"]["global"]["metrics"]["image_auc"]["mean"]
  assert len(full["per_seed"]) == 2 and full["ci95"][0] <= full["mean"] <= full["ci95"][1]
  assert "| global only (holistic) | 2 |" in text and "| 0.82 |" in text
  # Of the orderings, only full vs global has both rows here (held-out, then train wording).
  assert [(t["a"], t["b"], t["metric"]) for t in table["targets"]] == [
      ("full", "global", "image_auc_heldout"), ("full", "global", "image_auc")]
  target = table["targets"][1]
  # Per finding: the seed mean of each finding's own AUC; the holistic row has no anatomy scores.
  seed_aucs = [metrics.roc_auc(_arrays(s, 1.0)["zeroshot_image/labels"][:, 1], _arrays(s, 1.0)["zeroshot_image/heldout_scores"][:, 1])
               for s in (0, 1)]
  assert table["per_finding"]["full"]["edema"]["image_auc_heldout"] == pytest.approx(np.mean(seed_aucs))
  assert "anatomy_auc" not in table["per_finding"]["global"]["edema"]
  assert "| finding | global only (holistic): image AUC, held-out | full (global + detection + fine): image AUC, held-out | full (global + detection + fine): anatomy AUC |" in text
  with pytest.raises(ValueError, match="findings, the labels given are 2"):
    ablation_table.write_table(results, n_resamples=10, labels=("a", "b"))
  assert target["difference"] == pytest.approx(full["mean"] - table["rows"]["global"]["metrics"]["image_auc"]["mean"])
  assert "| full (global + detection + fine) ≥ global only (holistic) | image AUC (train wording) | +" in text
  assert "`box_prior`: localisation/map50 0.300, localisation/mean_iou 0.600" in text


def test_a_run_without_kept_arrays_is_named(tmp_path):
  out = tmp_path / "eval"
  os.makedirs(out)
  (out / "metrics.json").write_text(json.dumps({"subjects": {"model": {}}}))
  with pytest.raises(FileNotFoundError, match="arrays/model.npz is missing"):
    ablation_table.collect_run(str(out), str(tmp_path / "r"), "full_seed0", row="full", seed=0)


def test_runner_skips_finished_runs_and_writes_the_table(tmp_path):
  """A rerun of launch/ablation.py does no training for a run whose result is there."""
  import subprocess
  import sys

  results = tmp_path / "results"
  ev = _fake_eval(tmp_path, "full_seed0", _arrays(0, 1.0))
  ablation_table.collect_run(ev, str(results), "full_seed0", row="full", seed=0)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "launch.ablation", "--config=configs/tiny.py", "--config_args=data=shapes",
       f"--root={tmp_path / 'root'}", f"--results={results}", "--rows=full", "--seeds=0"],
      cwd=root, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "full_seed0: done, skipped" in out.stdout
  assert not (tmp_path / "root" / "full_seed0").exists()  # nothing was trained
  assert (results / "TABLE.md").read_text().count("| full (global + detection + fine) | 1 |") == 1

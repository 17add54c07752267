r"""Time `metrics.choose_threshold` (cumulative counts, O(n log n)) against the algorithm it replaced
(every candidate threshold scored separately, O(n²)).

  python -m launch.benchmark_eval_metrics
  python -m launch.benchmark_eval_metrics --sizes=20000,1000000 --criterion=youden

Scores are continuous (n distinct values, so n + 1 candidate thresholds), 30 % positives. The
old algorithm runs in full up to --full_max; above it, it is timed on --sample candidates and
extrapolated linearly to all of them (each candidate costs the same O(n) pass). Prints one
Markdown row per size; both algorithms must choose the same threshold where the old one ran.
"""

import time

import numpy as np
from absl import app, flags

from avlm_jax.evaluate import metrics

_SIZES = flags.DEFINE_list("sizes", ["20000", "1000000"], "Numbers of scored examples.")
_CRITERION = flags.DEFINE_enum("criterion", "f1", list(metrics.THRESHOLD_CRITERIA), "Threshold criterion.")
_FULL_MAX = flags.DEFINE_integer("full_max", 50_000, "Largest n the old algorithm runs in full.")
_SAMPLE = flags.DEFINE_integer("sample", 200, "Candidates the old algorithm is timed on above --full_max.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Runs of the new algorithm (the median is reported).")


def _old_candidates(y, s):
  distinct = np.unique(s)
  return np.r_[distinct[0] - 1.0, (distinct[1:] + distinct[:-1]) / 2.0, distinct[-1] + 1.0]


def _old_choose_threshold(y, s, criterion, candidates):
  """The replaced algorithm, over `candidates` (all of them: the old result)."""
  metric = metrics.f1_score if criterion == "f1" else metrics.balanced_accuracy
  values = np.array([metric(y, s >= t) for t in candidates])
  best = np.flatnonzero(values >= np.nanmax(values) - 1e-12)
  return float(candidates[best[len(best) // 2]])


def main(argv):
  del argv
  criterion = _CRITERION.value
  print(f"| n | criterion | new s (median of {_REPEATS.value}) | old s | speed-up |")
  print("|---|---|---|---|---|")
  for n in map(int, _SIZES.value):
    rng = np.random.default_rng(0)
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 1.2 * y
    times = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      new = metrics.choose_threshold(y, s, criterion)
      times.append(time.perf_counter() - t0)
    new_s = float(np.median(times))
    t0 = time.perf_counter()
    candidates = _old_candidates(y, s)
    if n <= _FULL_MAX.value:
      old = _old_choose_threshold(y, s, criterion, candidates)
      old_s = time.perf_counter() - t0
      if old != new:
        raise SystemExit(f"n={n}: the old algorithm chose {old!r}, the new one {new!r}")
      old_txt = f"{old_s:.3f}"
    else:
      sample = rng.choice(candidates, size=min(_SAMPLE.value, len(candidates)), replace=False)
      _old_choose_threshold(y, s, criterion, sample)
      old_s = (time.perf_counter() - t0) * len(candidates) / len(sample)
      old_txt = f"≈ {old_s:,.0f} (extrapolated from {len(sample)} of {len(candidates):,} candidates)"
    print(f"| {n:,} | {criterion} | {new_s:.4f} | {old_txt} | {old_s / new_s:,.0f}× |")


if __name__ == "__main__":
  app.run(main)

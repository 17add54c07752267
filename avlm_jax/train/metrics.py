"""Training metrics: clu `Average`s accumulated between log points, a JSON-lines writer
(plus TensorBoard through `clu.metric_writers` when TensorFlow is installed), and the progress line.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from avlm_jax import fs


class MetricAccumulator:
  """Averages each scalar the step reports over the steps since the last `compute`; a step whose
  `nonfinite` flag is set (an update skipped under train.on_nonfinite=skip) is left out.

  The clu collection is merged inside one jitted function per step: merged eagerly, each of the
  ~30 `Average`s costs a handful of op dispatches per step (1.2 s per step on 8 fake CPU devices,
  more than the tiny step itself)."""

  def __init__(self):
    self._collection = None
    self._cls = None
    self._merge = None

  def update(self, step_metrics: dict[str, jax.Array]) -> None:
    if self._cls is None:
      cls = self._cls = clu_metrics.Collection.create(
          **{k: clu_metrics.Average.from_output(k) for k in sorted(step_metrics)})

      def merge(collection, m):
        merged = collection.merge(cls.single_from_model_output(**m))
        if "nonfinite" not in m:
          return merged
        return jax.tree.map(lambda new, old: jnp.where(m["nonfinite"] == 0, new, old), merged, collection)

      self._merge = jax.jit(merge)
    if self._collection is None:
      self._collection = self._cls.empty()
    self._collection = self._merge(self._collection, dict(step_metrics))

  def compute(self) -> dict[str, float]:
    if self._collection is None:
      return {}
    # Fetched first, so the divisions run in numpy rather than as ~30 device ops.
    values = {k: float(v) for k, v in jax.device_get(self._collection).compute().items()}
    self._collection = None
    return values


def _logged_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def trim_after(path: str, step: int) -> int:
  """Drop the lines of `path` (a metrics.jsonl) whose step is after `step`; returns how many.
  A line that does not parse (torn by a kill mid-write) is kept, ended with a newline, so nothing
  is lost and the next line starts clean. Rewritten whole (a temporary file and a rename locally, one
  object upload on GCS), so a crash here leaves the old file whole."""
  if not fs.exists(path):
    return 0
  lines = fs.read_text(path).splitlines(keepends=True)
  kept = []
  for line in lines:
    logged = _logged_step(line)
    if logged is None or logged <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    fs.write_text(path, "".join(kept))
  return len(lines) - len(kept)


class MetricWriter:
  """`metrics.jsonl` in the workdir always; TensorBoard summaries when clu's writers import.

  In a gs:// workdir, where an object cannot be appended to, the lines are kept here and the
  object is rewritten at every write: a log step is rare next to a train step, and a run killed
  between writes loses nothing a resume does not log again."""

  def __init__(self, workdir: str, *, enabled: bool = True, resumed_from: int | None = None):
    """`resumed_from`: the step a resumed run restored. Lines of later steps (logged before a crash,
    and about to be logged again) are dropped, so each step appears once."""
    self.path = fs.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    self._remote_text: str | None = None
    if enabled:
      fs.makedirs(workdir)
      if resumed_from is not None:
        trim_after(self.path, resumed_from)
      if fs.is_remote(self.path):
        self._remote_text = fs.read_text(self.path) if fs.exists(self.path) else ""
      try:  # clu.metric_writers needs TensorFlow (the optional `tensorboard` extra).
        from clu import metric_writers
        self._tb = metric_writers.create_default_writer(workdir, asynchronous=False)
      except ImportError:
        logging.info("TensorFlow not installed: metrics go to %s only", self.path)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **scalars}, sort_keys=True) + "\n"
    if self._remote_text is not None:
      self._remote_text += line
      fs.write_text(self.path, self._remote_text)
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self._tb is not None:
      self._tb.write_scalars(step, scalars)
      self._tb.flush()


class Throughput:
  """Steps/s and examples/s between log points, excluding the first step (compilation, warm-up)."""

  def __init__(self, global_batch: int):
    self.global_batch = global_batch
    self._t0: float | None = None
    self._step0 = 0
    self.data_wait_s = 0.0
    self.excluded_s = 0.0  # time spent on work that is not training (e.g. gradient diagnostics)

  def start(self, step: int) -> None:
    self._t0, self._step0, self.data_wait_s, self.excluded_s = time.perf_counter(), step, 0.0, 0.0

  def rates(self, step: int) -> dict[str, float]:
    if self._t0 is None or step <= self._step0:
      return {}
    dt = max(time.perf_counter() - self._t0 - self.excluded_s, 1e-9)
    steps_per_s = (step - self._step0) / dt
    out = {"steps_per_s": steps_per_s, "examples_per_s": steps_per_s * self.global_batch,
           "data_wait_fraction": self.data_wait_s / dt}
    self.start(step)
    return out


def progress_line(step: int, total: int, scalars: dict[str, float], rates: dict[str, float]) -> str:
  terms = ", ".join(f"{k[5:]} {scalars[k]:.4f}" for k in ("loss_l1", "loss_giou", "loss_fine", "loss_global")
                    if k in scalars)
  parts = [f"step {step}/{total}"]
  if "stage" in scalars:
    parts.append(f"stage {scalars['stage']:.0f}")
  parts.append(f"loss {scalars.get('loss', float('nan')):.4f} ({terms})")
  if rates:
    eta = (total - step) / max(rates["steps_per_s"], 1e-9)
    parts.append(f"{rates['steps_per_s']:.2f} steps/s, {rates['examples_per_s']:.1f} ex/s, "
                 f"ETA {datetime.timedelta(seconds=round(eta))}")
  return " | ".join(parts)


def check_finite(step: int, scalars: dict[str, Any]) -> None:
  bad = [k for k, v in scalars.items() if not np.isfinite(v)]
  if bad:
    raise FloatingPointError(f"step {step}: non-finite metrics {bad} ({ {k: scalars[k] for k in bad} })")

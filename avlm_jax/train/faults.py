"""What a long run does when something goes wrong: a bad config or workdir, a preemption (SIGTERM),
a non-finite step, a hung step. Each ends in one line that names the cause; none may cost the last
good checkpoint.

* `check_run_config` / `check_workdir`: before anything is built or compiled.
* `Preemption`: SIGTERM sets a flag; the loop saves at the next step boundary, waits for the save
  and ends cleanly. With several processes the step is agreed through JAX's preemption sync
  point (the coordination service catches the signal on every host).
* `NonFiniteGuard`: reads the step's `nonfinite` flag one step late (so the device never waits on
  the host), and at once before every save. `train.on_nonfinite='stop'` ends the run naming the
  step and the terms; 'skip' counts the step (its update was already dropped inside the step) and
  stops past `train.max_nonfinite_skips`.
* `Watchdog`: a step (or a collective, or the input pipeline) that takes longer than
  `train.step_timeout_s` dumps every thread's stack and exits non-zero, so a scheduler restarts
  the job instead of leaving it hung.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from avlm_jax import fs
from avlm_jax.config_check import ConfigValueError

NONFINITE_POLICIES = ("stop", "skip")
WATCHDOG_EXIT_CODE = 70  # EX_SOFTWARE: not the 0 of a finished or preempted run


class RunConfigError(ConfigValueError):
  """A config value or workdir this run cannot start with (named, before any compile)."""


class NonFiniteError(FloatingPointError):
  """A step produced a non-finite loss or gradient, and the policy says stop."""


def check_run_config(config) -> None:
  """Raise RunConfigError naming the first key whose value cannot work."""
  def positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise RunConfigError(f"config.{key}={value!r}: must be a positive integer")

  for key in ("total_steps", "batch_size", "log_every", "checkpoint_every", "max_checkpoints"):
    positive_int(key, config[key])
  if isinstance(config.data.max_bad_records, bool) or config.data.max_bad_records < 0:
    raise RunConfigError(f"config.data.max_bad_records={config.data.max_bad_records!r}: must be >= 0 "
                         "(0: the first bad record stops the run)")
  train = config.train
  if train.on_nonfinite not in NONFINITE_POLICIES:
    raise RunConfigError(f"config.train.on_nonfinite={train.on_nonfinite!r}: expected one of "
                         f"{', '.join(NONFINITE_POLICIES)}")
  if isinstance(train.max_nonfinite_skips, bool) or train.max_nonfinite_skips < 0:
    raise RunConfigError(f"config.train.max_nonfinite_skips={train.max_nonfinite_skips!r}: must be >= 0")
  if not train.step_timeout_s >= 0:  # also refuses NaN
    raise RunConfigError(f"config.train.step_timeout_s={train.step_timeout_s!r}: must be >= 0 (0: no watchdog)")


def check_workdir(workdir: str) -> None:
  """The workdir exists (it is created) and takes files; else one RunConfigError naming it."""
  if fs.is_remote(workdir):  # a bucket: write and delete a probe object
    probe = fs.join(workdir, f".write_probe_{os.getpid()}")
    try:
      fs.write_bytes(probe, b"")
      fs.remove(probe)
    except fs.StorageError as e:
      raise RunConfigError(f"workdir {workdir} is not writable: {e}") from None
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe_"):
      pass
  except OSError as e:
    raise RunConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


class Preemption:
  """SIGTERM -> stop at the next step boundary (after saving). Use as a context manager."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = False

  def __enter__(self) -> "Preemption":
    import jax

    self._multi = jax.process_count() > 1 and _preemption_sync_available()
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """True when the run should save at `step` and end (the same step on every process)."""
    if self._multi:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _preemption_sync_available() -> bool:
  try:
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


class NonFiniteGuard:
  """Checks each step's `nonfinite` flag: one step late, and at once before a save (`flush`)."""

  def __init__(self, policy: str = "stop", max_skips: int = 0, last_good: int | None = None):
    self.policy, self.max_skips = policy, max_skips
    self.skipped = 0
    self.last_good = last_good  # the newest step saved, or restored, with finite state
    self._pending: tuple[int, dict] | None = None

  def after_step(self, step: int, metrics: dict) -> None:
    """Call right after dispatching step `step`: checks the step before it."""
    pending, self._pending = self._pending, (step, metrics)
    if pending is not None:
      self._check(*pending)

  def flush(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      self._check(*pending)

  def _check(self, step: int, metrics: dict) -> None:
    if not float(metrics["nonfinite"]):
      return
    terms = _nonfinite_terms(metrics)
    if self.policy == "skip" and self.skipped < self.max_skips:
      self.skipped += 1
      print(f"warning: step {step}: non-finite {terms}; update skipped "
            f"({self.skipped} of train.max_nonfinite_skips={self.max_skips})", file=sys.stderr, flush=True)
      return
    kept = (f"the last good checkpoint is step {self.last_good}" if self.last_good
            else "no checkpoint was saved yet")
    limit = (f" after {self.skipped} skipped steps (train.max_nonfinite_skips={self.max_skips})"
             if self.policy == "skip" else "")
    raise NonFiniteError(f"step {step}: non-finite {terms}{limit}; nothing after step {self.last_good or 0} "
                         f"was saved, {kept}. Lower optimizer.learning_rate or set "
                         "train.on_nonfinite=skip, then rerun to resume")


def _nonfinite_terms(metrics: dict) -> str:
  import jax

  values = jax.device_get({k: v for k, v in metrics.items() if k == "loss" or k.startswith(("loss_", "l2_grads"))})
  bad = sorted((k for k, v in values.items() if not np.all(np.isfinite(v))),
               key=lambda k: (k != "loss", k.startswith("l2_"), k))  # the loss, its terms, then gradients
  return ", ".join(bad) if bad else "gradients"


class Watchdog:
  """Exits the process when `beat()` has not been called for `timeout_s` (0: off)."""

  def __init__(self, timeout_s: float, *, exit_code: int = WATCHDOG_EXIT_CODE):
    self.timeout_s, self.exit_code = float(timeout_s), exit_code
    self._last = time.monotonic()
    self._step = 0
    self._stop = threading.Event()
    self._suspended = False
    self._thread = None
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, name="avlm-watchdog", daemon=True)
      self._thread.start()

  def beat(self, step: int) -> None:
    self._last, self._step = time.monotonic(), step

  @contextlib.contextmanager
  def suspended(self):
    """For work that may rightly take long (evaluation): the clock stops, and restarts after."""
    self._suspended = True
    try:
      yield
    finally:
      self._last, self._suspended = time.monotonic(), False

  def close(self) -> None:
    self._stop.set()

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self.timeout_s / 4)):
      idle = time.monotonic() - self._last
      if idle > self.timeout_s and not self._suspended:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.write(f"error: no step finished for {idle:.0f}s after step {self._step} "
                         f"(train.step_timeout_s={self.timeout_s:g}): every thread's stack is above; "
                         f"exiting with {self.exit_code} so the job can be restarted\n")
        sys.stderr.flush()
        os._exit(self.exit_code)

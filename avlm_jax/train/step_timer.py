"""Timing training steps for the benchmarks: each step blocked on, the wait for input counted apart."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax


@dataclasses.dataclass
class StepTimes:
  step_s: list[float]  # per step: input wait + device step, blocked on
  wait_s: float  # total time spent in `next_batch()`
  wall_s: float

  @property
  def median_s(self) -> float:
    return statistics.median(self.step_s)

  @property
  def data_wait_fraction(self) -> float:
    return self.wait_s / self.wall_s


def time_steps(trainer, state: Any, warmup: int, steps: int, fixed_batch: bool = False) -> tuple[Any, StepTimes]:
  """Run `warmup` untimed steps, then `steps` timed ones, from a started `trainer`.

  `fixed_batch`: take one batch and step on it every time, so the times are the device step's
  alone, whatever the input pipeline can feed (the wait is then ~0).
  """
  if fixed_batch:
    one = trainer.next_batch()
    next_batch = lambda: one  # noqa: E731
  else:
    next_batch = trainer.next_batch
  for _ in range(warmup):
    state, _ = trainer.step_fn(state, next_batch(), trainer.prompts)
  jax.block_until_ready(state)
  step_s, wait_s = [], 0.0
  t_all = time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    batch = next_batch()
    t1 = time.perf_counter()
    state, metrics = trainer.step_fn(state, batch, trainer.prompts)
    jax.block_until_ready(metrics)
    wait_s += t1 - t0
    step_s.append(time.perf_counter() - t0)
  return state, StepTimes(step_s, wait_s, time.perf_counter() - t_all)


def started_trainer(config, workdir: str, devices=None):
  """`(trainer, state)`: the config's trainer with a freshly initialised state and its input
  pipeline started, as the step benchmarks and the profiler begin (the step compiles on first use)."""
  from avlm_jax.train.loop import build_trainer

  trainer = build_trainer(config, workdir, devices=devices)
  state = trainer.plan.initialize(jax.random.key(config.seed))
  trainer.start(state)
  return trainer, state

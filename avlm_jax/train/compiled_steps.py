"""What a run compiles from its config (mesh, model, state plan, train step), and a cache of it.

Tracing, lowering and loading the train step takes tens of seconds on a CPU even when the
persistent compilation cache skips XLA. A process that runs several trainings of the same shapes
(a notebook that trains and resumes, a sweep over checkpoint cadences, a test battery) passes one
`CompiledSteps` to `train_and_evaluate(..., compiled=...)` and builds each step once. The cache is
an explicit object: nothing is kept between runs unless the caller holds it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avlm_jax import anatomy, sharding
from avlm_jax.models.anatomy_vlm import build_model
from avlm_jax.train import data as train_data
from avlm_jax.train import schedule
from avlm_jax.train.checkpoint import flatten
from avlm_jax.train.state import StatePlan, make_optimizer, optimizer_groups
from avlm_jax.train.step import compile_grad_signal, compile_train_step, make_grad_signal_fn, make_train_step

# Config keys that never enter the compiled step: cadences, paths, limits, evaluation and corpus
# generation. Every other key (model, loss, optimizer, total_steps, stages, seed, batch, mesh,
# sharding, train.on_nonfinite, labels, ...) is part of a step's identity.
NOT_IN_STEP = ("log_every", "checkpoint_every", "max_checkpoints", "log_grad_signal", "evals", "distributed",
               "data.dir", "data.tokenizer_dir", "data.num_threads", "data.num_workers", "data.prefetch",
               "data.max_bad_records", "data.synthetic", "data.synthcxr", "train.step_timeout_s",
               "train.max_nonfinite_skips", "text_features")


@dataclasses.dataclass
class CompiledRun:
  """The parts of a run that depend only on the step's identity (see `step_key`).

  The train step is compiled on first use of `step_fn`, so a run with no step left to take (a
  restore onto another mesh, a resume of a finished run) compiles nothing.
  """

  mesh: Any
  model: Any
  plan: StatePlan
  starts: tuple[int, int]  # the steps after which the global and the fine terms start
  batch_keys: tuple[str, ...]
  make_step: Callable[[], Any]  # () -> compiled (state, batch, prompts) -> (state, metrics)
  make_grad_signal: Callable[[], Any]  # () -> compiled (state, batch, prompts) -> gradient split
  compile_s: float | None = None  # None until the step is compiled
  _step: Any = None
  _grad_signal: Any = None

  @property
  def is_compiled(self) -> bool:
    return self._step is not None

  @property
  def step_fn(self):
    if self._step is None:
      t0 = time.perf_counter()
      self._step = self.make_step()
      self.compile_s = time.perf_counter() - t0
    return self._step

  def grad_signal_fn(self):
    """The per-term gradient split, compiled on first use and kept with the step."""
    if self._grad_signal is None:
      self._grad_signal = self.make_grad_signal()
    return self._grad_signal


def step_key(config: ml_collections.ConfigDict, vocab_size: int, mesh) -> str:
  """What identifies a compiled step: the config without `NOT_IN_STEP`, the vocabulary size and
  the mesh (its axes and devices)."""
  flat = flatten(json.loads(config.to_json()))
  kept = {k: v for k, v in flat.items()
          if not any(k == p or k.startswith(p + ".") for p in NOT_IN_STEP)}
  return json.dumps({"config": kept, "vocab_size": vocab_size,
                     "mesh": dict(mesh.shape),
                     "devices": [(d.platform, d.id) for d in mesh.devices.flat]}, sort_keys=True)


def compile_run(config: ml_collections.ConfigDict, vocab_size: int, prompt_shape: tuple[int, int],
                mesh, say: Callable[[str], None]) -> CompiledRun:
  """Model, optimizer, state plan and the train step for `config` on `mesh` (AOT-compiled on its
  first use)."""
  rules = sharding.rules_for(config.sharding.preset)
  model = build_model(config.model, vocab_size)
  tx = make_optimizer(config.optimizer, config.total_steps, optimizer_groups(config.optimizer))
  s = config.data.image_size
  prompt_shape = tuple(prompt_shape)

  def init_params(rng):
    images = jnp.zeros((1, s, s, 1), jnp.float32)
    phrases = jnp.zeros((1, anatomy.NUM_REGIONS, config.data.max_phrase_len), jnp.int32)
    return model.init({"params": rng}, images, phrases, jnp.zeros(prompt_shape, jnp.int32))["params"]

  plan = StatePlan(init_params, tx, mesh, rules, frozen=("text",) if config.model.text.frozen else ())
  for line in sharding.preset_warnings(plan.boxed_params, mesh, rules, config.sharding.preset,
                                       config.sharding.warn_replicated_mib):
    say(f"warning: {line}")
  if config.model.text.frozen:
    prompt_spec = jax.ShapeDtypeStruct((len(config.labels), config.model.text.width), np.float32)
  else:
    prompt_spec = jax.ShapeDtypeStruct(prompt_shape, np.int32)
  starts = schedule.stage_starts(config.stages, config.total_steps)
  batch_spec = train_data.batch_spec(config)
  skip_nonfinite = config.train.on_nonfinite == "skip"  # the step itself drops such an update
  return CompiledRun(
      mesh, model, plan, tuple(starts), tuple(batch_spec),
      make_step=lambda: compile_train_step(
          make_train_step(model, tx, config.loss, config.seed, starts, skip_nonfinite=skip_nonfinite),
          plan, batch_spec, prompt_spec),
      make_grad_signal=lambda: compile_grad_signal(
          make_grad_signal_fn(model, config.loss, config.seed, starts), plan, batch_spec, prompt_spec))


class CompiledSteps:
  """Compiled runs by `step_key`, for later runs in this process (see the module docstring)."""

  def __init__(self):
    self._runs: dict[str, CompiledRun] = {}
    self.hits = 0

  def get(self, key: str, build: Callable[[], CompiledRun]) -> CompiledRun:
    if key in self._runs:
      self.hits += 1
    else:
      self._runs[key] = build()
    return self._runs[key]

  def __len__(self) -> int:
    return len(self._runs)

"""`train_and_evaluate(config, workdir)`: the whole training run, resumable from its workdir."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from jax.experimental import multihost_utils

from avlm_jax import fs, sharding
from avlm_jax.config_check import ConfigValueError
from avlm_jax.losses import multiscale
from avlm_jax.train import data as train_data
from avlm_jax.train import faults
from avlm_jax.train import metrics as train_metrics
from avlm_jax.train.checkpoint import Checkpointer
from avlm_jax.train import pretrained
from avlm_jax.train.compiled_steps import CompiledRun, CompiledSteps, compile_run, step_key
from avlm_jax.train.prefetch import BatchPrefetcher
from avlm_jax.train.state import StatePlan
from avlm_jax.train import text_cache  # noqa: I001: the module (for_run) beside its class
from avlm_jax.train.text_cache import TextFeatureCache


def _say(msg: str) -> None:
  """A line for the person running the job: stdout, process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def check_batch_layout(config: ml_collections.ConfigDict, mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % shards:
    raise ConfigValueError(f"config.batch_size={config.batch_size} is not divisible by the mesh's batch "
                     f"axes data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']} = {shards}")
  if config.batch_size % jax.process_count():
    raise ConfigValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")


@dataclasses.dataclass
class Trainer:
  """Everything a run needs, built from a config: mesh, data, model, state plan, compiled step.

  `start(state)` must be called once the state exists: with a frozen text tower it builds the
  text-feature cache from the state's text params and encodes the label prompts once.
  `data_iter` yields ready global batches, prepared `config.data.prefetch` steps ahead in a
  background thread; it is also what checkpoints save (the position of the last batch taken).
  `grad_signal(state, batch)` splits that step's backbone gradient over the loss terms (compiled
  on its first call; None with `config.log_grad_signal=False`).
  """

  config: ml_collections.ConfigDict
  mesh: Any
  model: Any
  data_iter: BatchPrefetcher
  prompt_tokens: np.ndarray  # (C, L) label-prompt token ids
  plan: StatePlan
  run: CompiledRun  # its `step_fn` is compiled on first use (see `step_fn` here)
  prompts: jax.Array | None = None  # tokens, or frozen-tower features, replicated on the mesh
  text_cache: TextFeatureCache | None = None
  data_dir: str = ""  # where a precomputed text-feature table is looked for (text_features.table)
  tokenizer: Any = None
  batch_keys: tuple[str, ...] = ()  # what the compiled step takes, in train_data.batch_spec order
  make_grad_signal: Any = None  # () -> compiled (state, batch, prompts) -> backbone gradient metrics
  _grad_signal: Any = None
  _step_announced: bool = False

  @property
  def step_fn(self):
    """The compiled (state, batch, prompts) -> (state, metrics); compiled on first use, so a run
    with no step to take compiles nothing."""
    if not self._step_announced:
      self._step_announced = True
      if self.run.is_compiled:
        _say(f"train step reused from this process's compiled steps (compiled in {self.run.compile_s:.1f}s)")
      else:
        mem = self.run.step_fn.memory_analysis()
        _say(f"compiled train step in {self.run.compile_s:.1f}s"
             + (f"; temp memory {mem.temp_size_in_bytes / 2**20:.1f} MiB per device" if mem is not None else "")
             + f"; stages: +global after step {self.run.starts[0]}, +fine after step {self.run.starts[1]}")
    return self.run.step_fn

  @property
  def compile_s(self) -> float:
    self.step_fn  # noqa: B018: compiles if it is not yet
    return self.run.compile_s

  def start(self, state) -> None:
    if self.config.model.text.frozen:
      if not self.config.model.text.init_from:
        _say("warning: model.text.frozen without model.text.init_from: the frozen text tower keeps "
             "its random initialisation")
      # Each process encodes its own new texts on its own first device, from its own full copy of
      # the frozen text params (the state's buffers are donated every step): no collectives, so
      # processes may miss the cache at different times. process_allgather assembles params that
      # FSDP shards across hosts.
      text_params = jax.device_put(multihost_utils.process_allgather(state.params["text"], tiled=True),
                                   jax.local_devices()[0])
      encode = jax.jit(lambda params, tokens: self.model.text.apply({"params": params}, tokens)["pooled"])
      self.text_cache = text_cache.for_run(self.config, lambda tokens: encode(text_params, tokens), text_params,
                                           self.tokenizer, self.data_dir, _say)
      prompts = self.text_cache.features(self.prompt_tokens)
    else:
      prompts = self.prompt_tokens
    self.prompts = jax.device_put(prompts, sharding.replicated(self.mesh))

  def prepare(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A process-local numpy batch -> the step's global batch (runs in the prefetch thread)."""
    if self.text_cache is not None and "phrase_features" in self.batch_keys:
      local["phrase_features"] = self.text_cache.features(local.pop("phrase_tokens"))
    return train_data.to_global({k: local[k] for k in self.batch_keys}, self.mesh)

  def next_batch(self) -> dict[str, jax.Array]:
    return next(self.data_iter)

  def grad_signal(self, state, batch) -> dict[str, float] | None:
    if self.make_grad_signal is None:
      return None
    if self._grad_signal is None:
      self._grad_signal = self.make_grad_signal()
    return {k: float(v) for k, v in jax.device_get(self._grad_signal(state, batch, self.prompts)).items()}


def build_trainer(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None,
                  compiled: CompiledSteps | None = None) -> Trainer:
  """The run's data, model and compiled step; the latter from `compiled` when it holds this step."""
  multiscale.check_weights(config.model, config.loss)
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices, config.mesh_dcn.to_dict())
  sharding.check_mesh_for_preset(mesh, config.sharding.preset, config.mesh_dcn.to_dict())
  check_batch_layout(config, mesh)
  _say(f"mesh {dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} device(s), "
       f"preset {config.sharding.preset!r}")

  data_dir, tokenizer = train_data.prepare_dataset(config, workdir)
  prompts = tokenizer(train_data.label_prompt_texts(config), config.data.max_prompt_len)
  pretrained.check_text_config(config.model.text, tokenizer.vocab_size)
  build = lambda: compile_run(config, tokenizer.vocab_size, prompts.shape, mesh, _say)  # noqa: E731
  run = build() if compiled is None else compiled.get(step_key(config, tokenizer.vocab_size, mesh), build)
  mesh = run.mesh  # on a reuse: an equal mesh, the one the step's shardings name
  source = train_data.make_train_iterator(config, data_dir, tokenizer, workdir)
  trainer = Trainer(config, mesh, run.model, None, prompts, run.plan, run, batch_keys=run.batch_keys,
                    data_dir=data_dir, tokenizer=tokenizer)
  if config.get("log_grad_signal", True):
    trainer.make_grad_signal = run.grad_signal_fn
  trainer.data_iter = BatchPrefetcher(source, trainer.prepare, config.data.prefetch)
  return trainer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: list | None = None, stop_after: int | None = None,
                       compiled: CompiledSteps | None = None) -> dict[str, Any]:
  """Train `config` in `workdir`; resume from its latest checkpoint if there is one.

  `devices` restricts the mesh to a subset of devices; `stop_after` ends this process after that
  many steps (checkpointing first), as a time-boxed job would; SIGTERM does the same at the next
  step boundary (`faults.Preemption`). `compiled` (a `CompiledSteps`) reuses a train step that an
  earlier run in this process compiled for the same shapes, and keeps this one for later runs.
  Returns `state` (the final TrainState), `history` (the logged scalars), `first_step` and
  `preempted` (the step saved on SIGTERM, else None). Raises, each with a one-line message:
  faults.RunConfigError (a config value or workdir that cannot work; before anything is built),
  faults.NonFiniteError (nothing non-finite is ever saved) and checkpoint.CheckpointSaveError.
  """
  workdir = fs.abspath(workdir)  # a folder or a gs:// URL
  faults.check_run_config(config)
  faults.check_workdir(workdir)
  config_json = json.loads(config.to_json())
  ckpt = Checkpointer(fs.join(workdir, "checkpoints"), max_to_keep=config.max_checkpoints)
  # A checkpoint of another config stops the run before any compile; an unreadable one is set aside.
  first_step = ckpt.newest_readable_config(config_json, _say)
  trainer = build_trainer(config, workdir, devices, compiled)
  data_iter = trainer.data_iter

  if first_step:
    first_step, state = ckpt.restore_newest(trainer.plan.abstract, data_iter, config_json, _say)
  if first_step:
    _say(f"resumed from {ckpt.directory}/{first_step}")
  else:
    state = trainer.plan.initialize(jax.random.key(config.seed))
    params, summaries = pretrained.load_pretrained(state.params, config.model, config.data.image_size)
    state = state.replace(params=params)
    for line in summaries:
      _say(line)
  trainer.start(state)
  _say(f"parameters: {int(parameter_overview.count_parameters(state.params)):,}")

  from avlm_jax.evaluate.in_training import periodic_evals  # evaluation imports the train package
  evals = periodic_evals(config, workdir, train_data.resolve_data_dir(config, workdir))
  writer = train_metrics.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                      resumed_from=first_step)
  accum = train_metrics.MetricAccumulator()
  clock = train_metrics.Throughput(config.batch_size)
  history: list[dict[str, float]] = []
  last_step = config.total_steps if stop_after is None else min(config.total_steps, first_step + stop_after)
  guard = faults.NonFiniteGuard(config.train.on_nonfinite, config.train.max_nonfinite_skips,
                                last_good=first_step or None)
  if first_step < last_step:
    trainer.step_fn  # noqa: B018: compile now, before the watchdog times steps (a compile can take minutes)
  watchdog = faults.Watchdog(config.train.step_timeout_s)
  bad_records = train_data.bad_record_log(config, workdir)
  preempted = None
  try:
    with faults.Preemption() as preemption:
      for step in range(first_step, last_step):
        t_data = time.perf_counter()
        batch = trainer.next_batch()
        clock.data_wait_s += time.perf_counter() - t_data
        done = step + 1
        log_now = done % config.log_every == 0 or done == last_step
        signal = None
        if log_now and trainer.make_grad_signal is not None:  # the state before the step (it
          # donates the state), with the step's batch: the split of exactly this step's gradient
          jax.block_until_ready(state)
          t_signal = time.perf_counter()
          signal = trainer.grad_signal(state, batch)
          clock.excluded_s += time.perf_counter() - t_signal  # a diagnostic, not training throughput
        state, step_metrics = trainer.step_fn(state, batch, trainer.prompts)
        guard.after_step(done, step_metrics)  # waits for the step before (so a hang shows here)
        watchdog.beat(step)
        ckpt.check_for_errors()  # a background save that failed stops the run now, not at the next
        accum.update(step_metrics)
        if done == first_step + 1:
          jax.block_until_ready(state)
          clock.start(done)  # throughput excludes the first step (compilation, warm-up)
        if log_now:
          guard.flush()
          scalars = accum.compute()
          scalars.update(signal or {})
          if bad_records is not None:
            scalars["bad_records"] = float(len(bad_records.entries()))
          if trainer.text_cache is not None:  # table and cache hit rates, sizes
            scalars.update(trainer.text_cache.metrics())
          if guard.policy == "skip":
            scalars["nonfinite_skipped"] = float(guard.skipped)
          else:
            train_metrics.check_finite(done, scalars)
          rates = clock.rates(done)
          scalars.update(rates)
          writer.write(done, scalars)
          history.append({"step": done, **scalars})
          _say(train_metrics.progress_line(done, config.total_steps, scalars, rates))
        stop = done < last_step and preemption.reached(done)
        if done % config.checkpoint_every == 0 or done == last_step or stop:
          guard.flush()  # never save a non-finite state
          ckpt.save(done, state, data_iter, config_json, force=stop)
          guard.last_good = done
        if stop:
          ckpt.wait()
          preempted = done
          _say(f"preempted (SIGTERM): saved step {done} in {ckpt.directory}; rerun the same command "
               "to resume")
          break
        if evals is not None and evals.due(done, last_step):
          with watchdog.suspended():
            eval_scalars = evals.run(done, state.params)
          writer.write(done, eval_scalars)
          history.append({"step": done, **eval_scalars})
          _say(f"step {done} evals: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in eval_scalars.items()))
  except BaseException:
    watchdog.close()
    data_iter.close()
    try:  # saves already under way hold good states: let them finish
      ckpt.wait()
      ckpt.close()
    except Exception:  # noqa: BLE001: the first error is the one to report
      pass
    raise
  watchdog.close()
  data_iter.close()
  ckpt.wait()
  ckpt.close()
  if preempted is None:
    _say(f"done: checkpoints in {ckpt.directory}, metrics in {writer.path}")
  return {"state": state, "history": history, "first_step": first_step, "preempted": preempted}

"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

Where the settings come from, first match wins:
  1. `config.distributed.coordinator_address / num_processes / process_id`;
  2. `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (what `launch/multihost_local.sh`
     and `launch/slurm_gpu.sbatch` export);
  3. a cluster JAX detects by itself (Cloud TPU pod workers, SLURM, Open MPI), or
     `AVLM_DISTRIBUTED=auto` (what `launch/tpu_pod.sh` exports): initialize() with no addresses.
Otherwise the run is single-process and nothing is initialised.

A process that cannot reach the coordinator would, inside JAX, abort after its RPC deadline with
a C++ stack trace. Non-coordinator processes therefore first wait for the coordinator's port for
at most `config.distributed.timeout_s` and raise `CoordinatorUnreachableError`, naming the
address, the timeout and the key that sets it, if it never opens.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import jax
import ml_collections

ENV_ADDRESS, ENV_NUM, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Environment variables by which JAX's own cluster detection recognises a multi-process job.
_CLUSTER_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


class CoordinatorUnreachableError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator_address: str | None  # None: let JAX detect the cluster
  num_processes: int | None
  process_id: int | None
  timeout_s: int


def settings(cfg: ml_collections.ConfigDict, environ: dict | None = None) -> Settings | None:
  """The multi-process settings of this run, or None for a single process."""
  env = os.environ if environ is None else environ
  timeout = int(cfg.timeout_s)
  if timeout <= 0:
    raise ValueError(f"config.distributed.timeout_s={cfg.timeout_s}; must be a positive number of seconds")
  address = cfg.coordinator_address or env.get(ENV_ADDRESS, "")
  if address:
    num = cfg.num_processes if cfg.num_processes > 0 else _env_int(env, ENV_NUM)
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int(env, ENV_ID)
    if num is None or pid is None:
      raise ValueError(f"coordinator address {address!r} is set, but the number of processes and this "
                       f"process's id are not: set config.distributed.num_processes/process_id or "
                       f"{ENV_NUM}/{ENV_ID}")
    if not 0 <= pid < num:
      raise ValueError(f"process id {pid} is not in [0, {num}) (config.distributed / {ENV_ID})")
    if ":" not in address:
      raise ValueError(f"coordinator address {address!r} needs a port, e.g. 'host:1234'")
    return Settings(address, num, pid, timeout)
  slurm_multi = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
  if slurm_multi or env.get("AVLM_DISTRIBUTED") == "auto" or any(m in env for m in _CLUSTER_MARKERS):
    return Settings(None, None, None, timeout)
  return None


def _env_int(env, key: str) -> int | None:
  value = env.get(key)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.5) -> None:
  """Return once a TCP connection to `address` succeeds; raise after `timeout_s` seconds."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  last_error: OSError | None = None
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise CoordinatorUnreachableError(
          f"could not reach the JAX coordinator at {address} within {timeout_s:g} s "
          f"(last error: {last_error}). Check that process 0 is running and that this host can "
          f"reach it; the wait is config.distributed.timeout_s")
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=min(poll_s, remaining)):
        return
    except OSError as e:
      last_error = e
      time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))


def initialize(cfg: ml_collections.ConfigDict) -> Settings | None:
  """Initialise JAX's distributed runtime if this is a multi-process run. Call before using devices.

  On CPU, cross-process collectives need an implementation: `config.distributed.cpu_collectives`
  ('gloo' by default; '' leaves JAX's default, which has none).
  """
  s = settings(cfg)
  if s is None:
    return None
  if cfg.cpu_collectives:
    # Only the CPU client reads it; harmless where the devices are accelerators.
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  t0 = time.monotonic()
  if s.coordinator_address is not None and s.process_id != 0:
    wait_for_coordinator(s.coordinator_address, s.timeout_s)
  remaining = max(1, int(s.timeout_s - (time.monotonic() - t0)))
  jax.distributed.initialize(s.coordinator_address, s.num_processes, s.process_id,
                             initialization_timeout=remaining)
  return s

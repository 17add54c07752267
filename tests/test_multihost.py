"""Multi-process start-up: settings from config/env, a bounded wait for the coordinator, and two
real processes (jax.distributed on localhost, gloo collectives) training like one."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from avlm_jax import distributed
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
  c = common.base_config().distributed
  c.unlock()
  c.update(kw)
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_settings_from_environment_and_config():
  env = {"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed.settings(_cfg(), env) == distributed.Settings("host0:1234", 4, 3, 300)
  # The config wins over the environment.
  s = distributed.settings(_cfg(coordinator_address="h:9", num_processes=2, process_id=0, timeout_s=7), env)
  assert s == distributed.Settings("h:9", 2, 0, 7)
  assert distributed.settings(_cfg(), {}) is None  # single process
  assert distributed.settings(_cfg(), {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"}).coordinator_address is None
  assert distributed.settings(_cfg(), {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "number of processes and this process's id are not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"process id 2 is not in \[0, 2\)"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "needs a port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "1"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_bad_settings_are_named(env, message):
  with pytest.raises(ValueError, match=message):
    distributed.settings(_cfg(), env)


def test_unreachable_coordinator_fails_within_the_timeout():
  address = f"localhost:{_free_port()}"  # nothing listens there
  t0 = time.monotonic()
  with pytest.raises(distributed.CoordinatorUnreachableError,
                     match=f"could not reach the JAX coordinator at {address} within 1.5 s"):
    distributed.wait_for_coordinator(address, 1.5, poll_s=0.2)
  assert time.monotonic() - t0 < 5


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", JAX_PLATFORMS="cpu",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", **extra)
  return env


def test_train_cli_names_an_unreachable_coordinator(tmp_path):
  port = _free_port()
  t0 = time.monotonic()
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
       "--config.distributed.timeout_s=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"))
  assert proc.returncode != 0
  assert f"error: could not reach the JAX coordinator at localhost:{port} within 2 s" in proc.stderr
  assert time.monotonic() - t0 < 60


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"], r["loss_fine"]) for r in map(json.loads, f)]


@pytest.mark.slow
def test_two_processes_train_the_tiny_config_like_one(tmp_path):
  """Same global batches (each process reads its slice), same losses, a checkpoint both wrote."""
  args = ["--config=configs/tiny.py:data=shapes,steps=4,batch=8", "--config.log_every=1", "--config.log_grad_signal=False", "--config.checkpoint_every=4",
          "--config.data.synthetic.num_train=64", "--config.data.synthetic.num_val=8",
          "--config.model.image.depth=1", "--config.model.text.depth=1"]  # halves the compiles
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  two = subprocess.Popen(
      ["bash", "launch/multihost_local.sh", *args, f"--workdir={multi}"], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=_env(NPROC="2", DEVICES_PER_PROC="1", PORT=str(_free_port()), TIMEOUT_S="60",
               AVLM_VENV=os.path.dirname(os.path.dirname(sys.executable))))
  one = subprocess.run([sys.executable, "-m", "launch.train", *args, f"--workdir={single}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  out, _ = two.communicate(timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  assert two.returncode == 0, out[-3000:] + open(multi / "process_1.log").read()[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} on 2 cpu device(s)" in out
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} on 2 cpu device(s)" in one.stdout
  a, b = _losses(multi), _losses(single)
  assert [s for s, *_ in a] == [1, 2, 3, 4] == [s for s, *_ in b]
  for (step, loss_a, fine_a), (_, loss_b, fine_b) in zip(a, b):
    assert loss_a == pytest.approx(loss_b, rel=1e-4), step
    assert fine_a == pytest.approx(fine_b, rel=1e-4), step
  assert a[0][1] != a[-1][1]  # it trained
  assert os.path.isdir(multi / "checkpoints" / "4")

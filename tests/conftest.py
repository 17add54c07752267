"""8 fake CPU devices for every test, set before JAX is imported; fast compiles; shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Fast compiles here and in every command a test starts (CLI runs, the GPU dry run, notebooks):
# the tests check behaviour, not the compiled code's speed.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_disable_most_optimizations", True)


_SHARED_RUNS = ("tiny_checkpoint", "holistic_checkpoint")


def _xdist_group(item) -> str | None:
  """Which tests must share a pytest-xdist worker so that what they build is built once (with
  `--dist loadgroup`, as tests/run.sh runs): the session's trained checkpoints and each expensive
  fixture a test module defines (session-scoped, so a worker never builds one twice). Tests that reuse a train step through
  `compiled_steps` carry their own `xdist_group` mark, one group per step (a group runs
  serially, so groups are kept small)."""
  if item.get_closest_marker("xdist_group") is not None:
    return None
  names = set(item.fixturenames)
  if names & set(_SHARED_RUNS):
    return "trained_checkpoints"
  for name, defs in item._fixtureinfo.name2fixturedefs.items():
    if defs and defs[-1].scope in ("module", "session") and defs[-1].baseid.endswith(".py"):
      return f"module_fixture:{defs[-1].baseid}::{name}"
  return None


def pytest_itemcollected(item):
  # Per item, as it is collected: pytest-xdist's worker turns `xdist_group` marks into node ids in
  # its own `pytest_collection_modifyitems`, which runs before a conftest's.
  group = _xdist_group(item)
  if group is not None:
    item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session (and the processes its tests start): many
  tests compile the same tiny train step, and a cache hit skips XLA entirely."""
  if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: the workers share one cache
    d = str(tmp_path_factory.getbasetemp().parent / "jax_cache")
    os.makedirs(d, exist_ok=True)
  else:
    d = str(tmp_path_factory.mktemp("jax_cache"))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = d
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield d


@pytest.fixture(scope="session")
def compiled_steps():
  """Train steps compiled by one test, reused by later runs in this pytest process that compile
  the same step (`train_and_evaluate(..., compiled=...)`): a reuse skips tracing, lowering and
  loading, which take tens of seconds on a CPU even when the persistent cache skips XLA."""
  from avlm_jax.train.compiled_steps import CompiledSteps

  return CompiledSteps()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  """A small built-in corpus (train 64, validation 16) with its tokenizer."""
  from data_pipelines import synthetic_shapes

  d = str(tmp_path_factory.mktemp("synthetic"))
  return synthetic_shapes.generate(d, num_train=64, num_val=16, seed=0, image_size=48, num_shards=3)


@pytest.fixture(scope="session")
def tokenizer(synthetic_dir):
  from avlm_jax.tokenizer import TextTokenizer

  return TextTokenizer(os.path.join(synthetic_dir, "tokenizer"))


def tiny_config(arg="", **overrides):
  """The tiny config on drawn shapes (plus `arg`, e.g. "holistic"), with dotted-key overrides,
  e.g. tiny_config(**{"mesh.fsdp": 2})."""
  from configs import tiny

  c = tiny.get_config(",".join(filter(None, ["data=shapes", arg])))  # drawn shapes: fast, need no CT
  # The per-term gradient split compiles a second function on the first log step: only the tests
  # of it (and the shared tiny_checkpoint run) switch it on.
  c.log_grad_signal = False
  return with_overrides(c, overrides)


def with_overrides(config, overrides: dict):
  """`config` with dotted-key overrides set, e.g. {"mesh.fsdp": 2}."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


_KILLED_IN_SAVE = r"""
import os, signal, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_disable_most_optimizations", True)
sys.path.insert(0, {root!r})
from avlm_jax.train import checkpoint, loop
from {module} import {function}
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args, **kwargs):
  out = save(self, step, *args, **kwargs)
  if step == {step}:  # the write of this step is under way in the background: kill -9 now
    os.kill(os.getpid(), signal.SIGKILL)
  return out
checkpoint.Checkpointer.save = save_then_die
loop.train_and_evaluate({function}(**{overrides!r}), {workdir!r}, devices=jax.devices()[:1])
"""


def killed_in_save_script(config_function: str, overrides: dict, workdir: str, step: int = 4) -> str:
  """A `python -c` script that trains `module.function(**overrides)` (e.g. "tests.conftest.tiny_config")
  into `workdir` on one device and kills itself with SIGKILL while the save of `step` is being written."""
  module, _, function = config_function.rpartition(".")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return _KILLED_IN_SAVE.format(root=root, module=module, function=function, overrides=overrides,
                                workdir=workdir, step=step)


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_dir, tmp_path_factory):
  """(workdir, config) of a 2-step tiny run on one device, with in-training evals at step 2."""
  from avlm_jax.train.loop import train_and_evaluate

  cfg = tiny_config(**{"data.kind": "array_record", "data.dir": synthetic_dir, "total_steps": 2,
                       "log_every": 1, "checkpoint_every": 2, "evals.every_steps": 2, "log_grad_signal": True,
                       "evals.in_training": ("zeroshot_image", "localisation")})
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  return workdir, cfg


@pytest.fixture(scope="session")
def holistic_checkpoint(synthetic_dir, tmp_path_factory):
  """(workdir, config) of a 2-step run of the holistic ablation (no anatomy tokens) on one device."""
  from avlm_jax.train.loop import train_and_evaluate

  cfg = tiny_config("holistic", **{"data.kind": "array_record", "data.dir": synthetic_dir, "total_steps": 2,
                                   "log_every": 1, "checkpoint_every": 2})
  workdir = str(tmp_path_factory.mktemp("holistic_run"))
  run = train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  return workdir, cfg, run["history"]

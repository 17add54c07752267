r"""Train Anatomy-VLM.

  python -m launch.train --config=configs/tiny.py --workdir=workdir/tiny
  python -m launch.train --config=configs/tiny.py:steps=50 --config.batch_size=32 --workdir=...

Rerunning the same command on the same workdir resumes from its latest checkpoint.
Several processes (hosts): see launch/multihost_local.sh, launch/tpu_pod.sh, launch/slurm_gpu.sbatch.
"""

import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from avlm_jax.config_check import check_config_keys, run_app
from configs import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and generated data go.")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  import jax

  from avlm_jax import distributed, fs
  from avlm_jax.train.checkpoint import CheckpointSaveError, IncompatibleCheckpointError
  from avlm_jax.config_check import ConfigValueError
  from avlm_jax.train.faults import NonFiniteError
  from avlm_jax.train.loop import train_and_evaluate
  from data_pipelines.schema import RecordError

  try:
    check_config_keys(_CONFIG.value, common.base_config())
    distributed.initialize(_CONFIG.value.distributed)  # multi-process runs only; before any device use
    out = train_and_evaluate(_CONFIG.value, _WORKDIR.value)  # SIGTERM: saves, says so, returns (exit 0)
  except (KeyError, IncompatibleCheckpointError, distributed.CoordinatorUnreachableError, ConfigValueError,
          NonFiniteError, CheckpointSaveError, RecordError, fs.StorageError) as e:
    sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
  if out["preempted"] is None and jax.process_index() == 0:
    print("\n".join(next_steps(_WORKDIR.value)), flush=True)


def next_steps(workdir: str) -> list[str]:
  """What a user runs on a finished run's workdir (each command reads the config saved with the
  checkpoint), with this run's interpreter (the project's venv when launch/local.sh started it)."""
  py = os.path.relpath(sys.executable)
  py = shlex.quote(py if not py.startswith("..") else sys.executable)
  w = shlex.quote(workdir.rstrip("/"))
  return ["next:",
          f"  {py} -m launch.evaluate --checkpoint={w} --out={w}/eval   # scores beside the free baselines",
          f"  {py} -m launch.interpret --checkpoint={w} --images='DIR_OR_GLOB' --out={w}/interpret   # your radiographs",
          f"  {py} -m launch.export --checkpoint={w} --out={w}/bundle   # a portable model bundle"]


if __name__ == "__main__":
  run_app(main, common.base_config())

r"""Evaluate a checkpoint: every enabled `config.evals.<name>` evaluator on the model and its
baselines; writes metrics.json, report.md and pictures/ into --out.

  python -m launch.evaluate --checkpoint=workdir/tiny --out=workdir/tiny/eval
  python -m launch.evaluate --checkpoint=workdir/tiny/checkpoints/200 --config=configs/tiny.py \
      --only=zeroshot_image,localisation --config.evals.holistic_checkpoint=workdir/tiny_holistic

--checkpoint takes a step folder, a checkpoints folder (latest step), a training workdir or a model
bundle (`launch.export`; give --data_dir, since the bundle holds no data).
Without --config, the config saved with the checkpoint is used (and `--config.KEY=VALUE` needs a
--config). A config given must be the one the checkpoint was trained with (the check names
differing keys).
"""

import sys

from absl import flags
from ml_collections import config_flags

from avlm_jax.config_check import check_config_keys, run_app
from configs import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to the training config file[:arg].",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step folder, checkpoints folder, workdir or model bundle.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <checkpoint folder>/../eval_<step>).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Triple folder to evaluate on (default: the config's).")
_ONLY = flags.DEFINE_list("only", None, "Evaluators to run (default: every enabled one).")
flags.mark_flags_as_required(["checkpoint"])


def main():
  from avlm_jax import bundle, fs
  from avlm_jax.evaluate.model_runner import CheckpointNotFoundError, resolve_checkpoint, saved_config, workdir_of
  from avlm_jax.evaluate.radiograph_io import ImageReadError
  from avlm_jax.evaluate.runner import evaluate_checkpoint
  from avlm_jax.train.checkpoint import IncompatibleCheckpointError

  try:
    if bundle.is_bundle(_CHECKPOINT.value):  # params, config and tokenizer from the folder
      config = _CONFIG.value or bundle.bundled_config(_CHECKPOINT.value)
      target, out = _CHECKPOINT.value, _OUT.value or fs.join(_CHECKPOINT.value, "eval")
    else:
      directory, step = resolve_checkpoint(_CHECKPOINT.value)
      target = fs.join(directory, str(step))
      config = _CONFIG.value or saved_config(target)
      out = _OUT.value or fs.join(workdir_of(directory) or directory, f"eval_{step}")
    check_config_keys(config, common.base_config())
    with fs.staged_dir(out) as local_out:  # a gs:// --out gets the finished folder
      evaluate_checkpoint(target, config, local_out, data_dir=_DATA_DIR.value, names=_ONLY.value)
  except (KeyError, IncompatibleCheckpointError, CheckpointNotFoundError, FileNotFoundError,
          ImageReadError, bundle.BundleError, fs.StorageError) as e:
    sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")


if __name__ == "__main__":
  run_app(main, common.base_config())

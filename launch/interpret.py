r"""Interpret a folder of radiographs (DICOM, PNG, JPEG) with a checkpoint: one JSON and one overlay
PNG per image, findings.csv (a row per image), errors.csv (the files that could not be read, and
why) and a self-contained index.html that sorts and filters by finding.

  python -m launch.interpret --checkpoint=workdir/tiny --images=scans/ --out=scans_interpreted
  python -m launch.interpret --checkpoint=workdir/tiny/checkpoints/200 --images='scans/**/*.dcm' \
      --out=out --batch_size=64 --config=configs/tiny.py --config.data.dir=workdir/tiny/data

--checkpoint takes a step folder, a checkpoints folder (latest step), a training workdir or a model
bundle; --config (with --config.<key>=… overrides) is needed only to override the config saved with
the checkpoint. --images is a folder (searched recursively) or a quoted glob. A file that cannot be
read is printed with its reason and listed in errors.csv and index.html; the rest carry on. Exit
status: 0 when at least one image was interpreted, 1 when none was (or on a bad argument).
"""

import sys

from absl import flags
from ml_collections import config_flags

from avlm_jax.config_check import check_config_keys, run_app
from configs import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file[:arg] (default: the one saved with the checkpoint).", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step folder, checkpoints folder, workdir or model bundle.")
_IMAGES = flags.DEFINE_string("images", None, "A folder of radiographs (recursive) or a glob pattern.")
_OUT = flags.DEFINE_string("out", None, "Output folder (created; files of an earlier run are overwritten).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per batch (rounded up to a multiple of the devices).",
                                   lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", 0, "Threads reading and writing files (0: one per core, at most 8).",
                                lower_bound=0)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar with an ETA on stderr.")
flags.mark_flags_as_required(["checkpoint", "images", "out"])


def main():
  from avlm_jax import batch_interpret, interpret
  from avlm_jax.bundle import BundleError
  from avlm_jax.config_check import ConfigValueError
  from avlm_jax.evaluate.model_runner import CheckpointNotFoundError
  from avlm_jax.train.checkpoint import IncompatibleCheckpointError

  try:
    if _CONFIG.value is not None:
      check_config_keys(_CONFIG.value, common.base_config())
    interpreter = interpret.load(_CHECKPOINT.value, _CONFIG.value)
    summary = batch_interpret.interpret_folder(interpreter, _IMAGES.value, _OUT.value,
                                               batch_size=_BATCH_SIZE.value, workers=_WORKERS.value or None,
                                               progress=_PROGRESS.value)
  except (KeyError, IncompatibleCheckpointError, CheckpointNotFoundError, FileNotFoundError,
          ConfigValueError, BundleError) as e:
    sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
  print(batch_interpret.describe(summary), flush=True)
  if not summary.records:
    sys.exit(f"error: none of the {len(summary.failures)} files could be interpreted (reasons above)")


if __name__ == "__main__":
  run_app(main, common.base_config())

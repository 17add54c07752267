r"""Export a checkpoint as a portable model bundle (avlm_jax/bundle.py): params as safetensors, the
resolved config as JSON, the tokenizer files and a model card. The bundle loads without orbax or
the config file: `interpret.load(bundle)`, `python -m launch.evaluate --checkpoint=bundle ...`.

  python -m launch.export --checkpoint=workdir/tiny --out=workdir/tiny/bundle
  python -m launch.export --checkpoint=workdir/tiny/checkpoints/200 --config=configs/tiny.py --out=bundle/

--checkpoint takes a step folder, a checkpoints folder (latest step) or a training workdir; the
config defaults to the one saved with it. The card carries the evaluation numbers of an
evaluation of the same step beside the checkpoint (`<workdir>/eval*/metrics.json`), if any.
"""

import sys

from absl import flags

from avlm_jax.config_check import run_app
from configs import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step folder, checkpoints folder or training workdir.")
_CONFIG = flags.DEFINE_string("config", "", "Training config file[:arg] (default: the one saved with the checkpoint).")
_OUT = flags.DEFINE_string("out", None, "The bundle folder to write (new or empty).")
flags.mark_flags_as_required(["checkpoint", "out"])


def main():
  from avlm_jax import bundle
  from avlm_jax.evaluate.model_runner import CheckpointNotFoundError
  from avlm_jax.train.checkpoint import IncompatibleCheckpointError

  try:
    bundle.export(_CHECKPOINT.value, _OUT.value, _CONFIG.value or None)
  except (CheckpointNotFoundError, IncompatibleCheckpointError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  run_app(main, common.base_config())

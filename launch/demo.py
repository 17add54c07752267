r"""Serve a checkpoint as an interactive Gradio app: upload a radiograph (DICOM, PNG or JPEG) and see
its anatomy boxes, per-region findings and image-level findings. Needs the `[demo]` extra.

  pip install -e .[demo]
  python -m launch.demo --checkpoint=workdir/tiny
  python -m launch.demo --checkpoint=workdir/tiny/checkpoints/200 --config=configs/tiny.py --port=8080 --share

--checkpoint takes a step folder, a checkpoints folder (latest step), a training workdir or a model
bundle. --share asks gradio for a public link (it needs the internet); telemetry is off either way.
In a notebook: `demo_app.build_demo(interpret.load(checkpoint)).launch()`.
"""

import sys

from absl import flags

from avlm_jax.config_check import run_app
from configs import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step folder, checkpoints folder, workdir or model bundle.")
_CONFIG = flags.DEFINE_string("config", "", "Training config file[:arg] (default: the one saved with the checkpoint).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 7860, "Port to serve on.")
_SHARE = flags.DEFINE_bool("share", False, "Also serve through a public gradio.live link.")
flags.mark_flags_as_required(["checkpoint"])


def main():
  try:
    import gradio  # noqa: F401 (the [demo] extra: say it is missing before loading the model)
  except ImportError as e:
    sys.exit(f"error: the demo needs gradio ({e}); pip install -e .[demo]")
  from avlm_jax import demo_app, interpret
  from avlm_jax.bundle import BundleError
  from avlm_jax.evaluate.model_runner import CheckpointNotFoundError
  from avlm_jax.train.checkpoint import IncompatibleCheckpointError

  try:
    interpreter = interpret.load(_CHECKPOINT.value, _CONFIG.value or None)
  except (KeyError, IncompatibleCheckpointError, CheckpointNotFoundError, FileNotFoundError, BundleError) as e:
    sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
  demo_app.build_demo(interpreter).launch(server_name=_HOST.value, server_port=_PORT.value, share=_SHARE.value)


if __name__ == "__main__":
  run_app(main, common.base_config())

r"""Batch-interpretation throughput in images/s: the jitted encoder alone, and the whole of
`launch.interpret` (read and decode, letterbox, encode, score, per-image JSON and overlay PNG,
findings.csv, index.html).

  python -m launch.benchmark_interpret                          # synth_small at 224 px, random init
  python -m launch.benchmark_interpret --batch_size=64 --num_images=512 --input_pixels=2048
  python -m launch.benchmark_interpret --checkpoint=workdir/synth_small --config=configs/synth_small.py

Without --checkpoint the model is a random initialisation of --config (speed does not depend on
the weights) at --image_size; with one, the checkpoint's weights at its own image size. The inputs
are --num_images generated grayscale PNGs of --input_pixels square. Both measurements follow a
warm-up that compiles, so they are steady-state numbers; first_batch_s is the compile and one batch.
Prints one JSON object.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

_CONFIG = flags.DEFINE_string("config", "configs/synth_small.py", "Config file[:arg] of the model.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "A checkpoint to load instead of a random initialisation.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Model input size of the random initialisation.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per batch.", lower_bound=1)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 128, "Images per timed run.", lower_bound=1)
_INPUT_PIXELS = flags.DEFINE_integer("input_pixels", 1024, "Side of the generated PNG inputs.", lower_bound=8)
_WORKERS = flags.DEFINE_integer("workers", 0, "Reader/writer threads (0: one per core, at most 8).", lower_bound=0)


def _interpreter():
  from avlm_jax import interpret
  from avlm_jax.evaluate.model_runner import ModelRunner, random_params, resolve_tokenizer

  if _CHECKPOINT.value:
    return interpret.load(_CHECKPOINT.value, _CONFIG.value)
  config = interpret.load_config(_CONFIG.value)
  with config.unlocked():
    config.data.image_size = _IMAGE_SIZE.value
  tokenizer = resolve_tokenizer(config)
  params = random_params(config, tokenizer.vocab_size)
  return interpret.Interpreter(ModelRunner(config, params, tokenizer, name="random init"))


def _write_inputs(folder: str, n: int, side: int) -> None:
  """Smooth shapes plus noise, so the PNGs decode like photographs rather than flat fields."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:side, 0:side] / side
  for i in range(n):
    a, b = rng.uniform(2, 6, size=2)
    img = 120 + 60 * np.sin(a * np.pi * xx) * np.cos(b * np.pi * yy) + rng.normal(0, 12, (side, side))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"image_{i:05d}.png"))


def main(argv):
  del argv
  import jax

  from avlm_jax import batch_interpret

  interpreter = _interpreter()
  encoder = batch_interpret.BatchEncoder(interpreter.runner, _BATCH_SIZE.value)
  size = interpreter.runner.config.data.image_size
  n = _NUM_IMAGES.value
  with tempfile.TemporaryDirectory() as tmp:
    inputs, warm = os.path.join(tmp, "inputs"), os.path.join(tmp, "warm")
    os.makedirs(inputs)
    os.makedirs(warm)
    _write_inputs(inputs, n, _INPUT_PIXELS.value)
    _write_inputs(warm, min(n, encoder.batch_size), _INPUT_PIXELS.value)

    batch = np.stack([interpreter.model_input(np.asarray(Image.open(os.path.join(warm, f)).convert("L")))
                      for f in sorted(os.listdir(warm))])
    t0 = time.perf_counter()
    encoder.encode(batch[:1])
    first_batch_s = time.perf_counter() - t0  # the compile, mostly
    images = np.resize(batch, (n, size, size))  # the warm-up batch repeated: the encoder's cost is content-free
    t0 = time.perf_counter()
    encoder.encode(images)
    model_s = time.perf_counter() - t0

    run = lambda folder, out: batch_interpret.interpret_folder(
        interpreter, folder, os.path.join(tmp, out), workers=_WORKERS.value or None, progress=False, encoder=encoder)
    run(warm, "warm_out")  # first drawing, first JSON: nothing of it is timed below
    summary = run(inputs, "out")
  device = jax.local_devices()[0]
  print(json.dumps({
      "config": _CONFIG.value, "checkpoint": _CHECKPOINT.value or None, "image_size": size,
      "batch_size": encoder.batch_size, "num_images": n, "input_pixels": _INPUT_PIXELS.value,
      "devices": f"{encoder.mesh.devices.size} × {device.platform} ({device.device_kind})",
      "cpu_count": os.cpu_count(), "first_batch_s": round(first_batch_s, 2),
      "model_images_per_s": round(n / model_s, 2),
      "end_to_end_images_per_s": round(summary.images_per_s, 2),
      "end_to_end_s": round(summary.seconds, 2)}, ensure_ascii=False))


if __name__ == "__main__":
  app.run(main)

r"""SynthCXR build speed: triples/s per process at several image sizes (render + report + encode).

  python -m launch.benchmark_synthcxr                   # 256 and 512 px, 1 process
  python -m launch.benchmark_synthcxr --workers=2 --sizes=256
  python -m launch.benchmark_synthcxr --patients=ct,v7_masks --sizes=256   # both anatomy modes

Target: >= 20 triples/s per core at 256 px. The one-time CT projection bank and patient bank
(cached in ~/.cache/avlm_jax) are built before timing starts and reported separately.
"""

import os
import tempfile
import time

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["256", "512"], "Image sizes.")
_N = flags.DEFINE_integer("n", 200, "Triples per size (per process count).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes (each builds its own shards).")
_PATIENTS = flags.DEFINE_list("patients", ["v7_masks"], "Anatomy modes: ct (one CT) and/or v7_masks.")


def main(argv):
  del argv
  from data_pipelines import schema
  from data_pipelines.synthcxr import corpus, render

  start = time.time()
  for mode in _PATIENTS.value:
    corpus._anatomy(mode)
  print(f"projection (and patient) banks ready in {time.time() - start:.1f}s (cached after the first run)")
  print(f"| patients | image size | workers | triples | seconds | triples/s | triples/s/process | bytes/triple |")
  print(f"|---|---|---|---|---|---|---|---|")
  for size, mode in [(int(s), m) for s in _SIZES.value for m in _PATIENTS.value]:
    opts = render.RenderOptions(image_size=size, patients=mode)
    for i in range(3):  # warm caches (first-call imports, FFT plans)
      schema.encode(corpus.make_triple(0, "train", 10_000_000 + i, opts))
    with tempfile.TemporaryDirectory() as d:
      t = time.time()
      corpus.generate(d, counts={"train": _N.value}, opts=opts, num_shards=max(_WORKERS.value, 1),
                      workers=_WORKERS.value, figure=False)
      dt = time.time() - t
      size_bytes = sum(os.path.getsize(p) for p in schema.shard_paths(d, "train"))
    rate = _N.value / dt
    print(f"| {mode} | {size} | {_WORKERS.value} | {_N.value} | {dt:.2f} | {rate:.1f} | {rate / _WORKERS.value:.1f} | "
          f"{size_bytes / _N.value:.0f} |")


if __name__ == "__main__":
  app.run(main)

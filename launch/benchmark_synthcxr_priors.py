r"""How much of SynthCXR's anatomy an image-blind prior already gets: the evaluation's two priors on
the test split, for the one-CT corpus and the many-patient corpus.

  python -m launch.benchmark_synthcxr_priors                    # tiny's corpus at 64 and 128 px
  python -m launch.benchmark_synthcxr_priors --num_train=2048 --num_test=256 --render_size=96 --sizes=64

* box prior: each region's mean training box, scored on the test boxes (mean IoU over regions;
  `avlm_jax.evaluate.localisation.box_prior_result`, what the evaluation reports beside the model);
* mask prior: the training masks' per-pixel majority, scored on the test masks (mean Dice over
  heart and lungs; the `mean_mask_prior` of `avlm_jax.evaluate.segmentation`).

Corpora are built into --out (reused when already there, as training reuses them).
"""

import os

from absl import app, flags

_OUT = flags.DEFINE_string("out", "/tmp/synthcxr_priors", "Folder for the corpora.")
_TRAIN = flags.DEFINE_integer("num_train", 512, "Training studies (tiny: 512, synth_small: 2048).")
_TEST = flags.DEFINE_integer("num_test", 64, "Test studies (tiny: 64, synth_small: 256).")
_SIZES = flags.DEFINE_list("sizes", ["64", "128"], "Evaluation image sizes.")
_RENDER = flags.DEFINE_integer("render_size", 0, "Rendered size (0: each evaluation size; synth_small: 96).")
_PATIENTS = flags.DEFINE_list("patients", ["ct", "v7_masks"], "Anatomy modes.")
_SEED = flags.DEFINE_integer("seed", 0, "Corpus seed.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Build processes.")

STRUCTURES = ("heart", "left lung", "right lung")


def priors(data_dir: str, size: int) -> tuple[float, float]:
  """(box prior mean IoU, mask prior mean Dice) on the test split of `data_dir`, read at `size`."""
  import numpy as np

  from avlm_jax.evaluate import dataset, localisation, segmentation

  test = dataset.load_split(data_dir, "test", size)
  box = localisation.box_prior_result(data_dir, test)["mean_iou"]
  train_masks, _ = dataset.load_split(data_dir, "train", size).mask_stack(STRUCTURES)
  test_masks, _ = test.mask_stack(STRUCTURES)
  majority = np.broadcast_to(train_masks.mean(axis=0) > 0.5, test_masks.shape)
  return box, segmentation.mask_scores(majority, test_masks, STRUCTURES)["mean_dice"]


def main(argv):
  del argv
  from data_pipelines.synthcxr import corpus, render

  print("| patients | rendered px | read at px | train | test | box prior mean IoU | mask prior Dice |")
  print("|---|---|---|---|---|---|---|")
  for mode in _PATIENTS.value:
    for size in map(int, _SIZES.value):
      render_size = _RENDER.value or size
      opts = render.RenderOptions(image_size=render_size, patients=mode)
      counts = {"train": _TRAIN.value, "validation": 8, "test": _TEST.value}
      folder = os.path.join(_OUT.value, f"{mode}-{render_size}-{_TRAIN.value}-{_TEST.value}-s{_SEED.value}")
      corpus.ensure(folder, counts=counts, seed=_SEED.value, opts=opts, workers=_WORKERS.value)
      box, dice = priors(folder, size)
      print(f"| {mode} | {render_size} | {size} | {_TRAIN.value} | {_TEST.value} | {box:.3f} | {dice:.3f} |",
            flush=True)


if __name__ == "__main__":
  app.run(main)

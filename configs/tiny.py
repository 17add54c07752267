r"""Tiny Anatomy-VLM on a small SynthCXR corpus: the Quick-start job, and (data=shapes) the tests.

2-layer ViT (width 32, 16 patches) with 29 anatomy tokens, 2-layer BERT-style text tower,
batch 16. Builds its data into <workdir>/data on first use (cached; the CT projection bank and the
patient bank are cached once per machine in ~/.cache/avlm_jax, or $AVLM_CACHE). The corpus warps
the CT onto real patients' lungs (`data.synthcxr.patients='v7_masks'`, which needs the
torchxrayvision wheel); `--config.data.synthcxr.patients=ct` builds the one-CT corpus of before. Tokenizer: a SentencePiece unigram
model (at most 1000 pieces; ~560 on this corpus) trained on the train reports and the knowledge
base's texts into <workdir>/data/tokenizer_sentencepiece_unigram_1000 on first use
(`data.tokenizer`; `python -m launch.train_tokenizer` trains one by hand; `data.tokenizer=corpus`
is the corpus' WordPiece).

  python -m launch.train --config=configs/tiny.py --workdir=workdir/tiny
  python -m launch.train --config=configs/tiny.py:steps=300,preset=fsdp --workdir=workdir/tiny_fsdp
  python -m launch.train --config=configs/tiny.py:data=shapes --workdir=workdir/tiny_shapes

Expect (2-core CPU, one device, data=synthcxr; measured 2026-12-05): first run ~15 s to project
the CT and ~12 s to build the patient bank (once per machine), ~10 s to render 640 studies at
64 px and train the tokenizer, compile ~11 s, then ~6 steps/s (~1 min in all once the CT is
projected). The total loss (the weighted sum: region-phrase ×4, image-level ×0.5, box L1 ×5,
GIoU ×2, presence) falls from ~33 (step 20) to ~17.5 (step 200), the box terms fastest (L1
0.61 -> 0.16, GIoU 1.00 -> 0.55; region-phrase 6.4 -> 3.5). Boxes stay harder than on the
one-CT corpus (`--config.data.synthcxr.patients=ct`: L1 0.09, GIoU 0.36 at step 200), since they
move with the patient. BENCHMARKS.md has the evaluation beside its baselines.
With `--config.data.tokenizer=corpus` (the WordPiece) it is ~33.5 -> ~16.8. data=shapes (drawn
shapes, 32 px, the tests' data) needs no CT. Checkpoints go to <workdir>/checkpoints, metrics to
<workdir>/metrics.jsonl. Rerunning the command resumes.

The holistic ablation (no anatomy tokens, image-level loss only) and its evaluation beside the
full model, with the random-encoder baseline:

  python -m launch.train --config=configs/tiny.py:holistic --workdir=workdir/tiny_holistic
  python -m launch.evaluate --config=configs/tiny.py --checkpoint=workdir/tiny \
      --config.evals.holistic_checkpoint=workdir/tiny_holistic --out=workdir/tiny_eval

Arguments: steps (int), batch (int), preset ('dp' | 'fsdp' | ...), fsdp (mesh fsdp size;
data = -1), data ('synthcxr' | 'shapes'), seed (int), ablation ('full' | 'global_detection' |
'detection' | 'global', see configs/common.py), holistic (bool: ablation=global).
"""

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=200, batch=16, preset="dp", fsdp=1, data="synthcxr",
                         holistic=False, ablation="full", seed=0)
  c = common.base_config()
  c.total_steps = arg.steps
  c.batch_size = arg.batch
  c.log_every = 20
  c.checkpoint_every = 100
  c.sharding.preset = arg.preset
  c.mesh.fsdp = arg.fsdp
  # The text tower trains from scratch: a SentencePiece vocabulary learned from the corpus' reports.
  c.data.tokenizer = "sentencepiece"
  if arg.data == "synthcxr":
    c.data.kind = "synthcxr"
    c.labels = common.SYNTHCXR_LABELS
    c.data.image_size = 64
    c.model.image.patch_size = 16  # 4×4 patches, as with shapes at 32 px
    c.data.synthcxr.image_size = 64
    c.data.synthcxr.num_train = 512
    c.data.synthcxr.num_val = 64
    c.data.synthcxr.num_test = 64
    c.data.synthcxr.patients = "v7_masks"  # many patients' anatomy; "ct" reproduces the one-CT corpus
    c.data.max_phrase_len = 24
  elif arg.data != "shapes":
    raise ValueError(f"tiny config: data={arg.data!r}; expected 'synthcxr' or 'shapes'")
  # A narrow segmentation decoder: the default (width 32) costs ~1.5 GFLOP per 64 px image, minutes
  # per baseline on 2 CPU cores.
  c.evals.segmentation.width = 8
  c.evals.segmentation.steps = 200
  c.seed = arg.seed
  common.ablation(c, "global" if arg.holistic else arg.ablation)
  return c

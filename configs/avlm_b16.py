r"""Paper-scale Anatomy-VLM: ViT-B/16 image tower + a BERT-base-sized text tower.

  python -m launch.train --config=configs/avlm_b16.py:res=224 --workdir=gs://.../avlm_b16_224 \
      --config.data.dir=/data/imagenome_triples --config.data.tokenizer_dir=/models/cxr-bert \
      --config.model.text.init_from=/models/cxr-bert
  python -m launch.benchmark_step --config=configs/avlm_b16.py:res=448,batch=256 --steps=20

Needs a converted corpus (Chest ImaGenome + MIMIC-CXR triples) and a BERT-family checkpoint
folder (HF layout) for the frozen text tower; nothing here is small enough for a CPU. The step
compiles ahead of time for a TPU v5e-256 in 1–2 minutes on 2 CPU cores
(`python -m launch.benchmark_presets --config=configs/avlm_b16.py --aot_only --aot_topology=v5e:16x16`;
BENCHMARKS.md "Compile time at paper scale").

Known from the paper: ViT with 29 anatomy tokens, L1 + GIoU, region–phrase and image-level
alignment, three stages, frozen text encoder. Our choices where it is silent:
  * 224 px (448 with `res=448`), patch 16, ViT-B (768 wide, 12 layers, 12 heads): YOLOS-Ti/S
    and DETR-style ViT detectors work at these sizes; the anatomy tokens get their own positions.
  * joint embedding 512 (CLIP ViT-B), logit scale 1/0.07 clamped at 100, sigmoid bias -2.
  * AdamW lr 1e-4 for new heads and anatomy tokens; with `vit=<checkpoint>` (a pretrained ViT-B/16:
    big_vision .npz, timm or HF safetensors) the pretrained encoder trains at 1e-5 (multiplier 0.1,
    paper.md §4 suggestion), except the anatomy rows of the position table, which are new (1e-4).
    wd 1e-4 on matrices, clip 1.0, warmup 2k steps, cosine to 1 %.
  * DETR loss weights: L1 5, GIoU 2; all three terms weight 1.
  * stages: +global at 20 %, +fine at 40 % of training.
  * bf16 compute, float32 params, optimizer state and loss/logit math; scan over layers,
    remat "dots" (keep matmul outputs) in the image tower; FSDP over all devices.
  * attention 'auto': cuDNN flash attention on a GPU (bf16), the XLA path elsewhere.

Arguments: res (224 | 448), batch (global), steps, preset (dp | fsdp), vit (pretrained ViT path).
"""

from configs import common

CHEXPERT_LABELS = (
    "enlarged cardiomediastinum", "cardiomegaly", "lung opacity", "lung lesion", "edema",
    "consolidation", "pneumonia", "atelectasis", "pneumothorax", "pleural effusion",
    "pleural other", "fracture", "support devices",
)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, res=224, batch=1024, steps=100_000, preset="fsdp", vit="")
  if arg.res % 16:
    raise ValueError(f"res={arg.res} is not a multiple of the patch size 16")
  c = common.base_config()
  c.total_steps = arg.steps
  c.batch_size = arg.batch
  c.log_every = 100
  c.checkpoint_every = 2000
  c.labels = CHEXPERT_LABELS

  c.data.kind = "array_record"
  c.data.image_size = arg.res
  c.data.max_phrase_len = 48
  c.data.max_prompt_len = 32
  c.data.num_workers = 8
  c.data.num_threads = 16

  c.model.dtype = "bfloat16"
  c.model.attention = "auto"
  c.model.embed_dim = 512
  c.model.image.update(dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                            scan=True, remat_policy="dots"))
  c.model.text.update(dict(width=768, depth=12, num_heads=12, mlp_dim=3072, max_len=512,
                           scan=True, remat_policy="none", frozen=True))

  c.stages.global_start = 0.2
  c.stages.fine_start = 0.4
  c.optimizer.update(dict(learning_rate=1e-4, warmup_steps=2000, end_lr_fraction=0.01,
                          weight_decay=1e-4, grad_clip_norm=1.0))
  if arg.vit:
    c.model.image.init_from = arg.vit
    # The position table is one parameter, but its anatomy rows are new (convert/vit.py leaves
    # them at their fresh init): they learn at the full rate, as the anatomy tokens do.
    c.optimizer.lr_multipliers = (
        ("image/pos_embedding[anatomy]", 1.0),
        ("image/(blocks/.*|block_\\d+/.*|patch_embedding/.*|cls_token|pos_embedding|encoder_ln/.*)", 0.1),)
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.sharding.preset = arg.preset
  return c

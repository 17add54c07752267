"""Defaults every config starts from, and the typed `:arg` parser (big_vision's `parse_arg` idea).

Every key a run can read is defined here; a config file only changes values. Configs are locked,
so assigning or overriding a key that is not here fails and names the key.
"""

from __future__ import annotations

import ml_collections

SYNTHETIC_LABELS = ("lung opacity", "nodule", "pleural effusion", "pneumothorax", "cardiomegaly")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"steps=20,preset=fsdp,runlocal"` -> ConfigDict typed like `defaults`; bare names mean True."""
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() not in ("0", "false", "no") if value else True
    elif not value:
      raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
    else:
      out[key] = kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 100
  c.batch_size = 16  # global, across all processes and devices
  c.log_every = 10
  c.checkpoint_every = 50
  c.max_checkpoints = 3

  c.labels = SYNTHETIC_LABELS  # image-level finding labels, in the order of the logits
  c.prompt_template = "chest radiograph showing {name}"
  c.prompt_style = "plain"  # label prompts: plain | definition | signs (knowledge base)

  c.data = ml_collections.ConfigDict()
  c.data.kind = "synthetic_shapes"  # 'synthetic_shapes' (generated if missing) or 'array_record'
  c.data.dir = ""  # '' -> <workdir>/data
  c.data.tokenizer_dir = ""  # '' -> <data.dir>/tokenizer; also pkg:<module>/<path>
  c.data.image_size = 32
  c.data.max_phrase_len = 16
  c.data.max_prompt_len = 12
  c.data.num_threads = 2
  c.data.num_workers = 0
  # The paper's region-text sampling (data_pipelines/region_text_sampling.py); off = raw phrases.
  c.data.text_sampling = ml_collections.ConfigDict(dict(
      enabled=False, perturb_prob=0.2, negate_fraction=0.5, empty_region_text="mixed",
      hard_fraction=0.5, region_text_style="phrase"))  # style: phrase | phrase+knowledge | phrase+signs
  c.data.synthetic = ml_collections.ConfigDict(
      dict(num_train=512, num_val=64, image_size=64, num_shards=4))

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"
  c.model.embed_dim = 32
  c.model.logit_scale_init = 1 / 0.07
  c.model.logit_scale_max = 100.0
  c.model.global_bias_init = -2.0
  c.model.image = ml_collections.ConfigDict(
      dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, dropout=0.0,
           scan=False, remat_policy="none",  # remat: none | full | dots | dots_no_batch
           gelu_approximate=False,  # True for big_vision/vit_jax checkpoints (tanh GELU)
           init_from=""))  # a ViT checkpoint: big_vision .npz, timm or HF safetensors
  c.model.text = ml_collections.ConfigDict(
      dict(width=32, depth=2, num_heads=2, mlp_dim=64, max_len=32, pooling="mean", dropout=0.0,
           scan=False, remat_policy="none",
           frozen=False,  # frozen: no updates; pooled features cached per distinct text
           init_from=""))  # a HF BERT-family folder, or pkg:<module>/<path> inside a wheel

  # L = anatomy_weight·(l1_weight·L1 + giou_weight·GIoU) + fine_weight·L_fine + global_weight·L_global
  c.loss = ml_collections.ConfigDict(
      dict(anatomy_weight=1.0, l1_weight=5.0, giou_weight=2.0, fine_weight=1.0, global_weight=1.0))

  # The paper's stages: detection only, then + image-level, then + region-phrase. Each start is
  # the number of steps trained before the term joins: >= 1 a step count, [0, 1) a fraction.
  c.stages = ml_collections.ConfigDict(dict(global_start=0.0, fine_start=0.0))

  c.optimizer = ml_collections.ConfigDict(
      dict(learning_rate=1e-3, warmup_steps=10, end_lr_fraction=0.01, weight_decay=1e-4,
           b1=0.9, b2=0.999, grad_clip_norm=1.0))
  # (regex over 'image/block_0/mlp/fc1/kernel'-style paths, learning-rate multiplier); the first
  # full match wins, 1.0 otherwise, 0 freezes. E.g. (("text/.*", 0.1),) for a LiT-style slow tower.
  c.optimizer.lr_multipliers = ()

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(preset="dp"))
  c.lock()
  return c

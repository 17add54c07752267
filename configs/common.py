"""Defaults every config starts from, and the typed `:arg` parser (big_vision's `parse_arg` idea).

Every key a run can read is defined here; a config file only changes values. Configs are locked,
so assigning or overriding a key that is not here fails and names the key.
"""

from __future__ import annotations

import ml_collections

SYNTHETIC_LABELS = ("lung opacity", "nodule", "pleural effusion", "pneumothorax", "cardiomegaly")
# data_pipelines.synthcxr.findings.FINDINGS (kept literal so configs import no data code).
SYNTHCXR_LABELS = ("consolidation", "nodule", "mass", "pleural effusion", "pneumothorax", "cardiomegaly",
                   "atelectasis", "pulmonary edema")


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
  # On log steps, split the step's backbone gradient over the loss terms (train/step.py:
  # make_grad_signal_fn): one extra forward and one backward pass per term, compiled on first use.
  c.log_grad_signal = True
  c.checkpoint_every = 50
  c.max_checkpoints = 3
  # Faults (avlm_jax/train/faults.py, README "Preemption and faults"). SIGTERM always saves at the
  # next step boundary and ends the run with exit 0. A step with a non-finite loss or gradient:
  # 'stop' ends the run naming the step and terms (nothing non-finite is ever saved); 'skip' drops
  # its update and counts it, stopping after max_nonfinite_skips. step_timeout_s: a step (or the
  # input pipeline) idle longer than this dumps all stacks and exits 70; 0 turns the watchdog off.
  c.train = ml_collections.ConfigDict(dict(on_nonfinite="stop", max_nonfinite_skips=10, step_timeout_s=3600.0))

  c.labels = SYNTHETIC_LABELS  # image-level finding labels, in the order of the logits
  c.prompt_template = "chest radiograph showing {name}"
  c.prompt_style = "plain"  # label prompts: plain | definition | signs (knowledge base)

  c.data = ml_collections.ConfigDict()
  # 'synthcxr' / 'synthetic_shapes' (built into data.dir on first use) or 'array_record' (a folder)
  c.data.kind = "synthetic_shapes"
  c.data.dir = ""  # '' -> <workdir>/data
  c.data.tokenizer_dir = ""  # '' -> the folder data.tokenizer names; also pkg:<module>/<path>
  # 'corpus': the corpus' WordPiece, <data.dir>/tokenizer. 'sentencepiece': a SentencePiece model
  # (tokenizer_model_type 'unigram' | 'bpe', at most tokenizer_vocab_size pieces) trained on the
  # train split's reports and the knowledge base's texts into
  # <data.dir>/tokenizer_sentencepiece_<type>_<size> on first use
  # (avlm_jax/sentencepiece_tokenizer.py; `python -m launch.train_tokenizer`). Only for a text
  # tower trained from scratch: a pretrained one (model.text.init_from) brings its own.
  c.data.tokenizer = "corpus"
  c.data.tokenizer_vocab_size = 1000
  c.data.tokenizer_model_type = "unigram"
  c.data.image_size = 32
  c.data.max_phrase_len = 16
  c.data.max_prompt_len = 12
  c.data.num_threads = 2
  c.data.num_workers = 0
  # Global batches prepared ahead in a background thread (with a frozen text tower this includes
  # encoding new texts), overlapping the device step; 0 prepares each batch inline.
  c.data.prefetch = 2
  # Records that do not decode: 0 stops at the first (named by shard and index); N > 0 skips up to N
  # distinct ones (the next record takes the slot), listed in <workdir>/bad_records.jsonl and
  # counted as `bad_records` in the metrics; one more stops the run.
  c.data.max_bad_records = 0
  # The paper's region-text sampling (data_pipelines/region_text_sampling.py); off = raw phrases.
  # Every slot gets a true statement (its positive; normal regions too, unless normal_regions=False)
  # and a false one (an extra candidate, NegCLIP-style, unless false_texts=False); perturb_prob:
  # the chance a finding phrase is rephrased with a synonym.
  c.data.text_sampling = ml_collections.ConfigDict(dict(
      enabled=True, perturb_prob=0.2, normal_regions=True, false_texts=True,
      region_text_style="phrase"))  # style: phrase | phrase+knowledge | phrase+signs
  c.data.synthetic = ml_collections.ConfigDict(
      dict(num_train=512, num_val=64, image_size=64, num_shards=4))
  # SynthCXR (data_pipelines/synthcxr/): DRRs of a real chest CT with exact anatomy and findings.
  # patients: 'ct' (the one CT's anatomy, the corpus before issue 14) or 'v7_masks' (the CT warped
  # onto real patients' lungs from the torchxrayvision wheel's masks; patients disjoint per split).
  c.data.synthcxr = ml_collections.ConfigDict(dict(
      num_train=512, num_val=64, num_test=64, image_size=128, num_shards=4, p_normal=0.4,
      findings=SYNTHCXR_LABELS, workers=1, patients="ct"))

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"
  c.model.embed_dim = 32
  c.model.logit_scale_init = 1 / 0.07
  c.model.logit_scale_max = 100.0
  c.model.global_bias_init = -2.0
  # True: label prompts and region phrases get their own text projections (prompt_projection,
  # phrase_projection) instead of sharing text_projection; evaluation picks by text kind. True
  # from the ablation (issue 12): on synth_small's full row, seed 0, held-out-wording image AUC
  # 0.663 with separate projections against 0.546 shared (results/ablation_shared_projection/).
  c.model.separate_text_projections = True
  # Self-attention in both towers: 'xla' (einsum-softmax-einsum, softmax in float32), 'cudnn'
  # (flash attention through jax.nn.dot_product_attention: a GPU, bf16/fp16, no attention dropout;
  # elsewhere it falls back to 'xla' and says so) or 'auto' (cudnn where it can run, else xla).
  c.model.attention = "xla"
  c.model.image = ml_collections.ConfigDict(
      dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, dropout=0.0,
           scan=False, remat_policy="none",  # remat: none | full | dots | dots_no_batch
           gelu_approximate=False,  # True for big_vision/vit_jax checkpoints (tanh GELU)
           # False: the holistic ablation (a plain ViT; image-level loss only): see holistic().
           anatomy_tokens=True,
           # What image_emb is projected from: 'cls' (the CLS token), 'map' (a learned probe's
           # attention pool over all output tokens, as big_vision's MAPHead) or 'region' (the same
           # pool over CLS + the anatomy tokens only; not for the holistic model, which holistic()
           # gives 'map'). models/pooling.py. 'region' lets the image-level head read the anatomy.
           pool="region",
           init_from=""))  # a ViT checkpoint: big_vision .npz, timm or HF safetensors
  c.model.text = ml_collections.ConfigDict(
      dict(width=32, depth=2, num_heads=2, mlp_dim=64, max_len=32, pooling="mean", dropout=0.0,
           scan=False, remat_policy="none",
           frozen=False,  # frozen: no updates; pooled features cached per distinct text
           init_from=""))  # a HF BERT-family folder, or pkg:<module>/<path> inside a wheel

  # A frozen text tower's features (avlm_jax/train/text_cache.py, text_table.py). table: 'auto'
  # reads <data.dir>/text_features/<tower id>/ when `python -m launch.precompute_text_features`
  # has written it (else texts are encoded as they come), '' never reads a table, a path reads
  # that table (which must exist and match the tower and tokenizer, else the run stops naming the
  # field). cache_entries bounds the LRU cache of texts encoded during the run (the table's misses):
  # at most cache_entries × model.text.width × 4 bytes (48 MiB for MiniLM's 384).
  c.text_features = ml_collections.ConfigDict(dict(table="auto", cache_entries=32768))

  # L = anatomy_weight·(l1_weight·L1 + giou_weight·GIoU + presence_weight·BCE) + fine_weight·L_fine
  #     + global_weight·L_global; BCE trains each anatomy token's presence logit on box_present.
  # fine 4 and global 0.5 (with 'siglip' normalisation, i.e. 4× the old per-class mean) come from
  # the logged backbone gradient shares (backbone_grad_share_*): with fine = global = 1 and 'mean',
  # synth_small's backbone signal over steps 300-600 was ~76 % detection, ~11 % fine, ~10 % global;
  # these weights put each alignment term at about a quarter (BENCHMARKS.md, issue 12).
  c.loss = ml_collections.ConfigDict(
      dict(anatomy_weight=1.0, l1_weight=5.0, giou_weight=2.0, presence_weight=1.0, fine_weight=4.0,
           global_weight=0.5))
  # Alignment losses: 'global' (GSPMD, (B·29)² region logits) or 'ring' (shard_map ring over the
  # batch axes; memory linear in the local batch). ring_chunk: widest logit tile, in texts.
  c.loss.implementation = "global"
  c.loss.ring_chunk = 1024
  # The image-level sigmoid loss over (images × classes): 'mean' averages over both; 'siglip' sums
  # over classes and averages over images (C× larger, as SigLIP normalises its pairwise loss), so
  # the term's weight does not shrink as labels are added.
  c.loss.global_normalization = "siglip"

  # The paper's stages: detection only, then + image-level, then + region-phrase. Each start is
  # the number of steps trained before the term joins: >= 1 a step count, [0, 1) a fraction.
  c.stages = ml_collections.ConfigDict(dict(global_start=0.0, fine_start=0.0))

  c.optimizer = ml_collections.ConfigDict(
      dict(learning_rate=1e-3, warmup_steps=10, end_lr_fraction=0.01, weight_decay=1e-4,
           b1=0.9, b2=0.999, grad_clip_norm=1.0))
  # (regex over 'image/block_0/mlp/fc1/kernel'-style paths, learning-rate multiplier); the first
  # full match wins, 1.0 otherwise, 0 freezes. E.g. (("text/.*", 0.1),) for a LiT-style slow tower.
  c.optimizer.lr_multipliers = ()

  # Evaluators (avlm_jax/evaluate/): launch/evaluate.py runs every enabled one on a checkpoint;
  # training runs those named in `in_training` every `every_steps` steps (0: never). Data:
  # `data_dir`, else the training folder; thresholds come from its validation split, scores from
  # its test split (or the other half of validation). Undefined scores are null in metrics.json.
  c.evals = ml_collections.ConfigDict()
  c.evals.every_steps = 0
  c.evals.in_training = ("zeroshot_image", "zeroshot_anatomy", "localisation")
  c.evals.data_dir = ""
  c.evals.max_examples = 0  # per split; 0 = all
  c.evals.batch_size = 32
  c.evals.random_baseline = True  # standalone: also score a randomly initialised image side
  c.evals.holistic_checkpoint = ""  # standalone: a run trained with the image-level loss only
  # findings=() means config.labels; thresholds maximise `threshold_criterion` (f1 | youden).
  c.evals.zeroshot_image = ml_collections.ConfigDict(dict(enabled=True, findings=(), threshold_criterion="f1"))
  c.evals.zeroshot_anatomy = ml_collections.ConfigDict(dict(
      enabled=True, findings=(), threshold_criterion="f1",
      positive_template="{finding} in the {region}", negative_template="no {finding} in the {region}"))
  c.evals.localisation = ml_collections.ConfigDict(dict(enabled=True))
  # A U-Net-style decoder over intermediate ViT blocks (`layers`=() spreads them evenly), trained
  # on the dataset's masks with the encoder frozen and fine-tuned (encoder lr × multiplier).
  c.evals.segmentation = ml_collections.ConfigDict(dict(
      enabled=True, structures=("heart", "right lung", "left lung"), modes=("frozen", "finetune"),
      steps=300, batch_size=16, learning_rate=1e-3, encoder_lr_multiplier=0.1, width=32, layers=(),
      seed=0,
      pixel_stem=True))  # False: masks from the encoder's features alone (no full-resolution pixel stem)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Multi-slice: how many slices (DCN) each mesh axis spans; the rest of each axis is inside a
  # slice (ICI). All 1 = one slice. Used by the 'hybrid' preset (data across slices).
  c.mesh_dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  # preset: dp | fsdp | tp | fsdp_tp | hybrid (avlm_jax/sharding.py). A parameter of at least
  # warn_replicated_mib left whole on every device by a sharding preset is named at start-up.
  c.sharding = ml_collections.ConfigDict(dict(preset="dp", warn_replicated_mib=4.0))
  # Multi-process runs (avlm_jax/distributed.py): '' / -1 read JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID; timeout_s bounds the wait for the coordinator.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=-1, process_id=-1, timeout_s=300, cpu_collectives="gloo"))
  c.lock()
  return c


ABLATIONS = ("full", "global_detection", "detection", "global")


def ablation(c: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
  """The paper's ablation rows (§5.5): 'full' (every term), 'global_detection' (no region–phrase
  term), 'detection' (boxes and presence only) and 'global' (the holistic model: no anatomy
  tokens, image-level loss only)."""
  if row not in ABLATIONS:
    raise ValueError(f"ablation={row!r}; expected one of {ABLATIONS}")
  if row == "global":
    return holistic(c)
  if row in ("global_detection", "detection"):
    c.loss.fine_weight = 0.0
  if row == "detection":
    c.loss.global_weight = 0.0
  return c


def holistic(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The holistic ablation of `c`: no anatomy tokens (a plain ViT), the image-level loss only,
  from step 1. Evaluate it beside the full model with --config.evals.holistic_checkpoint."""
  c.model.image.anatomy_tokens = False
  if c.model.image.pool == "region":  # no anatomy tokens to pool over: the same probe over all tokens
    c.model.image.pool = "map"
  c.loss.anatomy_weight = 0.0
  c.loss.fine_weight = 0.0
  c.stages.global_start = 0.0
  c.stages.fine_start = 0.0
  return c

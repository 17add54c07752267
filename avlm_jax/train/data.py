"""The seam between the Grain pipeline (numpy, per process) and the jitted step (global arrays)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from avlm_jax import anatomy, fs, sentencepiece_tokenizer, sharding
from avlm_jax.config_check import ConfigValueError
from avlm_jax.tokenizer import TextTokenizer
from data_pipelines import input_pipeline, schema, synthetic_shapes
from data_pipelines.region_text_sampling import SamplingOptions


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.dir or fs.join(workdir, "data")


def prepare_dataset(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, TextTokenizer]:
  """Make sure the dataset exists (generating the built-in one if asked) and load its tokenizer
  (training the config's SentencePiece tokenizer first if it asks for one not there yet)."""
  data_dir = resolve_data_dir(config, workdir)
  tokenizer_dir = sentencepiece_tokenizer.config_tokenizer_dir(config, data_dir)  # a bad choice fails here
  if config.data.kind == "synthetic_shapes":
    if jax.process_index() == 0:
      syn = config.data.synthetic
      synthetic_shapes.ensure(data_dir, num_train=syn.num_train, num_val=syn.num_val, seed=config.seed,
                              image_size=syn.image_size, num_shards=syn.num_shards)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("synthetic data ready")
  elif config.data.kind == "synthcxr":
    if jax.process_index() == 0:
      from data_pipelines.synthcxr import corpus, render

      sc = config.data.synthcxr
      opts = render.RenderOptions(image_size=sc.image_size, p_normal=sc.p_normal, findings=tuple(sc.findings),
                                  patients=sc.patients)
      corpus.ensure(data_dir, counts={"train": sc.num_train, "validation": sc.num_val, "test": sc.num_test},
                    seed=config.seed, opts=opts, num_shards=sc.num_shards, workers=sc.workers)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("synthcxr data ready")
  elif config.data.kind != "array_record":
    raise ConfigValueError(f"config.data.kind={config.data.kind!r}; expected 'synthcxr', 'synthetic_shapes' or "
                     "'array_record'")
  if jax.process_index() == 0:
    sentencepiece_tokenizer.ensure(config, data_dir)  # trains a SentencePiece tokenizer on first use
  if jax.process_count() > 1 and config.data.tokenizer == "sentencepiece":
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tokenizer ready")
  return data_dir, TextTokenizer(tokenizer_dir)


def bad_record_log(config: ml_collections.ConfigDict, workdir: str) -> input_pipeline.BadRecordLog | None:
  """`<workdir>/bad_records.jsonl` when config.data.max_bad_records > 0 (0: the first bad record stops)."""
  if config.data.max_bad_records <= 0:
    return None
  return input_pipeline.BadRecordLog(fs.join(workdir, "bad_records.jsonl"), config.data.max_bad_records)


def make_train_iterator(config: ml_collections.ConfigDict, data_dir: str, tokenizer: TextTokenizer,
                        workdir: str | None = None):
  """This process's checkpointable iterator of local numpy batches."""
  ds = input_pipeline.make_dataset(
      schema.shard_paths(data_dir, "train"), seed=config.seed,
      local_batch_size=config.batch_size // jax.process_count(), image_size=config.data.image_size,
      tokenizer=tokenizer, max_phrase_len=config.data.max_phrase_len, label_names=config.labels,
      process_index=jax.process_index(), process_count=jax.process_count(),
      text_sampling=text_sampling_options(config),
      bad_records=bad_record_log(config, workdir) if workdir else None)
  return input_pipeline.make_iterator(ds, num_threads=config.data.num_threads,
                                      num_workers=config.data.num_workers)


def text_sampling_options(config: ml_collections.ConfigDict) -> SamplingOptions | None:
  ts = config.data.text_sampling
  if not ts.enabled:
    return None
  return SamplingOptions(perturb_prob=ts.perturb_prob, normal_regions=ts.normal_regions,
                         false_texts=ts.false_texts, region_text_style=ts.region_text_style)


def label_prompt_texts(config: ml_collections.ConfigDict) -> list[str]:
  """The label prompts of the image-level loss, built by the knowledge base's prompt builder."""
  from avlm_jax.knowledge import base, prompts
  return prompts.label_prompts(base.load_knowledge_base(), config.labels, template=config.prompt_template,
                               style=config.prompt_style)


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one *global* batch as the step sees it.

  With a frozen text tower the phrase token ids are replaced by cached pooled features; the
  holistic ablation (no anatomy tokens) gets no phrases at all.
  """
  b, r, s = config.batch_size, anatomy.NUM_REGIONS, config.data.image_size
  t = 2 * r  # slot texts: a true then a false statement per region (input_pipeline.TokenizeTexts)
  spec = {
      "image": ((b, s, s, 1), np.uint8),
      "boxes": ((b, r, 4), np.float32),
      "box_present": ((b, r), np.bool_),
      "phrase_tokens": ((b, t, config.data.max_phrase_len), np.int32),
      "phrase_ids": ((b, t, 2), np.int32),
      "has_phrase": ((b, t), np.bool_),
      "labels": ((b, len(config.labels)), np.float32),
  }
  if config.model.text.frozen:
    del spec["phrase_tokens"]
    spec["phrase_features"] = ((b, t, config.model.text.width), np.float32)
  if not config.model.image.anatomy_tokens:  # holistic: no region to align a phrase with
    for k in ("phrase_tokens", "phrase_features", "phrase_ids", "has_phrase"):
      spec.pop(k, None)
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}


def to_global(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays split over the mesh's batch axes."""
  shard = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(shard, v) for k, v in local_batch.items()}

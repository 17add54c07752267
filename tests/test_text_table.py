"""Precomputed text features (avlm_jax/train/text_table.py): the table covers every text the
pipeline emits, holds the tower's own features, is refused by another tower, and training on it
matches training without it."""

import jax
import numpy as np
import pytest

from avlm_jax import anatomy
from avlm_jax.knowledge import base as kb_base
from avlm_jax.train import data as train_data
from avlm_jax.train import text_table
from avlm_jax.train.text_table import FeatureTable, TextFeatureTableError
from data_pipelines import synthetic_shapes
from data_pipelines.region_text_sampling import SamplingOptions, possible_region_texts, sample_region_texts
from data_pipelines.synthcxr import reports
from tests.conftest import tiny_config

KB = kb_base.load_knowledge_base()


def _frozen_config(synthetic_dir, **overrides):
  base = {"data.kind": "array_record", "data.dir": synthetic_dir, "log_every": 1, "model.text.frozen": True}
  return tiny_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def table(synthetic_dir, tmp_path_factory):
  """(config, manifest, tokenizer, text tower, its params) of a table for the frozen tiny tower on
  the shapes corpus, built as the command builds it (encoded over the 8 fake devices)."""
  cfg = _frozen_config(synthetic_dir)
  out = str(tmp_path_factory.mktemp("text_table") / "table")
  tok = train_data.prepare_dataset(cfg, synthetic_dir)[1]
  model, params = text_table.frozen_text_params(cfg, tok, lambda _: None)
  manifest = text_table.build_table(cfg, synthetic_dir, tok, model.text, params, out, rows=64, say=lambda _: None)
  return cfg, manifest, tok, model.text, params


def _sampler_cases():
  """Real SynthCXR report phrases (several sub-sentences, negations, sizes) on their regions."""
  bank = reports.load_phrases()
  rng = np.random.default_rng(0)
  phrases = [""] * anatomy.NUM_REGIONS
  fills = dict(side="left", zone="lower", severity="small", location="", size="2.1 cm")
  for i, entry in enumerate(bank["findings"].values()):
    text = "; ".join(t.format(**fills) for t in entry["positive"][:2]) + ". " + entry["negative"][0].format(**fills)
    phrases[int(rng.integers(anatomy.NUM_REGIONS))] = text
  return phrases, ["pleural effusion"]


@pytest.mark.parametrize("opts", [
    SamplingOptions(), SamplingOptions(perturb_prob=1.0), SamplingOptions(normal_regions=False),
    SamplingOptions(false_texts=False), SamplingOptions(region_text_style="phrase+knowledge")])
def test_every_sampled_text_is_enumerated(opts):
  phrases, findings = _sampler_cases()
  every = possible_region_texts(phrases, KB, opts, findings)
  drawn = set()
  for seed in range(60):
    true, false = sample_region_texts(phrases, np.random.default_rng(seed), KB, opts, findings)
    drawn.update(true + false)
  assert drawn <= every, sorted(drawn - every)[:5]
  assert len(drawn) > 30  # the draws reached rephrasings and negative statements


def test_table_covers_every_text_a_pipeline_run_emits(table, synthetic_dir):
  cfg, manifest, tok, _, _ = table
  keys = FeatureTable.open(manifest["path"])._keys
  it = train_data.make_train_iterator(cfg, synthetic_dir, tok)
  emitted = np.concatenate([text_table.keys_of(next(it)["phrase_tokens"]).ravel() for _ in range(8)])  # 2 epochs
  assert np.isin(emitted, keys).all()
  prompts = tok(train_data.label_prompt_texts(cfg), cfg.data.max_prompt_len)
  assert np.isin(text_table.keys_of(prompts), keys).all()
  assert manifest["count"] == len(keys) and manifest["prompt_texts"] == len(cfg.labels)
  # Sampling off: the records' own phrases (and '' for empty slots) are what the pipeline emits.
  texts = set(text_table.enumerate_texts(_frozen_config(synthetic_dir, **{"data.text_sampling.enabled": False}),
                                         synthetic_dir)[0])
  assert "" in texts and set(synthetic_shapes._NORMAL_PHRASES.values()) & texts


def test_table_features_are_the_towers(table, synthetic_dir):
  cfg, manifest, tok, tower, params = table
  phrases, _ = text_table.enumerate_texts(cfg, synthetic_dir)
  tokens = tok(phrases, cfg.data.max_phrase_len)
  direct = np.asarray(jax.jit(lambda p, t: tower.apply({"params": p}, t)["pooled"])(params, tokens))
  found, rows = FeatureTable.open(manifest["path"]).lookup(text_table.keys_of(tokens))
  assert found.all()
  np.testing.assert_allclose(rows, direct, rtol=1e-5, atol=1e-6)
  assert manifest["dim"] == cfg.model.text.width and manifest["params_sha256"] == text_table.params_sha256(params)


def test_another_tower_or_tokenizer_is_refused_by_name(table, synthetic_dir):
  """By the table itself, field by field, and where a run starts (text_cache.for_run): a tower
  with other weights stops it with one line naming the table and the field."""
  from avlm_jax.train import text_cache

  cfg, manifest, tok, _, params = table
  path = manifest["path"]
  ident = {k: manifest[k] for k in text_table.IDENTITY_FIELDS}
  FeatureTable.open(path, ident)  # its own tower: accepted
  for field, value in (("params_sha256", "0" * 64), ("tokenizer_sha256", "1" * 64), ("max_phrase_len", 99),
                       ("tower", {**manifest["tower"], "pooling": "cls"})):
    with pytest.raises(TextFeatureTableError) as e:
      FeatureTable.open(path, {**ident, field: value})
    msg = str(e.value)
    assert path in msg and field in msg and "\n" not in msg, msg
  with pytest.raises(TextFeatureTableError, match="does not exist"):
    text_table.resolve_table(path + "_nowhere", synthetic_dir, ident, print)
  run_cfg = _frozen_config(synthetic_dir, **{"text_features.table": path})
  assert len(text_cache.for_run(run_cfg, None, params, tok, synthetic_dir, print).table) == manifest["count"]
  other = jax.tree.map(lambda x: x, params)
  other["embeddings_ln"] = jax.tree.map(lambda x: x + 1.0, other["embeddings_ln"])
  with pytest.raises(TextFeatureTableError, match=rf"^text feature table {path} was made by another tower.*params_sha256"):
    text_cache.for_run(run_cfg, None, other, tok, synthetic_dir, print)


@pytest.mark.slow  # two short training runs (one compile): ~12-22 s on the 2-core CPU
def test_training_on_the_table_matches_training_without_it(table, synthetic_dir, tmp_path, compiled_steps):
  """Same losses with and without the table; with it, every lookup is a table hit."""
  from avlm_jax.train.loop import train_and_evaluate

  manifest = table[1]
  runs = {}
  for name, setting in (("encoded", ""), ("table", manifest["path"])):
    cfg = _frozen_config(synthetic_dir, total_steps=2, checkpoint_every=2, **{"text_features.table": setting})
    runs[name] = train_and_evaluate(cfg, str(tmp_path / name), devices=jax.devices()[:1], compiled=compiled_steps)
  a, b = runs["encoded"]["history"], runs["table"]["history"]
  np.testing.assert_allclose([h["loss"] for h in b], [h["loss"] for h in a], rtol=1e-5)
  assert all(h["text_table_hit_rate"] == 1.0 and h["text_features_encoded"] == 0 for h in b)
  assert b[0]["text_table_size"] == manifest["count"]
  assert a[-1]["text_features_encoded"] > 0 and "text_table_size" not in a[-1]

"""Each rule of the paper's region-text sampling, pinned."""

import numpy as np
import pytest

from avlm_jax import anatomy
from avlm_jax.knowledge import prompts
from avlm_jax.knowledge.base import load_knowledge_base
from data_pipelines import input_pipeline, schema, synthetic_shapes
from data_pipelines.region_text_sampling import SamplingOptions, sample_region_texts, split_subsentences

KB = load_knowledge_base()
R = anatomy.NUM_REGIONS
CP = anatomy.region_id("left costophrenic angle")
RLL = anatomy.region_id("right lower lung zone")


def _phrases(**by_region):
  out = [""] * R
  for name, text in by_region.items():
    out[anatomy.region_id(name.replace("_", " "))] = text
  return out


def test_split_subsentences():
  assert split_subsentences("small left effusion; adjacent atelectasis. no pneumothorax") == [
      "small left effusion", "adjacent atelectasis", "no pneumothorax"]
  assert split_subsentences("") == []


def test_one_subsentence_is_the_positive_and_all_get_drawn():
  phrases = _phrases(right_lower_lung_zone="patchy opacity; air bronchograms. volume loss")
  seen = set()
  for seed in range(40):
    texts, anchor = sample_region_texts(phrases, np.random.default_rng(seed), KB,
                                        SamplingOptions(perturb_prob=0.0, empty_region_text="none"))
    assert anchor[RLL] and texts[RLL] in {"patchy opacity", "air bronchograms", "volume loss"}
    seen.add(texts[RLL])
    assert all(t == "" for i, t in enumerate(texts) if i != RLL) and anchor.sum() == 1
  assert len(seen) == 3


def test_negated_text_is_no_longer_an_anchor():
  phrases = _phrases(left_costophrenic_angle="small left pleural effusion")
  texts, anchor = sample_region_texts(phrases, np.random.default_rng(0), KB,
                                      SamplingOptions(perturb_prob=1.0, negate_fraction=1.0, empty_region_text="none"))
  assert texts[CP] == KB.negate("small left pleural effusion")
  assert texts[CP].startswith("no ") and "pleural effusion" in texts[CP]
  assert not anchor[CP]


def test_rephrased_text_stays_a_positive_about_the_same_finding():
  phrases = _phrases(left_costophrenic_angle="small left pleural effusion")
  changed = 0
  for seed in range(10):
    texts, anchor = sample_region_texts(phrases, np.random.default_rng(seed), KB,
                                        SamplingOptions(perturb_prob=1.0, negate_fraction=0.0,
                                                        empty_region_text="none"))
    assert anchor[CP]
    assert KB.find_mentions(texts[CP]) == ["pleural effusion"] and "left" in texts[CP]
    changed += texts[CP] != "small left pleural effusion"
  assert changed > 0


def test_perturbation_rate_follows_the_config():
  phrases = _phrases(left_costophrenic_angle="left pleural effusion")
  rng = np.random.default_rng(1)
  opts = SamplingOptions(perturb_prob=0.2, negate_fraction=1.0, empty_region_text="none")
  negated = sum(not sample_region_texts(phrases, rng, KB, opts)[1][CP] for _ in range(2000))
  assert 0.17 < negated / 2000 < 0.23


@pytest.mark.parametrize("mode", ["attribute", "hard"])
def test_regions_without_a_finding_get_negative_texts(mode):
  texts, anchor = sample_region_texts([""] * R, np.random.default_rng(3), KB,
                                      SamplingOptions(empty_region_text=mode))
  assert not anchor.any()
  assert all(texts)
  region = "left costophrenic angle"
  if mode == "attribute":
    options = {t for ts in prompts.attribute_negative_options(KB, region).values() for t in ts}
    assert texts[CP] in options
  else:
    typical = {f.name for f in KB.findings_for_region(region)}
    assert set(KB.find_mentions(texts[CP])) & typical
    assert KB.negate(texts[CP]) is not None  # a positive statement, so it can be negated


def test_none_mode_leaves_empty_regions_without_text():
  texts, anchor = sample_region_texts([""] * R, np.random.default_rng(0), KB,
                                      SamplingOptions(empty_region_text="none"))
  assert texts == [""] * R and not anchor.any()


def test_knowledge_style_appends_the_definition():
  phrases = _phrases(left_costophrenic_angle="left pleural effusion")
  texts, _ = sample_region_texts(phrases, np.random.default_rng(0), KB,
                                 SamplingOptions(perturb_prob=0.0, empty_region_text="none",
                                                 region_text_style="phrase+knowledge"))
  assert texts[CP].startswith("left pleural effusion. ")
  assert KB.get("pleural effusion").definition in texts[CP]


@pytest.mark.parametrize("field, value", [("perturb_prob", 1.5), ("hard_fraction", -0.1)])
def test_probabilities_outside_unit_interval_are_named(field, value):
  with pytest.raises(ValueError, match=f"{field}={value} is outside"):
    SamplingOptions(**{field: value})
  with pytest.raises(ValueError, match="empty_region_text='sometimes'"):
    SamplingOptions(empty_region_text="sometimes")


def _sampled_batches(data_dir, tokenizer, seed, n=4):
  ds = input_pipeline.make_dataset(
      schema.shard_paths(data_dir, "train"), seed=seed, local_batch_size=8, image_size=32,
      tokenizer=tokenizer, max_phrase_len=24, label_names=synthetic_shapes.FINDINGS,
      text_sampling=SamplingOptions())
  it = input_pipeline.make_iterator(ds)
  return [next(it) for _ in range(n)]


def test_pipeline_sampling_is_seeded_deterministic_and_shares_duplicate_identities(synthetic_dir, tokenizer):
  a = _sampled_batches(synthetic_dir, tokenizer, seed=5)
  b = _sampled_batches(synthetic_dir, tokenizer, seed=5)
  c = _sampled_batches(synthetic_dir, tokenizer, seed=6)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["phrase_tokens"], y["phrase_tokens"]) for x, y in zip(a, c))
  batch = a[0]
  assert batch["has_phrase"].all()  # mixed mode: every region has a text
  assert (batch["phrase_positive"] <= batch["has_phrase"]).all()
  assert 0 < batch["phrase_positive"].sum() < batch["has_phrase"].sum()
  # Equal token ids (the same text) always carry the same identity, wherever they sit.
  tokens = batch["phrase_tokens"].reshape(-1, 24)
  ids = batch["phrase_ids"].reshape(-1, 2)
  for row in range(len(tokens)):
    same = (tokens == tokens[row]).all(axis=1)
    assert (ids[same] == ids[row]).all()

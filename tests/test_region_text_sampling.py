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
  assert split_subsentences("2.1 cm nodule in the right upper lung zone. no effusion") == [
      "2.1 cm nodule in the right upper lung zone", "no effusion"]


def test_one_subsentence_is_the_true_text_and_all_get_drawn():
  phrases = _phrases(right_lower_lung_zone="patchy opacity; air bronchograms. volume loss")
  seen = set()
  for seed in range(40):
    true, false = sample_region_texts(phrases, np.random.default_rng(seed), KB,
                                      SamplingOptions(perturb_prob=0.0, normal_regions=False))
    assert true[RLL] in {"patchy opacity", "air bronchograms", "volume loss"}
    seen.add(true[RLL])
    assert all(t == "" for i, t in enumerate(true) if i != RLL)
    assert all(t == "" for i, t in enumerate(false) if i != RLL)
  assert len(seen) == 3


def test_a_finding_region_keeps_its_positive_and_its_negation_is_the_false_text():
  phrases = _phrases(left_costophrenic_angle="small left pleural effusion")
  true, false = sample_region_texts(phrases, np.random.default_rng(0), KB, SamplingOptions(perturb_prob=0.0))
  assert true[CP] == "small left pleural effusion"
  assert false[CP] == KB.negate("small left pleural effusion")
  assert false[CP].startswith("no ") and "pleural effusion" in false[CP]


def test_rephrased_text_stays_true_about_the_same_finding():
  phrases = _phrases(left_costophrenic_angle="small left pleural effusion")
  changed = 0
  for seed in range(10):
    true, false = sample_region_texts(phrases, np.random.default_rng(seed), KB, SamplingOptions(perturb_prob=1.0))
    assert KB.positive_findings(true[CP]) == ["pleural effusion"] and "left" in true[CP]
    assert KB.positive_findings(false[CP]) == [] and "pleural effusion" in KB.find_mentions(false[CP])
    changed += true[CP] != "small left pleural effusion"
  assert changed > 0


def test_rephrasing_rate_follows_the_config():
  phrases = _phrases(left_costophrenic_angle="left pleural effusion")
  rng = np.random.default_rng(1)
  opts = SamplingOptions(perturb_prob=0.2)
  changed = sum(sample_region_texts(phrases, rng, KB, opts)[0][CP] != "left pleural effusion" for _ in range(2000))
  assert 0.12 < changed / 2000 < 0.23  # a rephrasing may draw the same wording back


def test_every_normal_region_gets_a_true_and_a_false_statement():
  """The defect this fixes: regions without a finding had only non-anchor texts, so no signal."""
  true, false = sample_region_texts([""] * R, np.random.default_rng(3), KB, SamplingOptions())
  assert all(true) and all(false)
  for region, t, f in zip(anatomy.REGION_NAMES, true, false):
    assert t in {x for ts in prompts.attribute_negative_options(KB, region).values() for x in ts}, region
    assert f in {x for ts in prompts.hard_negative_options(KB, region).values() for x in ts}, region
    assert KB.positive_findings(t) == []  # a denial or a normal statement: true of a normal region
  typical = {f.name for f in KB.findings_for_region("left costophrenic angle")}
  assert set(KB.find_mentions(false[CP])) & typical and KB.negate(false[CP]) is not None


def test_normal_regions_off_leaves_them_without_text():
  true, false = sample_region_texts([""] * R, np.random.default_rng(0), KB, SamplingOptions(normal_regions=False))
  assert true == [""] * R and false == [""] * R


def test_false_texts_off():
  phrases = _phrases(left_costophrenic_angle="left pleural effusion")
  true, false = sample_region_texts(phrases, np.random.default_rng(0), KB, SamplingOptions(false_texts=False))
  assert all(true) and false == [""] * R


def test_statements_never_name_a_finding_present_in_the_image():
  """'right pleural effusion' as the hard negative of another right-sided region would be true of
  an image with a right effusion; so would 'lung opacity' with consolidation. Over many draws,
  no attribute or hard statement of a region without a phrase names a present finding or a
  relative of one."""
  phrases = _phrases(right_costophrenic_angle="moderate right pleural effusion",
                     right_lower_lung_zone="right basilar consolidation")
  present = {"pleural effusion", "consolidation"}
  related = prompts.related_findings(present)
  assert "lung opacity" in related
  with_phrase = {anatomy.region_id("right costophrenic angle"), RLL}
  for seed in range(300):
    true, false = sample_region_texts(phrases, np.random.default_rng(seed), KB, SamplingOptions())
    for i in set(range(R)) - with_phrase:
      assert not set(KB.find_mentions(false[i])) & related, (anatomy.REGION_NAMES[i], false[i])
      assert not set(KB.find_mentions(true[i])) & related, (anatomy.REGION_NAMES[i], true[i])
  # The record's image-level findings count too, even when no phrase names them.
  _, false = sample_region_texts([""] * R, np.random.default_rng(0), KB, SamplingOptions(),
                                 findings=["cardiomegaly"])
  assert not any({"cardiomegaly", "enlarged cardiomediastinum"} & set(KB.find_mentions(f)) for f in false)


def test_knowledge_style_appends_the_definition():
  phrases = _phrases(left_costophrenic_angle="left pleural effusion")
  true, _ = sample_region_texts(phrases, np.random.default_rng(0), KB,
                                SamplingOptions(perturb_prob=0.0, normal_regions=False,
                                                region_text_style="phrase+knowledge"))
  assert true[CP].startswith("left pleural effusion. ")
  assert KB.get("pleural effusion").definition in true[CP]


def test_bad_options_are_named():
  with pytest.raises(ValueError, match="perturb_prob=1.5 is outside"):
    SamplingOptions(perturb_prob=1.5)
  with pytest.raises(ValueError, match="region_text_style='prose'"):
    SamplingOptions(region_text_style="prose")


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
  assert batch["has_phrase"].shape == (8, 2 * R)
  assert batch["has_phrase"].all()  # every region: a true and a false statement
  # Equal token ids (the same text) always carry the same identity, wherever they sit.
  tokens = batch["phrase_tokens"].reshape(-1, 24)
  ids = batch["phrase_ids"].reshape(-1, 2)
  for row in range(len(tokens)):
    same = (tokens == tokens[row]).all(axis=1)
    assert (ids[same] == ids[row]).all()

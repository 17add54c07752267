from __future__ import annotations

import copy
import dataclasses
import json
import re

import numpy as np
import pytest

from avlm_jax import anatomy
from avlm_jax import knowledge as K

CHEXPERT = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
            "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
            "Pleural Other", "Fracture", "Support Devices")


@pytest.fixture(scope="session")
def kb():
  return K.load_knowledge_base()


@pytest.fixture(scope="session")
def raw():
  with open(K.DEFAULT_PATH) as f:
    return json.load(f)


def _write(tmp_path, data, name="kb.json"):
  path = tmp_path / name
  path.write_text(json.dumps(data))
  return path


# --- the JSON itself -----------------------------------------------------------------------------
def test_packaged_file_is_versioned_and_cached(kb, raw):
  assert kb.version == raw["version"] == "1.1.0"
  assert raw["schema"] and "findings[].regions" in raw["schema"]
  assert K.load_knowledge_base() is kb
  assert kb.names == tuple(f["name"] for f in raw["findings"])
  assert all(n == n.lower().strip() for n in kb.names)


def test_every_region_named_in_the_json_is_a_chest_imagenome_region(raw):
  named = [r for f in raw["findings"] for r in f["regions"]] + list(raw["normal_statements"])
  assert named
  for region in named:
    anatomy.region_id(region)  # raises on a typo
  for f in raw["findings"]:
    assert bool(f["regions"]) == (f["name"] != "no finding"), f["name"]


def test_forms_are_non_empty_and_belong_to_one_finding(raw):
  seen: dict[str, str] = {}
  for f in raw["findings"]:
    assert f["synonyms"], f["name"]
    assert f["signs"] and all(s.strip() for s in f["signs"]), f["name"]
    if f["name"] != "no finding":
      assert f["negations"] and all(n.strip() for n in f["negations"]), f["name"]
    sentences = [s for s in re.split(r"(?<=\.)\s+", f["definition"].strip()) if s]
    assert 1 <= len(sentences) <= 2, f["definition"]
    for form in [f["name"], *f["synonyms"], *f.get("subtypes", [])]:
      assert form and form == form.lower(), form
      assert form not in seen, f"{form!r} in {seen.get(form)!r} and {f['name']!r}"
      seen[form] = f["name"]


def test_negations_and_normal_statements_name_only_their_finding(kb):
  for f in kb.findings:
    for neg in f.negations:
      assert set(kb.find_mentions(neg)) <= {f.name}, neg
      if f.lateral:
        assert kb.find_mentions(neg) == [f.name], neg
      assert kb.negate(neg) in (neg, None), neg  # already negative: nothing left to negate
  for statements in kb.normal_statements.values():
    for s in statements:
      assert kb.find_mentions(s) == [], s


def test_chexpert_and_synthetic_labels_resolve(kb):
  from configs.common import SYNTHETIC_LABELS
  from data_pipelines.synthetic_shapes import FINDINGS

  chexpert = {kb.canonical(c) for c in CHEXPERT}
  assert len(chexpert) == 14
  assert chexpert == {f.name for f in kb.findings if f.chexpert}
  assert kb.canonical("Edema") == kb.canonical("pulmonary edema") == "pulmonary edema"
  for label in (*FINDINGS, *SYNTHETIC_LABELS, "mass", "consolidation", "atelectasis", "pulmonary edema"):
    assert kb.get(label).name == label
  assert kb.get("no finding").regions == () and kb.get("no finding").negations == ()


# --- lookup --------------------------------------------------------------------------------------
def test_get_is_case_insensitive_and_resolves_synonyms_plurals_and_subtypes(kb):
  assert kb.get("  Pleural  EFFUSION ").name == "pleural effusion"
  assert kb.canonical("effusions") == "pleural effusion"
  assert kb.canonical("enlarged heart") == "cardiomegaly"
  assert kb.canonical("endotracheal tube") == "support devices"
  assert isinstance(kb.get("nodule"), K.Finding)
  with pytest.raises(dataclasses.FrozenInstanceError):
    kb.get("nodule").name = "x"


def test_unknown_finding_names_the_value_and_suggests(kb):
  with pytest.raises(KeyError, match=r"'pleural efusion'.*Did you mean.*'pleural effusion'"):
    kb.get("pleural efusion")
  with pytest.raises(KeyError, match="'kidney stone'"):
    kb.canonical("kidney stone")


def test_findings_for_region(kb):
  names = lambda r: [f.name for f in kb.findings_for_region(r)]
  assert "pleural effusion" in names("left costophrenic angle")
  assert "cardiomegaly" in names("cardiac silhouette")
  assert "fracture" in names("right clavicle") and "fracture" not in names("right lung")
  assert all(names(r) for r in anatomy.REGION_NAMES)  # the packaged base covers all 29 regions
  assert all(r in f.regions for r in anatomy.REGION_NAMES for f in kb.findings_for_region(r))
  with pytest.raises(KeyError, match="right lung zone"):
    kb.findings_for_region("right lung zone")


# --- text rules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("right basilar opacity and cardiomegaly", ["lung opacity", "cardiomegaly"]),
    ("consolidative opacity at the left base", ["consolidation"]),  # longest match wins
    ("Bilateral pleural effusions, right greater than left", ["pleural effusion"]),
    ("patchy opacities", ["lung opacity"]),
    ("small bilateral pneumothoraces", ["pneumothorax"]),
    ("massive hemoptysis", []),  # word boundary: not 'mass'
    ("small pericardial effusion", []),  # ignore_terms
    ("no findings to suggest pneumonia", ["pneumonia"]),  # the label 'no finding' is not text
    ("no acute cardiopulmonary process", ["no finding"]),
    ("endotracheal tube tip 4 cm above the carina; no pneumothorax", ["support devices", "pneumothorax"]),
    ("lines and tubes unchanged", ["support devices"]),
    ("the heart is enlarged", []),
])
def test_find_mentions(kb, text, expected):
  assert kb.find_mentions(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("small left pleural effusion", "no left pleural effusion"),
    ("opacity in the right lower lung zone", "no opacity in the right lower lung zone"),
    ("right basilar opacity and cardiomegaly", "no right basilar opacity or cardiomegaly"),
    ("There is a small left pleural effusion.", "No left pleural effusion."),
    ("Cardiomegaly is present.", "No cardiomegaly."),
    ("Mild pulmonary edema and small bilateral pleural effusions.",
     "No pulmonary edema or bilateral pleural effusions."),
    ("opacity in the right lower lung zone, likely representing atelectasis",
     "no opacity in the right lower lung zone or atelectasis"),
    ("left lower lobe consolidation concerning for pneumonia",
     "no left lower lobe consolidation or pneumonia"),
    ("opacity with air bronchograms", "no opacity with air bronchograms"),
    ("a small amount of pleural fluid", "no pleural fluid"),
    ("small to moderate right pleural effusion", "no right pleural effusion"),
    ("1.5 cm nodule in the right upper lung zone", "no nodule in the right upper lung zone"),
    ("Stable cardiomegaly. Small right apical pneumothorax.",
     "No cardiomegaly. No right apical pneumothorax."),
    ("no effusion but small right apical pneumothorax", "no effusion but no right apical pneumothorax"),
    ("no pleural effusion", "no pleural effusion"),  # already negative
    ("left pleural effusion is not seen", "left pleural effusion is not seen"),
    ("the heart is enlarged", None),
    ("no acute cardiopulmonary process", None),
    ("small pericardial effusion", None),
    ("", None),
])
def test_negate(kb, text, expected):
  assert kb.negate(text) == expected
  if expected is not None:
    assert kb.negate(text) == kb.negate(text)  # deterministic
    assert set(kb.find_mentions(expected)) == set(kb.find_mentions(text))


def test_rephrase_keeps_finding_and_location(kb):
  text = "opacity in the right lower lung zone"
  outs = [kb.rephrase(text, np.random.default_rng(seed)) for seed in range(20)]
  assert len(set(outs)) > 2
  for out in outs:
    assert out != text and out.endswith(" in the right lower lung zone")
    assert kb.find_mentions(out) == ["lung opacity"] and kb.negate(out) is not None
    assert "no" not in out.split()
  assert outs == [kb.rephrase(text, np.random.default_rng(seed)) for seed in range(20)]


def test_rephrase_details(kb):
  rng = np.random.default_rng(0)
  out = kb.rephrase("Small left pleural effusion and cardiomegaly.", rng)
  assert out.startswith("Small left ") and " and " in out and out.endswith(".")
  assert kb.find_mentions(out) == ["pleural effusion", "cardiomegaly"]
  assert "pleural effusion" not in out and "cardiomegaly" not in out
  plural = kb.rephrase("bilateral pleural effusions", rng)
  assert plural.startswith("bilateral ") and kb.find_mentions(plural) == ["pleural effusion"]
  assert plural.endswith(("s", "thoraces"))
  assert kb.rephrase("endotracheal tube in place", rng) == "endotracheal tube in place"  # subtype
  assert kb.rephrase("the heart is enlarged", rng) == "the heart is enlarged"
  with pytest.raises(TypeError, match="Generator"):
    kb.rephrase("cardiomegaly", 0)


# --- prompts -------------------------------------------------------------------------------------
def test_label_prompts_styles(kb):
  t = "chest radiograph showing {name}"
  assert K.label_prompts(kb, ["pleural effusion"], t) == ["chest radiograph showing pleural effusion"]
  assert K.label_prompts(kb, ["pleural effusion"], "chest radiograph showing {}") == [
      "chest radiograph showing pleural effusion"]
  assert K.label_prompts(kb, ["pleural effusion"], t, "definition") == [
      "chest radiograph showing pleural effusion: an abnormal collection of fluid in the pleural space."]
  signs = K.label_prompts(kb, ["pleural effusion"], t, "signs")[0]
  assert signs == "chest radiograph showing pleural effusion, " + ", ".join(kb.get("pleural effusion").signs)
  assert signs.startswith("chest radiograph showing pleural effusion, blunting of the costophrenic angle, ")
  edema = kb.get("pulmonary edema").definition
  assert K.label_prompts(kb, ["edema"], style="definition") == ["edema: " + edema]


def test_plain_label_prompts_match_the_current_config_prompts(kb):
  from configs.common import base_config

  c = base_config()  # its template may use '{}' or '{name}': both are filled
  expected = [c.prompt_template.replace("{name}", l).replace("{}", l) for l in c.labels]
  assert K.label_prompts(kb, c.labels, c.prompt_template) == expected
  for style in K.LABEL_STYLES:
    assert len(K.label_prompts(kb, c.labels, c.prompt_template, style)) == len(c.labels)


def test_label_prompt_errors(kb):
  with pytest.raises(KeyError, match=r"\['kidney stone', 'pleural efusion'\].*pleural effusion"):
    K.label_prompts(kb, ["nodule", "kidney stone", "pleural efusion"])
  with pytest.raises(ValueError, match="'fancy'.*plain"):
    K.label_prompts(kb, ["nodule"], style="fancy")
  with pytest.raises(ValueError, match="no placeholder|must hold"):
    K.label_prompts(kb, ["nodule"], "chest radiograph")
  with pytest.raises(ValueError, match="must hold"):
    K.label_prompts(kb, ["nodule"], "{label} seen")


def test_region_text(kb):
  phrase, region = "opacity in the right lower lung zone", "right lower lung zone"
  definition = kb.get("lung opacity").definition
  assert K.region_text(kb, phrase, region) == phrase
  assert K.region_text(kb, phrase, region, "phrase+knowledge") == f"{phrase}. lung opacity: {definition}"
  assert K.region_text(kb, phrase + ".", region, "phrase+knowledge") == (
      f"{phrase}. lung opacity: {definition}")
  both = K.region_text(kb, "right basilar opacity and cardiomegaly", region, "phrase+knowledge")
  assert both == ("right basilar opacity and cardiomegaly. lung opacity: " + definition + " cardiomegaly: "
                  + kb.get("cardiomegaly").definition)
  signs = K.region_text(kb, "left pleural effusion", "left costophrenic angle", "phrase+signs")
  effusion_signs = ", ".join(kb.get("pleural effusion").signs)
  assert signs == f"left pleural effusion. pleural effusion: {effusion_signs}."
  thick = K.region_text(kb, "left apical pleural thickening", "left apical zone", "phrase+knowledge")
  assert thick.startswith("left apical pleural thickening. other pleural abnormality: ")  # label not written
  for style in K.REGION_STYLES:
    assert K.region_text(kb, "blunting of the left costophrenic angle", "left costophrenic angle", style) == (
        "blunting of the left costophrenic angle")
    assert K.region_text(kb, "", "spine", style) == ""
  with pytest.raises(KeyError, match="left lung zone"):
    K.region_text(kb, phrase, "left lung zone")
  with pytest.raises(ValueError, match="'knowledge'"):
    K.region_text(kb, phrase, region, "knowledge")


def test_negative_texts_are_deterministic_and_vary(kb):
  for fn in (K.attribute_negative, K.hard_negative):
    a = [fn(kb, r, np.random.default_rng(7)) for r in anatomy.REGION_NAMES]
    b = [fn(kb, r, np.random.default_rng(7)) for r in anatomy.REGION_NAMES]
    assert a == b
    rng = np.random.default_rng(1)
    assert len({fn(kb, "left costophrenic angle", rng) for _ in range(40)}) > 5
    with pytest.raises(TypeError, match="Generator"):
      fn(kb, "spine", 3)


def test_hard_negatives_assert_a_finding_typical_of_the_region(kb):
  for region in anatomy.REGION_NAMES:
    typical = {f.name for f in kb.findings_for_region(region)}
    options = K.hard_negative_options(kb, region)
    assert set(options) <= typical and options
    for finding, texts in options.items():
      for text in texts:
        assert kb.find_mentions(text) == [finding], (region, text)
        assert kb.negate(text) not in (None, text), (region, text)  # a positive statement
    rng = np.random.default_rng(3)
    for _ in range(5):
      assert set(kb.find_mentions(K.hard_negative(kb, region, rng))) <= typical
  assert "left pleural effusion" in K.hard_negative_options(kb, "left costophrenic angle")["pleural effusion"]


def test_attribute_negatives_deny_a_finding_typical_of_the_region(kb):
  for region in anatomy.REGION_NAMES:
    typical = {f.name for f in kb.findings_for_region(region)}
    for key, texts in K.attribute_negative_options(kb, region).items():
      assert key in typical or key == K.GENERIC, (region, key)
      for text in texts:
        if key == K.GENERIC:
          assert text in kb.normal_statements[region]
        else:
          assert text in kb.get(key).negations or region in text or text.startswith("no ")
        assert set(kb.find_mentions(text)) <= typical, (region, text)
        assert kb.negate(text) in (text, None), (region, text)  # nothing positive left in it
  options = K.attribute_negative_options(kb, "left costophrenic angle")
  assert "no pleural effusion at the left costophrenic angle" in options["pleural effusion"]
  assert "the left costophrenic angle is sharp" in options[K.GENERIC]


def test_regions_without_typical_findings_fall_back(raw):
  data = copy.deepcopy(raw)
  data["findings"] = [f for f in data["findings"] if f["name"] == "nodule"]
  data["normal_statements"] = {}
  small = K.KnowledgeBase(data)
  rng = np.random.default_rng(0)
  assert K.attribute_negative(small, "aortic arch", rng) == "the aortic arch is unremarkable"
  assert K.hard_negative(small, "aortic arch", rng) == "the aortic arch is abnormal"
  assert small.find_mentions(K.hard_negative(small, "right lung", rng)) == ["nodule"]


def test_vocabulary_texts_cover_every_generated_word(kb):
  vocab = {w for t in kb.vocabulary_texts() for w in re.findall(r"[\w-]+", t.lower())}
  generated = []
  for region in anatomy.REGION_NAMES:
    for options in (K.attribute_negative_options(kb, region), K.hard_negative_options(kb, region)):
      generated += [t for texts in options.values() for t in texts]
  for style in ("definition", "signs"):
    generated += K.label_prompts(kb, kb.names, style=style)
  for text in ("left pleural effusion", "right upper lung nodule", "cardiomegaly", "mass in the mediastinum"):
    generated += [kb.negate(text), kb.rephrase(text, np.random.default_rng(0))]
    generated += [K.region_text(kb, text, "spine", style) for style in K.REGION_STYLES]
  missing = {w for t in generated for w in re.findall(r"[\w-]+", t.lower())} - vocab
  assert not missing


# --- validation ----------------------------------------------------------------------------------
def _finding(data, name):
  return next(f for f in data["findings"] if f["name"] == name)


def _unknown_region(d):
  _finding(d, "nodule")["regions"].append("right lung zone")


def _duplicate_synonym(d):
  _finding(d, "pneumothorax")["synonyms"].append("effusion")


def _empty_definition(d):
  _finding(d, "mass")["definition"] = "  "


def _missing_field(d):
  del _finding(d, "atelectasis")["signs"]


def _bad_version(d):
  d["version"] = "one"


def _upper_case_synonym(d):
  _finding(d, "cardiomegaly")["synonyms"].append("Big Heart")


def _lateral_negation_without_form(d):
  _finding(d, "pneumothorax")["negations"].append("the lungs are expanded")


def _negation_of_another_finding(d):
  _finding(d, "nodule")["negations"].append("no nodule or mass")


def _bad_normal_region(d):
  d["normal_statements"]["left lung base"] = ["the left lung base is clear"]


def _regions_for_no_finding(d):
  _finding(d, "no finding")["regions"] = ["right lung"]


def _unknown_field(d):
  _finding(d, "fracture")["severity"] = "high"


def _lateral_not_bool(d):
  _finding(d, "fracture")["lateral"] = "yes"


@pytest.mark.parametrize("mutate, message", [
    (_unknown_region, r"finding 'nodule' names region 'right lung zone'.*Did you mean"),
    (_duplicate_synonym,
     r"'effusion' is claimed by finding 'pneumothorax'.*and by finding 'pleural effusion'"),
    (_empty_definition, r"finding 'mass' has an empty .*'definition'"),
    (_missing_field, r"finding 'atelectasis' is missing field\(s\) \['signs'\]"),
    (_bad_version, r"'version'.*'one'"),
    (_upper_case_synonym, r"finding 'cardiomegaly' 'synonyms' holds 'Big Heart'"),
    (_lateral_negation_without_form, r"finding 'pneumothorax'.*'the lungs are expanded' must end"),
    (_negation_of_another_finding, r"finding 'nodule' negation 'no nodule or mass' mentions.*'mass'"),
    (_bad_normal_region, r"normal_statements names region 'left lung base'"),
    (_regions_for_no_finding, r"finding 'no finding' must have no regions"),
    (_unknown_field, r"finding 'fracture' has unknown field\(s\) \['severity'\]"),
    (_lateral_not_bool, r"finding 'fracture' 'lateral' must be true or false, got 'yes'"),
])
def test_validation_errors_name_the_file_finding_and_value(tmp_path, raw, mutate, message):
  data = copy.deepcopy(raw)
  mutate(data)
  path = _write(tmp_path, data)
  with pytest.raises(ValueError, match=message) as err:
    K.load_knowledge_base(path)
  assert str(path) in str(err.value)


def test_invalid_json_and_missing_file(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text('{"version": "1.0.0",')
  with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
    K.load_knowledge_base(bad)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    K.load_knowledge_base(tmp_path / "nope.json")


def test_cache_reloads_an_edited_file(tmp_path, raw):
  path = _write(tmp_path, raw)
  first = K.load_knowledge_base(path)
  assert K.load_knowledge_base(str(path)) is first
  _write(tmp_path, {**raw, "version": "1.10.0"})
  assert K.load_knowledge_base(path).version == "1.10.0"

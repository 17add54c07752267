"""Held-out evaluation wordings (findings.json `eval_synonyms`, `eval_templates`) are never training
text: every wording the training-text builders can produce is enumerated here, and no held-out
wording may occur in any of them (case-insensitive, at word boundaries).

Training texts are the label prompts (each config's template, every style), the knowledge base's
own texts, the region-text sampler's outputs (a phrase's sub-sentences, every rephrasing of them,
the negation of each; attribute statements and hard negatives), the SynthCXR phrasing bank and the
drawn-shapes corpus. MIMIC-CXR reports are real text and cannot be enumerated (README says so).
"""

from __future__ import annotations

import copy
import glob
import itertools
import json
import os
import re

import pytest

from avlm_jax import anatomy
from avlm_jax import knowledge as K
from data_pipelines import region_text_sampling, synthetic_shapes
from data_pipelines.synthcxr import reports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def kb():
  return K.load_knowledge_base()


def _config_templates_and_labels() -> tuple[set[str], set[str]]:
  """Every `prompt_template` string and every label tuple the configs in configs/ set."""
  templates, labels = set(), set()
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    src = open(path).read()
    templates.update(re.findall(r"prompt_template\s*=\s*\"([^\"]+)\"", src))
  from configs import avlm_b16, common, mimic_imagenome
  for tup in (common.SYNTHETIC_LABELS, common.SYNTHCXR_LABELS, avlm_b16.CHEXPERT_LABELS, mimic_imagenome.LABELS):
    labels.update(tup)
  assert common.base_config().prompt_template in templates
  return templates, labels


def _fill_bank(template: str, bank: dict) -> set[str]:
  """Every filling of a phrasing-bank template (a superset of what SynthCXR writes)."""
  zones = [""] + [w for ws in bank["zone_words"].values() for w in ws]
  severities = [""] + [w for ws in bank["severity_words"].values() for w in ws]
  out = set()
  for side, zone, sev, loc in itertools.product(("right", "left", "bilateral", "midline"), zones, severities,
                                                ("", "apical", "lateral")):
    out.add(" ".join(template.format(side=side, zone=zone, severity=sev, location=loc, size="2.1 cm").split()))
  return out


def _region_phrases(kb) -> set[str]:
  """Every text a region slot can start from: the corpora's region phrases and statements."""
  bank = reports.load_phrases()
  phrases: set[str] = set()
  for entry in bank["findings"].values():
    for key in ("positive", "negative", "impression"):
      for t in entry[key]:
        phrases |= _fill_bank(t, bank)
  phrases |= {t for entry in bank["normal"].values() for t in entry["text"]} | set(bank["no_finding_impression"])
  for variants in synthetic_shapes._PHRASINGS.values():
    for v, r, side in itertools.product(variants, anatomy.REGION_NAMES, ("right", "left")):
      phrases.add(v.format(r=r, side=side))
  phrases |= set(synthetic_shapes._NORMAL_PHRASES.values()) | set(synthetic_shapes._NEGATIONS.values())
  phrases |= set(synthetic_shapes.FINDINGS) | {"no acute cardiopulmonary process"}
  for f in kb.findings:
    phrases |= set(f.text_forms) | set(f.subtypes) | set(f.negations)
  phrases |= {s for ss in kb.normal_statements.values() for s in ss}
  return phrases


def training_texts(kb) -> list[str]:
  templates, labels = _config_templates_and_labels()
  texts: set[str] = set()
  for template, style in itertools.product(templates, K.LABEL_STYLES):
    texts.update(K.label_prompts(kb, sorted(labels | set(kb.names)), template=template, style=style))
  # The region sampler: a sub-sentence, maybe rephrased, and its negation.
  for phrase in _region_phrases(kb):
    for sub in region_text_sampling.split_subsentences(phrase):
      for r in [sub, *kb.rephrasings(sub)]:  # perturbed or not
        texts.add(r)
        negated = kb.negate(r)
        if negated:
          texts.add(negated)
  for region, exclude in itertools.product(anatomy.REGION_NAMES, ((), kb.names)):  # every finding excluded:
    for fn in (K.attribute_negative_options, K.hard_negative_options):           # the fallback statements
      texts.update(t for ts in fn(kb, region, exclude).values() for t in ts)
  # What the 'phrase+knowledge' / 'phrase+signs' styles append after a phrase (after ". ", which no
  # held-out wording can span: they hold no punctuation, see the test below).
  for f in kb.findings:
    texts.add(f"{f.display_name}: {f.definition}")
    texts.add(f"{f.display_name}: {', '.join(f.signs)}.")
  return sorted(texts)


def _words(text: str) -> list[str]:
  """Words and punctuation as BERT's pre-tokenizer splits them, lower case."""
  return re.findall(r"\w+|[^\w\s]", text.lower())


def _tokens(text: str) -> str:
  """' w1 w2 ... ': lower-case words and punctuation marks, so that a substring test on these is
  a case-insensitive match at word boundaries (a hyphen splits words here: stricter than needed)."""
  return " " + " ".join(_words(text)) + " "


def _occurs(wording: str, corpus: str) -> bool:
  return _tokens(wording) in corpus


@pytest.fixture(scope="session")
def corpus(kb):
  texts = training_texts(kb)
  assert len(texts) > 5000  # the enumeration reached the phrasing bank, rephrasings and negations
  return "\n".join(_tokens(t) for t in texts)


def _heldout_synonyms(kb) -> list[str]:
  return [s for f in kb.findings for s in f.eval_synonyms]


def test_every_finding_has_heldout_wordings(kb):
  assert kb.version == "1.1.0"
  for f in kb.findings:
    assert len(f.eval_synonyms) >= 2, f.name
    for s in f.eval_synonyms:
      assert re.fullmatch(r"[a-z]+(?:[ -][a-z]+)*", s), s  # no punctuation: cannot span a sentence end
      assert kb.find_mentions(s) == [] and not kb.mentions(s), s
      assert s not in kb and s not in f.text_forms  # never a form, so never a rephrase choice
  assert len(kb.eval_image_templates) >= 2 and len(kb.eval_region_templates) >= 1


def test_the_enumeration_catches_a_training_wording(kb, corpus):
  """The checker itself: training wordings are found, at word boundaries only."""
  for text in ("chest radiograph showing pleural effusion", "enlarged heart", "no left pleural effusion",
               "the left costophrenic angle is abnormal",
               "fluid layering at the left costophrenic angle", "pleural effusion: an abnormal collection",
               "left effusion", "Small right lower lung atelectasis"):
    assert _occurs(text, corpus), text
  assert not _occurs("heart enlarge", corpus)  # a word cut short is no match


def test_no_heldout_wording_occurs_in_any_training_text(kb, corpus):
  found = [s for s in _heldout_synonyms(kb) if _occurs(s, corpus)]
  assert not found, f"held-out synonyms used by training texts: {found}"
  prompts = [p for f in kb.findings for p in kb.heldout_label_prompts(f.name)]
  region = [t for f in kb.findings if f.regions for r in f.regions
            for pair in kb.heldout_region_texts(f.name, r) for t in pair]
  found = [t for t in prompts + region if _occurs(t, corpus)]
  assert not found, found


def test_heldout_templates_are_not_training_templates(kb, corpus):
  """Each held-out template holds text no training text has (so no filling of it is a training
  text, whatever the finding), and no config's training template is inside a held-out prompt."""
  for template in kb.eval_image_templates:
    pieces = [p.strip() for p in template.split("{name}") if p.strip()]
    assert any(not _occurs(p, corpus) for p in pieces), template
  for pos, neg in kb.eval_region_templates:
    for template in (pos, neg):
      for region in anatomy.REGION_NAMES:
        pieces = [p.strip() for p in template.format(region=region, finding="\0").split("\0") if p.strip()]
        assert any(not _occurs(p, corpus) for p in pieces), (template, region)
  templates, _ = _config_templates_and_labels()
  prompts = [p for f in kb.findings for p in kb.heldout_label_prompts(f.name)]
  for t in templates:
    for piece in (p.strip() for p in re.split(r"\{(?:name)?\}", t) if p.strip()):
      assert not any(_occurs(piece, _tokens(p)) for p in prompts), (t, piece)


def test_heldout_words_are_whole_words_of_the_corpus_tokenizers(kb, tmp_path):
  """A new combination of known words: each word is in the vocabulary the built-in corpora's
  tokenizers are built from (not spelled out in characters), and the prompts fit the default
  prompt and phrase lengths."""
  from configs.common import base_config
  from avlm_jax.tokenizer import TextTokenizer, build_wordpiece_tokenizer

  texts = reports.vocabulary_texts() + kb.vocabulary_texts()
  vocab = {w for t in texts + synthetic_shapes._all_texts() for w in _words(t)}
  wordings = _heldout_synonyms(kb) + list(kb.eval_image_templates) + [t for p in kb.eval_region_templates for t in p]
  unknown = sorted({w for s in wordings for w in _words(re.sub(r"\{\w+\}", " ", s))} - vocab)
  assert not unknown
  tok = TextTokenizer(build_wordpiece_tokenizer(texts, str(tmp_path / "tok")))
  c = base_config()
  for f in kb.findings:
    prompts = kb.heldout_label_prompts(f.name)
    assert all(tok([p], 64)[0].astype(bool).sum() <= c.data.max_prompt_len for p in prompts), prompts
    for r in f.regions:
      for pair in kb.heldout_region_texts(f.name, r):
        assert all(tok([t], 64)[0].astype(bool).sum() <= c.data.max_phrase_len for t in pair), pair


def test_heldout_words_are_whole_pieces_of_tinys_sentencepiece_tokenizer(kb, tmp_path):
  """The same property for the SentencePiece tokenizer `tiny` trains (data.tokenizer): a learned
  vocabulary has no word list to look words up in, so each held-out wording must encode as one piece
  per word and punctuation mark (nothing spelled out), and the prompts fit the default lengths.
  Built as tiny builds it on SynthCXR: its train reports (here the report writer's, as many as
  tiny's corpus holds) and the knowledge base's texts (sentencepiece_tokenizer.corpus_texts)."""
  import numpy as np

  from avlm_jax import sentencepiece_tokenizer as spt
  from avlm_jax.tokenizer import TextTokenizer
  from configs import tiny
  from configs.common import base_config
  from data_pipelines.synthcxr import findings

  c = tiny.get_config()
  assert c.data.tokenizer == "sentencepiece"
  rng = np.random.default_rng(0)
  texts = [reports.write_report(findings.sample(rng, findings.FINDINGS, c.data.synthcxr.p_normal), rng).text
           for _ in range(c.data.synthcxr.num_train)]
  texts += kb.vocabulary_texts() + list(anatomy.REGION_NAMES)
  tok = TextTokenizer(spt.train(texts, str(tmp_path / "spm"), vocab_size=c.data.tokenizer_vocab_size,
                                model_type=c.data.tokenizer_model_type))
  wordings = _heldout_synonyms(kb) + list(kb.eval_image_templates) + [t for p in kb.eval_region_templates for t in p]
  for s in (re.sub(r"\{\w+\}", " ", w) for w in wordings):
    pieces = [p for p in (q.lstrip("\u2581") for q in tok.hf.tokenize(s)) if p]
    assert pieces == _words(s), (s, tok.hf.tokenize(s))
  d = base_config().data
  for f in kb.findings:
    prompts = kb.heldout_label_prompts(f.name)
    assert all(tok([p], 64)[0].astype(bool).sum() <= d.max_prompt_len for p in prompts), prompts
    for r in f.regions:
      for pair in kb.heldout_region_texts(f.name, r):
        assert all(tok([t], 64)[0].astype(bool).sum() <= d.max_phrase_len for t in pair), pair


def test_rephrasings_enumerate_what_rephrase_draws(kb):
  import numpy as np

  text = "Small left pleural effusions and cardiomegaly."
  every = set(kb.rephrasings(text))
  drawn = {kb.rephrase(text, np.random.default_rng(seed)) for seed in range(300)}
  assert drawn == every and len(every) == 4 * 5  # 4 other wordings of the effusion × 5 of cardiomegaly
  assert kb.rephrasings("the heart is enlarged") == ["the heart is enlarged"]


# --- validation of the held-out fields ------------------------------------------------------------
def _raw():
  with open(K.DEFAULT_PATH) as f:
    return json.load(f)


def _finding(data, name):
  return next(f for f in data["findings"] if f["name"] == name)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: _finding(d, "cardiomegaly")["eval_synonyms"].append("big enlarged heart"),
     r"finding 'cardiomegaly' eval_synonyms entry 'big enlarged heart' contains 'enlarged heart'"),
    (lambda d: _finding(d, "nodule")["eval_synonyms"].append("rounded effusions"),
     r"'rounded effusions' contains 'effusion' \(a training wording of 'pleural effusion'\)"),
    (lambda d: _finding(d, "fracture")["eval_synonyms"].append("pleural other"),
     r"'pleural other' contains 'pleural other' \(a training wording of 'pleural other'\)"),
    (lambda d: _finding(d, "mass")["eval_synonyms"].append("increased heart size"),
     r"eval synonym 'increased heart size' is listed by finding 'cardiomegaly' and by finding 'mass'"),
    (lambda d: _finding(d, "mass")["eval_synonyms"].append("Big Mass"),
     r"finding 'mass' 'eval_synonyms' holds 'Big Mass'"),
    (lambda d: d["eval_templates"]["image"].append("x-ray of {label}"),
     r"eval_templates\['image'\]\[3\] 'x-ray of \{label\}' must hold each of \['\{name\}'\]"),
    (lambda d: d["eval_templates"]["image"].append("opacity and {name}"),
     r"eval_templates\['image'\]\[3\] 'opacity and \{name\}' contains 'opacity'"),
    (lambda d: d["eval_templates"]["region"].append({"positive": "{finding} at {region}"}),
     r"eval_templates\['region'\]\[1\] is missing field\(s\) \['negative'\]"),
    (lambda d: d["eval_templates"]["region"].append({"positive": "{finding} {region}", "negative": "{finding} {region}"}),
     r"eval_templates\['region'\]\[1\] has the same positive and negative template"),
    (lambda d: d["eval_templates"].update(text=["{name}"]),
     r"'eval_templates' has unknown field\(s\) \['text'\]"),
])
def test_heldout_field_errors_name_the_value(tmp_path, mutate, message):
  data = copy.deepcopy(_raw())
  mutate(data)
  path = tmp_path / "kb.json"
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=message):
    K.load_knowledge_base(path)


def test_a_base_without_heldout_wordings_says_so(tmp_path):
  data = copy.deepcopy(_raw())
  del data["eval_templates"]
  for f in data["findings"]:
    f.pop("eval_synonyms", None)
  path = tmp_path / "kb.json"
  path.write_text(json.dumps(data))
  small = K.load_knowledge_base(path)  # both fields are optional
  with pytest.raises(ValueError, match=r"no eval_templates\['image'\]"):
    small.heldout_label_prompts("nodule")
  data["eval_templates"] = _raw()["eval_templates"]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"finding 'nodule' has no eval_synonyms"):
    K.load_knowledge_base(path).heldout_label_prompts("Nodules")

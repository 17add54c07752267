"""The paper's region-text sampling (§3.3 of shared/docs/paper.md), as a seeded Grain random map.

Every one of the 29 region slots of an example gets a pair of texts: a *true* statement about
the region (the slot's positive, so every slot with a text is an anchor of the region–phrase loss)
and a *false* one (an extra candidate in the batch, NegCLIP-style). Our choice where the paper is
silent: the paper makes negated and empty-region texts mismatches, which leaves most slots (every
normal region) without any signal; here each mismatch is the false partner of a slot that keeps
its positive, so a normal region anchors on a true statement about itself.

  * a region with a phrase: the phrase is split into sub-sentences and one is drawn as the true
    text; with probability `perturb_prob` it is rephrased with a synonym from the knowledge base
    (still true). Its false text is its negation ("no left pleural effusion"), or, when the
    knowledge base cannot negate it, a hard negative;
  * a region without a phrase (`normal_regions=True`): its true text is an attribute statement (a
    true denial such as "no pleural effusion at the left costophrenic angle", or a normal
    statement such as "the left costophrenic angle is sharp"); its false text is a hard negative (a
    finding typical of the region, asserted: "left pleural effusion"). `normal_regions=False`
    leaves such slots without texts (the paper-literal variant, for ablations);
  * attribute statements and hard negatives never name a finding present anywhere in the image
    (a hard negative about another right-sided region could otherwise be true of the image);
  * `false_texts=False` drops the false texts (every slot's row then holds the batch's true texts only);
  * texts are then written in the configured region-text style (the phrase alone, or the phrase
    plus the knowledge base's definition of the findings it names).

Duplicate texts in the global batch share labels downstream: the loss compares text hashes, so
"normal cardiac silhouette" on two images are positives of each other, and a false text that is
another slot's true text is that slot's positive too. Grain derives each example's generator
from the pipeline seed and the example's index, so the draws are deterministic and resume exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Sequence

import grain
import numpy as np

from avlm_jax import anatomy
from avlm_jax.knowledge import base as kb_base
from avlm_jax.knowledge import prompts

# A stop, but not the point of a decimal number ('a 2.1 cm nodule' is one sub-sentence).
_SUBSENTENCE = re.compile(r"\s*(?:;|\.(?!\d))\s*")


def split_subsentences(phrase: str) -> list[str]:
  """'A; B. C' -> ['A', 'B', 'C'] (sentence and clause stops only; commas and decimal points stay
  inside)."""
  return [p for p in (s.strip() for s in _SUBSENTENCE.split(phrase)) if p]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  perturb_prob: float = 0.2
  normal_regions: bool = True
  false_texts: bool = True
  region_text_style: str = "phrase"

  def __post_init__(self):
    if not 0.0 <= self.perturb_prob <= 1.0:
      raise ValueError(f"text sampling: perturb_prob={self.perturb_prob} is outside [0, 1]")
    if self.region_text_style not in prompts.REGION_STYLES:
      raise ValueError(f"text sampling: region_text_style={self.region_text_style!r}; "
                       f"expected one of {prompts.REGION_STYLES}")


def present_findings(kb: kb_base.KnowledgeBase, phrases: Sequence[str], findings: Iterable[str] = ()) -> set[str]:
  """Canonical names of every finding present in the image: the record's findings and every
  finding a region phrase states as present."""
  out = {kb.canonical(f) for f in findings if f in kb}
  for phrase in phrases:
    out.update(kb.positive_findings(phrase))
  return out


def _negation(kb: kb_base.KnowledgeBase, true: str) -> str | None:
  """The false text of a finding sub-sentence, when the knowledge base can negate it."""
  negated = kb.negate(true)
  return negated if negated is not None and negated != true else None


def sample_region_texts(phrases: Sequence[str], rng: np.random.Generator, kb: kb_base.KnowledgeBase,
                        opts: SamplingOptions, findings: Iterable[str] = ()) -> tuple[list[str], list[str]]:
  """29 phrases -> (29 true texts, 29 false texts); '' means the slot has no such text.

  `findings`: the record's image-level findings (with the phrases, what the image shows).
  """
  present = present_findings(kb, phrases, findings)
  true_texts, false_texts = [], []
  for phrase, region in zip(phrases, anatomy.REGION_NAMES):
    subs = split_subsentences(phrase)
    true, false = "", ""
    if subs:
      true = subs[int(rng.integers(len(subs)))]
      if rng.random() < opts.perturb_prob:
        true = kb.rephrase(true, rng)
      negated = _negation(kb, true)
      false = negated if negated is not None else prompts.hard_negative(kb, region, rng, exclude=present)
    elif opts.normal_regions:
      true = prompts.attribute_negative(kb, region, rng, exclude=present)
      false = prompts.hard_negative(kb, region, rng, exclude=present)
    if not opts.false_texts:
      false = ""
    true_texts.append(prompts.region_text(kb, true, region, opts.region_text_style) if true else "")
    false_texts.append(prompts.region_text(kb, false, region, opts.region_text_style) if false else "")
  return true_texts, false_texts


class SampleRegionTexts(grain.transforms.RandomMap):
  """Element `phrases` (29 str) and `findings` -> `texts` (29 true, then 29 false str)."""

  def __init__(self, opts: SamplingOptions, knowledge_path: str | None = None):
    self.opts = opts
    self.knowledge_path = knowledge_path

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    kb = kb_base.load_knowledge_base(self.knowledge_path)  # cached per process
    element = dict(element)
    true, false = sample_region_texts(element.pop("phrases"), rng, kb, self.opts, element.pop("findings", ()))
    element["texts"] = true + false
    return element


# --- every text the sampler can emit (for precomputed text features) ---------------------------
# `possible_region_texts` follows `sample_region_texts` branch for branch, with each random draw
# replaced by the full set it draws from (the same option functions): keep the two in step
# (tests/test_text_table.py checks every sampled text is enumerated).


@functools.lru_cache(maxsize=1 << 16)
def _slot_options(kb: kb_base.KnowledgeBase, phrase: str, region: str, opts: SamplingOptions,
                  present: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
  """(every true text, every false text) `sample_region_texts` can give this slot; '' included
  where the slot may have no such text."""
  subs = split_subsentences(phrase)
  true, false = set(), set()
  if subs:
    for sub in subs:
      for t in dict.fromkeys([sub, *kb.rephrasings(sub)] if opts.perturb_prob > 0 else [sub]):
        true.add(t)
        negated = _negation(kb, t)
        if negated is not None:
          false.add(negated)
        else:
          false.update(x for xs in prompts.hard_negative_options(kb, region, present).values() for x in xs)
  elif opts.normal_regions:
    true.update(x for xs in prompts.attribute_negative_options(kb, region, present).values() for x in xs)
    false.update(x for xs in prompts.hard_negative_options(kb, region, present).values() for x in xs)
  if not true:
    true.add("")
  if not false or not opts.false_texts:
    false = {""}
  style = lambda texts: frozenset(prompts.region_text(kb, t, region, opts.region_text_style) if t else ""
                                  for t in texts)
  return style(true), style(false)


def possible_region_texts(phrases: Sequence[str], kb: kb_base.KnowledgeBase, opts: SamplingOptions,
                          findings: Iterable[str] = ()) -> set[str]:
  """Every text `sample_region_texts(phrases, rng, kb, opts, findings)` can return, for any rng
  ('' when some slot can be left without a text)."""
  present = frozenset(present_findings(kb, phrases, findings))
  out: set[str] = set()
  for phrase, region in zip(phrases, anatomy.REGION_NAMES):
    true, false = _slot_options(kb, phrase, region, opts, present)
    out |= true | false
  return out

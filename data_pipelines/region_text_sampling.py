"""The paper's region-text sampling (§3.3 of shared/docs/paper.md), as a seeded Grain random map.

For each of the 29 region slots of one example:
  * a region with a phrase: the phrase is split into sub-sentences and one is drawn as the
    positive text. With probability `perturb_prob` it is perturbed: negated (the text then
    contradicts the image, so the slot stops being an anchor: its text stays in the batch as a
    negative for everyone) with probability `negate_fraction`, otherwise rephrased with a synonym
    from the knowledge base (still a positive);
  * a region without a phrase gets, per `empty_region_text`, no text ('none'), an attribute-based
    negative (a true denial such as "no pleural effusion at the left costophrenic angle",
    'attribute'), a hard negative (a finding typical of the region that is absent, 'hard'), or
    either ('mixed', hard with probability `hard_fraction`). Such texts are candidates, never
    anchors;
  * the text is then written in the configured region-text style (the phrase alone, or the phrase
    plus the knowledge base's definition of the findings it names).

Duplicate texts in the global batch share labels downstream: the loss compares text hashes.
Grain derives each example's generator from the pipeline seed and the example's index, so the
draws are deterministic and resume exactly.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import grain
import numpy as np

from avlm_jax import anatomy
from avlm_jax.knowledge import base as kb_base
from avlm_jax.knowledge import prompts

EMPTY_REGION_MODES = ("none", "attribute", "hard", "mixed")
_SUBSENTENCE = re.compile(r"\s*[;.]\s*")


def split_subsentences(phrase: str) -> list[str]:
  """'A; B. C' -> ['A', 'B', 'C'] (sentence and clause stops only; commas stay inside)."""
  return [p for p in (s.strip() for s in _SUBSENTENCE.split(phrase)) if p]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  perturb_prob: float = 0.2
  negate_fraction: float = 0.5
  empty_region_text: str = "mixed"
  hard_fraction: float = 0.5
  region_text_style: str = "phrase"

  def __post_init__(self):
    for name in ("perturb_prob", "negate_fraction", "hard_fraction"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"text sampling: {name}={v} is outside [0, 1]")
    if self.region_text_style not in prompts.REGION_STYLES:
      raise ValueError(f"text sampling: region_text_style={self.region_text_style!r}; "
                       f"expected one of {prompts.REGION_STYLES}")
    if self.empty_region_text not in EMPTY_REGION_MODES:
      raise ValueError(f"text sampling: empty_region_text={self.empty_region_text!r}; "
                       f"expected one of {EMPTY_REGION_MODES}")


def sample_region_texts(phrases: Sequence[str], rng: np.random.Generator, kb: kb_base.KnowledgeBase,
                        opts: SamplingOptions) -> tuple[list[str], np.ndarray]:
  """29 phrases -> (29 texts, (29,) bool anchor mask). '' means the slot has no text."""
  texts, anchors = [], np.zeros(len(phrases), bool)
  for i, (phrase, region) in enumerate(zip(phrases, anatomy.REGION_NAMES)):
    subs = split_subsentences(phrase)
    if subs:
      text, positive = subs[int(rng.integers(len(subs)))], True
      if rng.random() < opts.perturb_prob:
        if rng.random() < opts.negate_fraction:
          negated = kb.negate(text)
          if negated is not None and negated != text:
            text, positive = negated, False
        else:
          text = kb.rephrase(text, rng)
    else:
      mode = opts.empty_region_text
      if mode == "mixed":
        mode = "hard" if rng.random() < opts.hard_fraction else "attribute"
      positive = False
      text = {"none": lambda: "",
              "attribute": lambda: prompts.attribute_negative(kb, region, rng),
              "hard": lambda: prompts.hard_negative(kb, region, rng)}[mode]()
    if text:
      text = prompts.region_text(kb, text, region, opts.region_text_style)
    texts.append(text)
    anchors[i] = positive
  return texts, anchors


class SampleRegionTexts(grain.transforms.RandomMap):
  """Element `phrases` (29 str) -> `texts` (29 str) and `anchor` (29,) bool."""

  def __init__(self, opts: SamplingOptions, knowledge_path: str | None = None):
    self.opts = opts
    self.knowledge_path = knowledge_path

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    kb = kb_base.load_knowledge_base(self.knowledge_path)  # cached per process
    element = dict(element)
    element["texts"], element["anchor"] = sample_region_texts(element.pop("phrases"), rng, kb, self.opts)
    return element

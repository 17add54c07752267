"""Knowledge-augmented texts for the two alignment losses, with the format picked by a config string.

- `label_prompts`: one text per image-level label ('plain', 'definition' or 'signs' style);
- `region_text`: a region's report phrase, optionally followed by what its findings mean;
- `attribute_negative` / `hard_negative`: texts that are true / false for a region with no finding,
  built from the findings typical of that region. Both pick a finding uniformly first and then a
  wording, so findings with many synonyms are not over-represented; the `*_options` functions
  expose the full candidate sets.
"""

from __future__ import annotations

import functools
import string
from typing import Collection, Mapping, Sequence

import numpy as np

from avlm_jax import anatomy
from avlm_jax.knowledge.base import KnowledgeBase

LABEL_STYLES = ("plain", "definition", "signs")
REGION_STYLES = ("phrase", "phrase+knowledge", "phrase+signs")
GENERIC = "<generic>"  # options key for region statements not tied to one finding


def _check_style(style: str, allowed: Sequence[str], what: str) -> None:
  if style not in allowed:
    raise ValueError(f"unknown {what} {style!r}; choose one of {list(allowed)}")


def _fill(template: str, name: str) -> str:
  """`template` with its '{name}' or '{}' placeholder(s) filled (the config uses '{}')."""
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f"prompt template {template!r} is not a valid format string: {e}") from None
  if not fields or any(f not in ("", "name", "0") for f in fields):
    raise ValueError(f"prompt template {template!r} must hold '{{name}}' (or '{{}}') and no other "
                     f"field; it has {fields}")
  return template.format(name, name=name)


def label_prompts(kb: KnowledgeBase, labels: Sequence[str], template: str = "{name}",
                  style: str = "plain") -> list[str]:
  """One text per label: the filled template, + ': definition' or + ', sign, sign, ...'.

  The label is written as given (so plain prompts equal `template.format(label)`); its knowledge
  comes from the finding it resolves to. Unknown labels raise one KeyError naming all of them.
  """
  if isinstance(labels, str):
    raise TypeError(f"labels must be a sequence of label names, not the string {labels!r}")
  _check_style(style, LABEL_STYLES, "label prompt style")
  unknown = [label for label in labels if label not in kb]
  if unknown:
    hints = {u: kb.suggestions(u) for u in unknown}
    raise KeyError(f"labels {unknown} are not in the knowledge base {kb.source} (v{kb.version}); "
                   f"close matches: {hints}; known findings: {list(kb.names)}")
  out = []
  for label in labels:
    text, finding = _fill(template, label), kb.get(label)
    if style == "definition":
      text = f"{text}: {finding.definition}"
    elif style == "signs":
      text = f"{text}, {', '.join(finding.signs)}"
    out.append(text)
  return out


def region_text(kb: KnowledgeBase, phrase: str, region: str, style: str = "phrase") -> str:
  """The text aligned with a region: the phrase, or the phrase + '. <finding>: <definition>' for
  each finding it mentions ('phrase+signs': the signs instead). A phrase naming no finding (or an
  empty one) is returned unchanged in every style."""
  anatomy.region_id(region)
  _check_style(style, REGION_STYLES, "region text style")
  mentioned = [kb.get(n) for n in kb.find_mentions(phrase)] if style != "phrase" else []
  if not mentioned:
    return phrase
  if style == "phrase+knowledge":
    notes = [f"{f.display_name}: {f.definition}" for f in mentioned]
  else:
    notes = [f"{f.display_name}: {', '.join(f.signs)}." for f in mentioned]
  return f"{phrase.rstrip().rstrip('.')}. " + " ".join(notes)


# --- region wording -----------------------------------------------------------------------------
def _preposition(region: str) -> str:
  if region.endswith(("costophrenic angle", "hemidiaphragm", "carina", "cavoatrial junction")):
    return "at"
  if region.endswith("hilar structures"):
    return "involving"
  if region.endswith(("clavicle", "spine", "aortic arch")):
    return "of"
  return "in"


_SIDE_MODIFIERS = {  # region (after the side) -> adjective used as '<side> <modifier> <finding>'
    "lung": "", "upper lung zone": "upper lung", "mid lung zone": "mid lung",
    "lower lung zone": "basilar", "apical zone": "apical", "hilar structures": "hilar",
    "costophrenic angle": "", "hemidiaphragm": "",
}


def _side_modifier(region: str) -> str | None:
  """'left costophrenic angle' -> 'left', 'right lower lung zone' -> 'right basilar'; None for
  regions where '<side> <finding>' does not read as a location (clavicles, right atrium)."""
  side, _, rest = region.partition(" ")
  if side not in ("right", "left") or rest not in _SIDE_MODIFIERS:
    return None
  return f"{side} {_SIDE_MODIFIERS[rest]}".strip()


def _location(region: str) -> str:
  return f"{_preposition(region)} the {region}"


_FUNCTION_WORDS = frozenset({"in", "of", "the", "than", "and", "other", "to"})


def _prenominal(form: str, modifier: str) -> bool:
  """Whether '<modifier> <form>' reads as a phrase: not before 'air in the pleural space' or
  'other pleural abnormality', and no 'upper lung lung nodule' / 'upper lung pulmonary mass'."""
  words = set(form.split())
  return not (_FUNCTION_WORDS & words) and not ({"lung", "pulmonary"} & words and "lung" in modifier.split())


def _fits(text: str, region: str) -> bool:
  """'pulmonary mass' / 'lung mass' describe the lung, not a midline region like the mediastinum."""
  return anatomy.REGIONS[anatomy.region_id(region)].side != "midline" or not (
      {"lung", "pulmonary"} & set(text.split()))


@functools.lru_cache(maxsize=None)
def _finding_statements(kb: KnowledgeBase, region: str, asserted: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """(finding, its denials (or, `asserted`, its assertions) at `region`) for every finding typical
  of the region; cached, as the region-text sampler asks for them for every slot of every example."""
  out = []
  for f in kb.findings_for_region(region):
    if f.lateral:
      forms = f.text_forms if asserted else f.negations
      texts = [f"{form} {_location(region)}" for form in forms if _fits(form, region)]
      modifier = _side_modifier(region)
      if modifier:
        texts += [f"{'' if asserted else 'no '}{modifier} {form}" for form in f.text_forms
                  if _prenominal(form, modifier)]
    else:  # global statements ('heart size is normal', 'cardiomegaly'): no location added
      texts = list(f.text_forms if asserted else f.negations)
    if texts:
      out.append((f.name, tuple(dict.fromkeys(texts))))
  return tuple(out)


def attribute_negative_options(kb: KnowledgeBase, region: str,
                               exclude: Collection[str] = ()) -> dict[str, tuple[str, ...]]:
  """Every statement `attribute_negative` may return for `region`, keyed by the finding it denies
  (GENERIC for the region's normal statements or the fallback). Findings named in `exclude`
  (canonical names: those present in the image) are left out: a global denial such as 'heart
  size is normal' would be false of an image with cardiomegaly elsewhere."""
  excluded = _excluded(kb, exclude)
  options = {name: texts for name, texts in _finding_statements(kb, region, False) if name not in excluded}
  normal = kb.normal_statements.get(region, ())
  if normal or not options:
    options[GENERIC] = tuple(normal) or (f"the {region} is unremarkable",)
  return options


def hard_negative_options(kb: KnowledgeBase, region: str,
                          exclude: Collection[str] = ()) -> dict[str, tuple[str, ...]]:
  """Every statement `hard_negative` may return for `region`, keyed by the finding it asserts.
  Findings named in `exclude` (present somewhere in the image) are left out, so the statement is
  false of the image, not just of the region's own phrase ('right pleural effusion' on the right
  hemidiaphragm of an image with a right effusion at the costophrenic angle is true)."""
  excluded = _excluded(kb, exclude)
  options = {name: texts for name, texts in _finding_statements(kb, region, True) if name not in excluded}
  if not options:
    # A normal statement here would be true for a normal region, i.e. a false negative.
    options[GENERIC] = (f"the {region} is abnormal",)
  return options


# CheXpert's label hierarchy (Irvin et al. 2019): a finding and those it is a kind of. Excluding a
# present finding also excludes its broader and narrower relatives: with consolidation in the image,
# "lung opacity in the right lung" may be true, and with a lung opacity, "consolidation" may be.
BROADER = {
    "cardiomegaly": ("enlarged cardiomediastinum",),
    "lung lesion": ("lung opacity",),
    "nodule": ("lung lesion", "lung opacity"),
    "mass": ("lung lesion", "lung opacity"),
    "pulmonary edema": ("lung opacity",),
    "consolidation": ("lung opacity",),
    "pneumonia": ("lung opacity",),
    "atelectasis": ("lung opacity",),
}


def related_findings(names: Collection[str]) -> set[str]:
  """`names` with every broader and narrower finding of each (canonical names)."""
  out = set(names)
  for narrow, broad in BROADER.items():
    if narrow in names or any(b in names for b in broad):
      out.add(narrow)
    if narrow in names:
      out.update(broad)
  return out


def _excluded(kb: KnowledgeBase, exclude: Collection[str]) -> set[str]:
  """The canonical names in `exclude` and every finding related to one of them."""
  if isinstance(exclude, str):
    raise TypeError(f"exclude must be a collection of finding names, not the string {exclude!r}")
  return related_findings({kb.canonical(e) for e in exclude if e in kb})


def _pick(options: Mapping[str, tuple[str, ...]], rng: np.random.Generator) -> str:
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f"need a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
  keys = list(options)
  texts = options[keys[int(rng.integers(len(keys)))]]
  return texts[int(rng.integers(len(texts)))]


def attribute_negative(kb: KnowledgeBase, region: str, rng: np.random.Generator,
                       exclude: Collection[str] = ()) -> str:
  """A true statement for `region` WITHOUT a finding: a negated finding typical of it ('no pleural
  effusion at the left costophrenic angle') or a normal statement ('the left costophrenic angle is
  sharp'); 'the <region> is unremarkable' when the base knows nothing of the region."""
  return _pick(attribute_negative_options(kb, region, exclude), rng)


def hard_negative(kb: KnowledgeBase, region: str, rng: np.random.Generator,
                  exclude: Collection[str] = ()) -> str:
  """A false statement for `region` WITHOUT a finding: a finding typical of it, asserted ('left
  pleural effusion'); 'the <region> is abnormal' when the base knows no finding there."""
  return _pick(hard_negative_options(kb, region, exclude), rng)


__all__ = ["LABEL_STYLES", "REGION_STYLES", "GENERIC", "BROADER", "label_prompts", "region_text", "related_findings",
           "attribute_negative", "hard_negative", "attribute_negative_options",
           "hard_negative_options"]

"""The chest radiograph finding knowledge base: loading, validation, lookup and rule-based text edits.

`findings.json` (shipped with the package) holds one entry per finding: definition, radiographic
signs, the Chest ImaGenome regions where it is usually described, synonyms, subtypes and negated
forms. It is validated when loaded, so a typo in a region or a synonym claimed by two findings
fails at start-up, naming the file, the finding and the value, instead of silently weakening the
text the model trains on.

Text helpers (`find_mentions`, `negate`, `rephrase`) are deterministic rules over word-boundary,
longest-first matches of every name, synonym and subtype (and their plurals).

Held-out wordings (`eval_synonyms` per finding, top-level `eval_templates`) exist for evaluation
only: zero-shot scoring with wording that no training text uses. They are kept apart from the
forms above (never matched, never written by `rephrase` or the prompt builders), and a held-out
wording that contains a form is refused at load time, since it would not be held out.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import json
import os
import re
import string
import types
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

from avlm_jax import anatomy

NO_FINDING = "no finding"  # the one finding without regions or negations
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "findings.json")

_REQUIRED_FIELDS = ("name", "definition", "signs", "regions", "synonyms", "negations", "lateral",
                    "chexpert")
_OPTIONAL_FIELDS = ("subtypes", "textual_name", "eval_synonyms")
_TOP_REQUIRED = ("version", "schema", "findings")
_TOP_OPTIONAL = ("normal_statements", "ignore_terms", "eval_templates")
_EVAL_TEMPLATE_KEYS = ("image", "region")
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+")


@dataclasses.dataclass(frozen=True)
class Finding:
  """One finding of the knowledge base (see the "schema" entry of findings.json)."""
  name: str
  definition: str
  signs: tuple[str, ...]
  regions: tuple[str, ...]
  synonyms: tuple[str, ...]
  negations: tuple[str, ...]
  lateral: bool
  chexpert: bool
  subtypes: tuple[str, ...] = ()
  textual_name: bool = True
  eval_synonyms: tuple[str, ...] = ()  # held-out wordings: evaluation only, never in training text

  @property
  def text_forms(self) -> tuple[str, ...]:
    """Wordings that may be written into a sentence in place of each other (name first)."""
    return ((self.name,) if self.textual_name else ()) + self.synonyms

  @property
  def display_name(self) -> str:
    """The name to show in generated text ('pleural other' is a label, not report wording)."""
    return self.text_forms[0]


class Mention(NamedTuple):
  start: int
  end: int
  finding: str | None  # canonical name; None for an ignore_term ('pericardial effusion')
  form: str  # the singular form that matched (lower case)
  kind: str  # 'name', 'synonym', 'subtype' or 'ignore'
  plural: bool


def _norm(text: str) -> str:
  return " ".join(str(text).lower().split())


def _plural_variants(form: str) -> set[str]:
  """Plurals a report may use ('effusions', 'opacities', 'pneumothoraces', 'masses')."""
  out = {form + "s"}
  if form.endswith(("s", "x", "z", "ch", "sh")):
    out.add(form + "es")
  if form.endswith("y") and form[-2:-1] not in "aeiou":
    out.add(form[:-1] + "ies")
  if form.endswith("x"):
    out.add(form[:-1] + "ces")
  if form.endswith("is"):
    out.add(form[:-2] + "es")
  return out


def _pluralize(form: str) -> str:
  if form.endswith("s"):
    return form  # 'atelectasis', 'lines and tubes', 'mass': leave as written
  if form.endswith("thorax"):
    return form[:-1] + "ces"
  if form.endswith(("x", "z", "ch", "sh")):
    return form + "es"
  if form.endswith("y") and form[-2:-1] not in "aeiou":
    return form[:-1] + "ies"
  return form + "s"


# --- negation rules ---------------------------------------------------------------------------
_SEGMENT_SEP = re.compile(r"([.;:](?=\s|$)\s*|,?\s+but\s+|,?\s+however,?\s+)", re.I)
_NEG_BEFORE = re.compile(
    r"(?<![\w-])(?:no|not|without|negative\s+for|free\s+of|absence\s+of|resolution\s+of|"
    r"rule\s+out|ruled\s+out)(?![\w-])", re.I)
_NEG_AFTER = re.compile(
    r"(?<![\w-])(?:(?:is|are|was|were)\s+(?:absent|not\s+\w+)|(?:has|have)\s+resolved|resolved)"
    r"(?![\w-])", re.I)
_EXISTENTIAL = re.compile(
    r"^(?:there\s+(?:is|are|has\s+been|have\s+been|remains?|appears?\s+to\s+be)\s+)?"
    r"(?:(?:(?:radiographic|some)\s+)?(?:evidence|findings|signs)\s+of\s+)?", re.I)
_PREDICATE = re.compile(
    r"\s+(?:(?:is|are|has|have)\s+(?:(?:again|now|also|still|newly)\s+)?(?:been\s+)?"
    r"(?:present|seen|noted|identified|demonstrated|visuali[sz]ed|visible|evident|re-?demonstrated|"
    r"unchanged|stable|increased|decreased|developed|worsened|improved|persisted)"
    r"|persists?|remains?|again\s+seen)$", re.I)
_CONNECTOR = re.compile(
    r"(\s*,?\s*(?:(?:likely|possibly|probably)\s+)?(?:representing|reflecting|due\s+to)\s+"
    r"|\s+(?:which\s+)?(?:may|might|could)\s+(?:represent|reflect|be)\s+"
    r"|\s+(?:concerning|worrisome|suspicious)\s+for\s+|\s+(?:suggestive|indicative)\s+of\s+"
    r"|\s+(?:consistent|compatible)\s+with\s+|\s+as\s+well\s+as\s+|\s+plus\s+"
    r"|\s*,\s*and\s+|\s*,\s*or\s+|\s+and\s+|\s+or\s+|\s+with\s+|\s*,\s*)", re.I)
_AMOUNT = re.compile(
    r"(?<![\w-])(?:an?\s+)?(?:(?:small|moderate|large|trace|minimal)\s+)?(?:amounts?|quantity|volume)"
    r"\s+of\s+", re.I)
_RANGE = re.compile(r"(?<![\w-])(?:small|mild|moderate)(?:\s+to\s+|-to-)(?:moderate|large|severe)"
                    r"(?![\w-])", re.I)
_SIZE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:\s*(?:-|to|x)\s*\d+(?:\.\d+)?)*\s*(?:mm|cm)(?![\w-])", re.I)
# Size, certainty and change words dropped before the negated finding ('small left effusion').
_HEDGES = frozenset("""
a an the some any small smaller tiny trace minimal minimally minor mild mildly moderate moderately
large larger massive severe severely slight slightly possible possibly probable probably likely
suspected questionable presumed borderline subtle early developing new newly increasing increased
decreasing decreased enlarging worsening worsened improving improved persistent persisting stable
unchanged residual recurrent redemonstrated re-demonstrated known again grossly
""".split())
# Words that make the text before a finding a clause ('the left base demonstrates ...'): dropped.
_CLAUSE_WORDS = frozenset("""
is are was were be been being demonstrates demonstrate demonstrated shows show showing shown
reveals reveal revealed has have there which that seen noted in at of within on over from by to
with for consistent compatible suggestive concerning represents representing reflects reflecting
""".split())


# Words that negate() and prompts.py write around the base's own texts.
_GENERATED_WORDS = ("no or at in of involving the is unremarkable abnormal right left basilar apical hilar "
                    "upper mid lung")


class KnowledgeBase:
  """Validated findings with name/synonym lookup, region index and deterministic text rules."""

  def __init__(self, data: Mapping[str, Any], source: str = "<dict>"):
    self.source = source
    if not isinstance(data, Mapping):
      raise ValueError(f"{source}: the knowledge base must be a JSON object, got {type(data).__name__}")
    self._check_keys(data, _TOP_REQUIRED, _TOP_OPTIONAL, "the top level")
    version = data["version"]
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
      raise ValueError(f"{source}: 'version' must be a 'MAJOR.MINOR.PATCH' string, got {version!r}")
    if not isinstance(data["schema"], (str, Mapping)) or not data["schema"]:
      raise ValueError(f"{source}: 'schema' must be a non-empty description (string or object)")
    raw_findings = data["findings"]
    if not isinstance(raw_findings, list) or not raw_findings:
      raise ValueError(f"{source}: 'findings' must be a non-empty list")
    self.version: str = version
    self.findings: tuple[Finding, ...] = tuple(self._parse_finding(i, f) for i, f in enumerate(raw_findings))
    self.names: tuple[str, ...] = tuple(f.name for f in self.findings)
    self._by_name = {f.name: f for f in self.findings}
    self._lookup, self._kinds = self._build_lookup(data.get("ignore_terms", []))
    self._pattern = self._build_pattern()
    self.normal_statements: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
        self._parse_normal_statements(data.get("normal_statements", {})))
    by_region: dict[str, list[Finding]] = {r: [] for r in anatomy.REGION_NAMES}
    for f in self.findings:
      for r in f.regions:
        by_region[r].append(f)
    self._by_region = {r: tuple(fs) for r, fs in by_region.items()}
    self._check_negations()
    self._check_eval_synonyms()
    self.eval_image_templates, self.eval_region_templates = self._parse_eval_templates(
        data.get("eval_templates", {}))

  # --- validation ---------------------------------------------------------------------------
  def _check_keys(self, obj: Mapping, required: Iterable[str], optional: Iterable[str], where: str):
    missing = [k for k in required if k not in obj]
    if missing:
      raise ValueError(f"{self.source}: {where} is missing field(s) {missing}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
      raise ValueError(f"{self.source}: {where} has unknown field(s) {unknown}; "
                       f"allowed: {sorted(set(required) | set(optional))}")

  def _str_list(self, value: Any, where: str, *, lower: bool = False,
                allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or (not value and not allow_empty):
      raise ValueError(f"{self.source}: {where} must be a {'' if allow_empty else 'non-empty '}"
                       f"list of strings, got {value!r}")
    out = []
    for item in value:
      if not isinstance(item, str) or not item.strip():
        raise ValueError(f"{self.source}: {where} holds {item!r}; entries must be non-empty strings")
      if lower and item != _norm(item):
        raise ValueError(f"{self.source}: {where} holds {item!r}; it must be lower case with single "
                         f"spaces ({_norm(item)!r})")
      out.append(item)
    if len(set(out)) != len(out):
      dup = sorted({x for x in out if out.count(x) > 1})
      raise ValueError(f"{self.source}: {where} lists {dup} more than once")
    return tuple(out)

  def _parse_finding(self, index: int, raw: Any) -> Finding:
    if not isinstance(raw, Mapping):
      raise ValueError(f"{self.source}: findings[{index}] must be an object, got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or name != _norm(name):
      raise ValueError(f"{self.source}: findings[{index}] 'name' must be a non-empty lower-case "
                       f"string, got {name!r}")
    where = f"finding {name!r}"
    self._check_keys(raw, _REQUIRED_FIELDS, _OPTIONAL_FIELDS, where)
    definition = raw["definition"]
    if not isinstance(definition, str) or not definition.strip():
      raise ValueError(f"{self.source}: {where} has an empty or non-string 'definition' ({definition!r})")
    if not definition.rstrip().endswith("."):
      raise ValueError(f"{self.source}: {where} 'definition' must end with a full stop: {definition!r}")
    regions = self._str_list(raw["regions"], f"{where} 'regions'", allow_empty=True)
    for r in regions:
      try:
        anatomy.region_id(r)
      except KeyError as e:
        raise ValueError(f"{self.source}: {where} names region {r!r}, which is not a Chest ImaGenome "
                         f"region: {e.args[0]}") from None
    special = name == NO_FINDING
    if special and regions:
      raise ValueError(f"{self.source}: {where} must have no regions, got {list(regions)}")
    if not special and not regions:
      raise ValueError(f"{self.source}: {where} 'regions' is empty; only {NO_FINDING!r} may have none")
    for key in ("lateral", "chexpert", "textual_name"):
      if key in raw and not isinstance(raw[key], bool):
        raise ValueError(f"{self.source}: {where} {key!r} must be true or false, got {raw[key]!r}")
    return Finding(
        name=name, definition=definition.strip(),
        signs=self._str_list(raw["signs"], f"{where} 'signs'"),
        regions=regions,
        synonyms=self._str_list(raw["synonyms"], f"{where} 'synonyms'", lower=True),
        negations=self._str_list(raw["negations"], f"{where} 'negations'", allow_empty=special),
        lateral=raw["lateral"], chexpert=raw["chexpert"],
        subtypes=self._str_list(raw.get("subtypes", []), f"{where} 'subtypes'", lower=True,
                                allow_empty=True),
        textual_name=raw.get("textual_name", True),
        eval_synonyms=self._str_list(raw.get("eval_synonyms", []), f"{where} 'eval_synonyms'", lower=True,
                                     allow_empty=True))

  def _build_lookup(self, ignore_terms: Any):
    """Every (singular and plural) form -> (finding or None, singular form); duplicates are errors."""
    owner: dict[str, tuple[str, str]] = {}  # singular form -> (finding name, field)
    kinds: dict[str, str] = {}
    for f in self.findings:
      entries = ([(f.name, "name")] + [(s, "synonyms") for s in f.synonyms]
                 + [(s, "subtypes") for s in f.subtypes])
      for form, field in entries:
        if form in owner:
          other, other_field = owner[form]
          if other == f.name:
            raise ValueError(f"{self.source}: finding {f.name!r} lists {form!r} twice "
                             f"({other_field} and {field})")
          raise ValueError(f"{self.source}: {form!r} is claimed by finding {other!r} ({other_field}) "
                           f"and by finding {f.name!r} ({field}); a form must belong to one finding")
        owner[form] = (f.name, field)
        kinds[form] = {"name": "name", "synonyms": "synonym", "subtypes": "subtype"}[field]
    for term in self._str_list(ignore_terms, "'ignore_terms'", lower=True, allow_empty=True):
      if term in owner:
        raise ValueError(f"{self.source}: ignore_terms entry {term!r} is also a form of finding "
                         f"{owner[term][0]!r}")
      owner[term] = (None, "ignore_terms")
      kinds[term] = "ignore"
    lookup: dict[str, tuple[str | None, str]] = {form: (fn, form) for form, (fn, _) in owner.items()}
    for form, (fn, _) in owner.items():
      for variant in _plural_variants(form):
        if variant in owner:
          if owner[variant][0] != fn:
            raise ValueError(f"{self.source}: {variant!r} (a form of {owner[variant][0]!r}) is also the "
                             f"plural of {form!r} (a form of {fn!r})")
          continue
        prev = lookup.get(variant)
        if prev is not None and prev[0] != fn:
          raise ValueError(f"{self.source}: {variant!r} is a plural of forms of both {prev[0]!r} and {fn!r}")
        lookup.setdefault(variant, (fn, form))
    return lookup, kinds

  def _build_pattern(self) -> re.Pattern:
    """One regex over every matchable form, longest first, at word boundaries (hyphens included)."""
    forms = [v for v, (fn, form) in self._lookup.items()
             if not (fn is not None and form == fn and not self._by_name[fn].textual_name)]
    forms.sort(key=lambda s: (-len(s), s))
    alternation = "|".join(re.escape(s).replace(r"\ ", r"\s+") for s in forms)
    return re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])", re.I)

  def _parse_normal_statements(self, raw: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
      raise ValueError(f"{self.source}: 'normal_statements' must be an object region -> list of strings")
    out = {}
    for region, statements in raw.items():
      try:
        anatomy.region_id(region)
      except KeyError as e:
        raise ValueError(f"{self.source}: normal_statements names region {region!r}, which is not a "
                         f"Chest ImaGenome region: {e.args[0]}") from None
      out[region] = self._str_list(statements, f"normal_statements[{region!r}]")
      for s in out[region]:
        if self.find_mentions(s):
          raise ValueError(f"{self.source}: normal_statements[{region!r}] entry {s!r} mentions "
                           f"{self.find_mentions(s)}; a normal statement must name no finding")
    return out

  def _check_negations(self) -> None:
    for f in self.findings:
      for neg in f.negations:
        mentions = [m for m in self.mentions(neg) if m.finding is not None]
        others = sorted({m.finding for m in mentions} - {f.name})
        if others:
          raise ValueError(f"{self.source}: finding {f.name!r} negation {neg!r} mentions other "
                           f"finding(s) {others}")
        if f.lateral and not (mentions and mentions[-1].end == len(neg.rstrip(" ."))):
          raise ValueError(f"{self.source}: finding {f.name!r} is lateral, so negation {neg!r} must end "
                           f"with one of its forms (a location is appended to it)")

  def _check_eval_synonyms(self) -> None:
    """A held-out wording must be new text: no form of any finding inside it (else the model
    could match the form it trained on), and owned by one finding."""
    owner: dict[str, str] = {}
    for f in self.findings:
      for s in f.eval_synonyms:
        hits = [(m.form, m.finding or "ignore_terms") for m in self.mentions(s)]
        if not hits and s in self._lookup:  # mentions() skips label-only names ('pleural other')
          hits = [(self._lookup[s][1], self._lookup[s][0])]
        if hits:
          raise ValueError(f"{self.source}: finding {f.name!r} eval_synonyms entry {s!r} contains "
                           f"{hits[0][0]!r} (a training wording of {hits[0][1]!r}); a held-out "
                           f"wording must contain no name, synonym, subtype or ignore term")
        if s in owner:
          raise ValueError(f"{self.source}: eval synonym {s!r} is listed by finding {owner[s]!r} and "
                           f"by finding {f.name!r}; it must belong to one finding")
        owner[s] = f.name

  def _template(self, template: Any, fields: set[str], where: str) -> str:
    if not isinstance(template, str) or not template.strip():
      raise ValueError(f"{self.source}: {where} must be a non-empty string, got {template!r}")
    try:
      found = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
      raise ValueError(f"{self.source}: {where} {template!r} is not a format string ({e})") from None
    if sorted(found) != sorted(fields):
      raise ValueError(f"{self.source}: {where} {template!r} must hold each of "
                       f"{['{' + x + '}' for x in sorted(fields)]} once and no other field; it has {found}")
    literal = template.format(**{x: " " for x in fields})
    hits = self.mentions(literal)
    if hits:
      raise ValueError(f"{self.source}: {where} {template!r} contains {hits[0].form!r}, a training "
                       f"wording; a held-out template must name no finding")
    return template

  def _parse_eval_templates(self, raw: Any) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    if not isinstance(raw, Mapping):
      raise ValueError(f"{self.source}: 'eval_templates' must be an object with keys "
                       f"{list(_EVAL_TEMPLATE_KEYS)}, got {raw!r}")
    self._check_keys(raw, (), _EVAL_TEMPLATE_KEYS, "'eval_templates'")
    image = tuple(self._template(t, {"name"}, f"eval_templates['image'][{i}]")
                  for i, t in enumerate(self._str_list(raw.get("image", []), "eval_templates['image']",
                                                       allow_empty=True)))
    region = []
    pairs = raw.get("region", [])
    if not isinstance(pairs, list):
      raise ValueError(f"{self.source}: eval_templates['region'] must be a list of "
                       f"{{positive, negative}} objects, got {pairs!r}")
    for i, pair in enumerate(pairs):
      where = f"eval_templates['region'][{i}]"
      if not isinstance(pair, Mapping):
        raise ValueError(f"{self.source}: {where} must be an object {{positive, negative}}, got {pair!r}")
      self._check_keys(pair, ("positive", "negative"), (), where)
      pos = self._template(pair["positive"], {"finding", "region"}, f"{where} 'positive'")
      neg = self._template(pair["negative"], {"finding", "region"}, f"{where} 'negative'")
      if pos == neg:
        raise ValueError(f"{self.source}: {where} has the same positive and negative template {pos!r}")
      region.append((pos, neg))
    return image, tuple(region)

  # --- lookup -------------------------------------------------------------------------------
  def __contains__(self, name_or_synonym: object) -> bool:
    return isinstance(name_or_synonym, str) and self._resolve(name_or_synonym) is not None

  def __iter__(self):
    return iter(self.findings)

  def __len__(self) -> int:
    return len(self.findings)

  def _resolve(self, value: str) -> Finding | None:
    hit = self._lookup.get(_norm(value))
    return None if hit is None or hit[0] is None else self._by_name[hit[0]]

  def suggestions(self, value: str, n: int = 3) -> list[str]:
    """Known names/synonyms/subtypes closest to `value` (for error messages)."""
    known = [form for form, (fn, base) in self._lookup.items() if fn is not None and form == base]
    return difflib.get_close_matches(_norm(value), known, n=n, cutoff=0.6)

  def get(self, name_or_synonym: str) -> Finding:
    """The finding named by a canonical name, synonym or subtype (case-insensitive, plurals ok)."""
    found = self._resolve(name_or_synonym) if isinstance(name_or_synonym, str) else None
    if found is None:
      close = self.suggestions(str(name_or_synonym))
      hint = f" Did you mean {close}?" if close else ""
      raise KeyError(f"unknown finding {name_or_synonym!r} in knowledge base {self.source} "
                     f"(v{self.version}).{hint} Known findings: {list(self.names)}")
    return found

  def canonical(self, name_or_synonym: str) -> str:
    return self.get(name_or_synonym).name

  def findings_for_region(self, region_name: str) -> tuple[Finding, ...]:
    """Findings whose typical regions include `region_name` (KeyError for an unknown region)."""
    anatomy.region_id(region_name)
    return self._by_region[region_name]

  # --- text ---------------------------------------------------------------------------------
  def mentions(self, text: str) -> list[Mention]:
    """All non-overlapping, longest-first, word-boundary mentions in `text` (ignore_terms too)."""
    out = []
    for m in self._pattern.finditer(text):
      variant = _norm(m.group(0))
      finding, form = self._lookup[variant]
      out.append(Mention(m.start(), m.end(), finding, form, self._kinds[form], variant != form))
    return out

  def find_mentions(self, text: str) -> list[str]:
    """Canonical names of the findings mentioned in `text`, in order of first mention."""
    return list(dict.fromkeys(m.finding for m in self.mentions(text) if m.finding is not None))

  def positive_findings(self, text: str) -> list[str]:
    """Canonical names of the findings `text` states as present (negated mentions left out),
    sentence by sentence, in order of first mention."""
    out = []
    for segment in re.split(r"[.;\n]+", text):
      out += [m.finding for m in self._positive(segment)]
    return list(dict.fromkeys(out))

  def _positive(self, segment: str) -> list[Mention]:
    """Mentions of real findings that no negation cue in the segment applies to."""
    out = []
    for m in self.mentions(segment):
      if m.finding is None or m.finding == NO_FINDING:
        continue
      if _NEG_BEFORE.search(segment, 0, m.start) or _NEG_AFTER.search(segment, m.end):
        continue
      out.append(m)
    return out

  def negate(self, text: str) -> str | None:
    """A negated version of a positive finding statement that still names the finding.

    'small left pleural effusion' -> 'no left pleural effusion'; 'right basilar opacity and
    cardiomegaly' -> 'no right basilar opacity or cardiomegaly'. Size, certainty and change words
    before a finding are dropped, the location is kept. Sentences are handled one by one; a
    sentence that is already negative, or names no finding, is kept as written. None when `text`
    names no finding at all (other than 'no finding').
    """
    parts = _SEGMENT_SEP.split(text)
    changed, any_finding = False, False
    for i in range(0, len(parts), 2):
      if any(m.finding not in (None, NO_FINDING) for m in self.mentions(parts[i])):
        any_finding = True
      negated = self._negate_segment(parts[i])
      if negated is not None:
        parts[i], changed = negated, True
    if not any_finding:
      return None
    return "".join(parts) if changed else text

  def _negate_segment(self, segment: str) -> str | None:
    if not self._positive(segment):
      return None
    lead = segment[:len(segment) - len(segment.lstrip())]
    s = " ".join(segment.split())
    capital = s[:1].isupper()
    s = _EXISTENTIAL.sub("", s, count=1)
    s = _PREDICATE.sub("", s)
    pieces = self._split_pieces(s)  # [piece, connector, piece, ...]
    out: list[str] = []
    for j in range(0, len(pieces), 2):
      piece = pieces[j]
      positive = self._positive(piece)
      if not out:
        if positive:
          out.append(self._trim_prefix(piece, positive[0].start))
        continue  # text before the first finding cannot follow 'no': dropped
      if positive:
        out += [" or ", self._trim_prefix(piece, positive[0].start)]
      else:
        out += [pieces[j - 1], piece]
    body = "".join(out).strip()
    if capital and body[:1].isupper() and not body[1:2].isupper():
      body = body[0].lower() + body[1:]
    return lead + ("No " if capital else "no ") + body

  def _split_pieces(self, s: str) -> list[str]:
    """`s` split at connectors ('and', 'with', 'consistent with', ...) that are not inside a
    mention ('lines and tubes'), keeping the connectors: [piece, connector, piece, ...]."""
    spans = [(m.start, m.end) for m in self.mentions(s)]
    out, last = [], 0
    for c in _CONNECTOR.finditer(s):
      if c.start() < last or any(a < c.end() and c.start() < b for a, b in spans):
        continue
      out += [s[last:c.start()], c.group(0)]
      last = c.end()
    return out + [s[last:]]

  @staticmethod
  def _trim_prefix(piece: str, start: int) -> str:
    prefix, rest = piece[:start], piece[start:]
    prefix = _SIZE.sub(" ", _RANGE.sub(" ", _AMOUNT.sub(" ", prefix)))
    words = prefix.split()
    if any(w.lower().strip(",") in _CLAUSE_WORDS for w in words):
      words = []
    words = [w for w in words if w.lower().strip(",") not in _HEDGES]
    return " ".join(words + [rest.strip()])

  def _rephrase_slots(self, text: str) -> list[tuple[int, int, list[str]]]:
    """(start, end, replacements) for each mention `rephrase` replaces, the replacements written
    as they would stand in `text` (plural and capital kept). Held-out wordings are not forms, so
    they are never among them."""
    slots = []
    for m in self.mentions(text):
      if m.finding is None or m.kind == "subtype":
        continue
      options = [t for t in self._by_name[m.finding].text_forms if t != m.form]
      if not options:
        continue
      if m.plural:
        options = [_pluralize(o) for o in options]
      if text[m.start:m.start + 1].isupper():
        options = [o[0].upper() + o[1:] for o in options]
      slots.append((m.start, m.end, options))
    return slots

  def rephrase(self, text: str, rng: np.random.Generator) -> str:
    """`text` with each name/synonym mention replaced by another wording of the same finding.

    The rest of the text (location, size, negation) is kept; subtype mentions ('endotracheal
    tube') are kept as written, since no wording of the KB is as specific. Replacements are drawn
    from `rng` left to right; unchanged text when nothing is recognised.
    """
    if not isinstance(rng, np.random.Generator):
      raise TypeError(f"rephrase needs a numpy Generator (np.random.default_rng(seed)), "
                      f"got {type(rng).__name__}")
    out, last = [], 0
    for start, end, options in self._rephrase_slots(text):
      out += [text[last:start], options[int(rng.integers(len(options)))]]
      last = end
    return "".join(out) + text[last:]

  def rephrasings(self, text: str) -> list[str]:
    """Every text `rephrase(text, rng)` can return, whatever the generator (so a test can bound
    the training texts exactly); `[text]` when nothing is rephrased."""
    slots = self._rephrase_slots(text)
    out = []
    for choice in itertools.product(*(options for _, _, options in slots)):
      pieces, last = [], 0
      for (start, end, _), new in zip(slots, choice):
        pieces += [text[last:start], new]
        last = end
      out.append("".join(pieces) + text[last:])
    return out

  # --- held-out evaluation wordings -------------------------------------------------------------
  def _eval_synonyms(self, name: str) -> tuple[str, ...]:
    f = self.get(name)
    if not f.eval_synonyms:
      raise ValueError(f"finding {f.name!r} has no eval_synonyms in knowledge base {self.source} "
                       f"(v{self.version}): its held-out wording cannot be scored")
    return f.eval_synonyms

  def heldout_label_prompts(self, name: str) -> tuple[str, ...]:
    """The held-out image-level prompts of a finding: every eval image template filled with
    every eval synonym (an ensemble, as CLIP's prompt ensembles)."""
    if not self.eval_image_templates:
      raise ValueError(f"knowledge base {self.source} (v{self.version}) has no eval_templates['image']")
    synonyms = self._eval_synonyms(name)
    return tuple(t.format(name=s) for t in self.eval_image_templates for s in synonyms)

  def heldout_region_texts(self, name: str, region: str) -> tuple[tuple[str, str], ...]:
    """(positive, negative) held-out statements of a finding in a region: every eval region
    template pair filled with every eval synonym."""
    anatomy.region_id(region)
    if not self.eval_region_templates:
      raise ValueError(f"knowledge base {self.source} (v{self.version}) has no eval_templates['region']")
    synonyms = self._eval_synonyms(name)
    return tuple((pos.format(finding=s, region=region), neg.format(finding=s, region=region))
                 for pos, neg in self.eval_region_templates for s in synonyms)

  def vocabulary_texts(self) -> list[str]:
    """Every text of the base plus the words that negate() and the prompt builders add, so a
    tokenizer vocabulary built from them covers every generated region text."""
    texts = [self.version, _GENERATED_WORDS]
    for f in self.findings:
      texts += [f.name, f.definition, *f.signs, *f.synonyms, *f.subtypes, *f.negations, *f.regions]
      texts += [_pluralize(t) for t in f.text_forms]
    for statements in self.normal_statements.values():
      texts += statements
    return texts

  def __repr__(self) -> str:
    return f"KnowledgeBase({self.source!r}, version={self.version!r}, {len(self.findings)} findings)"


def load_knowledge_base(path: str | os.PathLike | None = None) -> KnowledgeBase:
  """The knowledge base in `path` (default: the packaged findings.json), cached per file version."""
  path = os.path.abspath(os.fspath(path if path is not None else DEFAULT_PATH))
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"knowledge base file {path!r} does not exist") from None
  return _load(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> KnowledgeBase:
  del mtime_ns, size  # cache keys only: an edited file is read again
  with open(path, encoding="utf-8") as fh:
    try:
      data = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  return KnowledgeBase(data, source=path)

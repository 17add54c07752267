"""Radiology-style reports for SynthCXR, written from the phrasing bank the knowledge base shares.

A report has FINDINGS (one sentence per rendered finding, a random subset of negated absent
findings, normal statements that no finding contradicts) and IMPRESSION. Each positive sentence
is also the phrase of every region its finding is bound to; negated and normal statements go to
their own regions, so region phrases are Chest ImaGenome-like. Wording, order and the subset of
negations vary per study, so a model cannot key on one template string.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np

from avlm_jax import anatomy
from data_pipelines.synthcxr.findings import FINDINGS, FindingSpec

PHRASES_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "avlm_jax", "knowledge", "report_phrases.json")


@functools.lru_cache(maxsize=4)
def load_phrases(path: str = PHRASES_PATH) -> dict:
  """The phrasing bank, checked: every finding present, every region a known region name."""
  try:
    with open(path) as f:
      bank = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the report phrasing bank ({e})") from e
  missing = [f for f in FINDINGS if f not in bank.get("findings", {})]
  if missing:
    raise ValueError(f"{path}: no phrasings for findings {missing}")
  for name, entry in list(bank["findings"].items()) + list(bank["normal"].items()):
    for region in entry.get("negative_regions", []) + entry.get("regions", []):
      anatomy.region_id(region)  # raises, naming the region and close matches
    for key in ("positive", "negative", "impression", "text"):
      if key in entry and not entry[key]:
        raise ValueError(f"{path}: {name!r} has an empty {key!r} list")
  return bank


@dataclasses.dataclass
class Report:
  text: str
  phrases: list[str]       # 29 region phrases ("" where none)
  negated: list[str]       # findings stated as absent


def _fill(template: str, spec: FindingSpec, bank: dict, rng: np.random.Generator) -> str:
  zone = str(rng.choice(bank["zone_words"][spec.zone])) if spec.zone else ""
  sev = bank["severity_words"].get(spec.severity)
  size = f"{spec.size_mm / 10:.1f} cm" if spec.size_mm else ""
  return " ".join(template.format(side=spec.side, zone=zone, location=spec.location or "",
                                  severity=str(rng.choice(sev)) if sev else "", size=size).split())


def _sentence(text: str) -> str:
  return text[0].upper() + text[1:] + "."


def write_report(specs: list[FindingSpec], rng: np.random.Generator, negate_prob: float = 0.6) -> Report:
  bank = load_phrases()
  phrases: list[list[str]] = [[] for _ in range(anatomy.NUM_REGIONS)]
  sentences: list[str] = []
  for spec in specs:
    text = _fill(str(rng.choice(bank["findings"][spec.name]["positive"])), spec, bank, rng)
    sentences.append(text)
    for region in spec.regions():
      phrases[anatomy.region_id(region)].append(text)
  present = {s.name for s in specs}
  negated = []
  for name in FINDINGS:
    if name not in present and rng.random() < negate_prob:
      entry = bank["findings"][name]
      text = str(rng.choice(entry["negative"]))
      negated.append(name)
      sentences.append(text)
      for region in entry["negative_regions"]:
        phrases[anatomy.region_id(region)].append(text)
  for entry in bank["normal"].values():
    if not present & set(entry["unless"]) and rng.random() < 0.7:
      text = str(rng.choice(entry["text"]))
      sentences.append(text)
      for region in entry["regions"]:
        phrases[anatomy.region_id(region)].append(text)
  # Positive findings first (as radiologists dictate), the rest shuffled.
  head, tail = sentences[:len(specs)], sentences[len(specs):]
  tail = [tail[i] for i in rng.permutation(len(tail))]
  if specs:
    impression = " ".join(_sentence(_fill(str(rng.choice(bank["findings"][s.name]["impression"])), s, bank, rng))
                          for s in specs)
  else:
    impression = _sentence(str(rng.choice(bank["no_finding_impression"])))
  text = "FINDINGS: " + " ".join(_sentence(s) for s in head + tail) + "\n\nIMPRESSION: " + impression
  return Report(text=text, phrases=[" ".join(_sentence(p) for p in ps) if ps else "" for ps in phrases],
                negated=negated)


def vocabulary_texts() -> list[str]:
  """Every word the bank can write (for a corpus tokenizer)."""
  bank = load_phrases()
  texts = ["findings: impression: right left bilateral apical lateral cm"]
  for group in ("zone_words", "severity_words"):
    texts += [w for ws in bank[group].values() for w in ws]
  for entry in bank["findings"].values():
    texts += entry["positive"] + entry["negative"] + entry["impression"]
  texts += [t for entry in bank["normal"].values() for t in entry["text"]] + bank["no_finding_impression"]
  return [t.replace("{", " ").replace("}", " ") for t in texts] + [str(d) for d in range(10)]

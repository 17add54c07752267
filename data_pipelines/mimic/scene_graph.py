"""One Chest ImaGenome scene graph (`<dicom_id>_SceneGraph.json`) -> boxes, region phrases, labels.

The fields read (names and nesting as published):

    {"image_id": <dicom_id>, "study_id": ..., "patient_id": ...,
     "objects": [{"bbox_name": "right lung", "original_x1": .., "original_y1": .., "original_x2": ..,
                  "original_y2": .., "x1": .., ... (on the 224-px resize; not used)}, ...],
     "attributes": [{"bbox_name": "right lung",
                     "phrases": ["Right lung is clear.", ...],                # one per sentence
                     "attributes": [["anatomicalfinding|no|lung opacity", "nlp|yes|normal"], ...],
                     ...}, ...]}

`attributes[i].attributes[j]` holds the triples of `phrases[j]`. Boxes are in pixels of the
original (full-size) image. Objects name 36 regions; the model uses 29 (`avlm_jax.anatomy`), the 7
others ('left cardiac silhouette', 'descending aorta', ...) are known and left out. Attribute
entries may name places that have no box ('left chest wall', 'right breast'): their findings
still count for the image, their phrases go nowhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re

import numpy as np

from avlm_jax import anatomy
from data_pipelines.mimic import bad_input, labels

# Objects of ImaGenome scene graphs that are not among the model's 29 regions.
EXTRA_OBJECT_NAMES = ("right cardiophrenic angle", "left cardiophrenic angle", "left cardiac silhouette",
                      "right cardiac silhouette", "descending aorta", "left upper abdomen", "right upper abdomen")
OBJECT_NAMES = frozenset(anatomy.REGION_NAMES) | frozenset(EXTRA_OBJECT_NAMES)
_COORDS = ("original_x1", "original_y1", "original_x2", "original_y2")
_RELATIONS = ("yes", "no")
_SPACE = re.compile(r"\s+")
_SENTENCE_END = (".", "!", "?", ";")


@dataclasses.dataclass
class SceneGraph:
  boxes: np.ndarray            # (29, 4) float64 xyxy in original-image pixels; NaN rows: no object
  phrases: list[str]           # 29 cleaned, de-duplicated phrase texts; "" where none
  findings: list[str]          # positive image-level labels, in label-set order
  region_findings: list[list[str]]  # 29 sorted lists of positive ImaGenome names (+ 'abnormal')
  regions_missing: int         # of the 29, how many have no object


def _malformed(path: str, detail: str) -> bad_input.BadInput:
  return bad_input.BadInput(bad_input.MALFORMED_SCENE_GRAPH, path, detail)


def clean_phrase(text: str) -> str:
  """Whitespace (newlines included) collapsed, ends trimmed, a sentence stop added if there is none
  (the text sampler splits region texts at stops)."""
  text = _SPACE.sub(" ", text).strip()
  if text and not text.endswith(_SENTENCE_END):
    text += "."
  return text


def join_phrases(phrases: list[str]) -> str:
  """Cleaned phrases, duplicates (equal up to case and whitespace) dropped, first occurrence kept."""
  seen, kept = set(), []
  for p in map(clean_phrase, phrases):
    key = p.lower()
    if p and key not in seen:
      seen.add(key)
      kept.append(p)
  return " ".join(kept)


def parse_triple(raw, path: str) -> tuple[str, str, str]:
  """'category|relation|name' -> its three parts; MALFORMED_SCENE_GRAPH otherwise."""
  parts = raw.split("|") if isinstance(raw, str) else []
  if len(parts) != 3 or not all(p.strip() for p in parts) or parts[1] not in _RELATIONS:
    raise _malformed(path, f"attribute {raw!r} is not 'category|yes/no|name'")
  return parts[0].strip(), parts[1], parts[2].strip()


def _box(obj: dict, path: str) -> tuple[float, float, float, float]:
  values = []
  for key in _COORDS:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise _malformed(path, f"object {obj.get('bbox_name')!r} has {key}={v!r}, expected a finite number")
    values.append(float(v))
  return tuple(values)


def load(path: str, dicom_id: str) -> dict:
  """The JSON of one scene graph, checked to be a graph of `dicom_id`."""
  try:
    with open(path, "rb") as f:
      graph = json.loads(f.read())
  except FileNotFoundError:
    raise bad_input.BadInput(bad_input.MISSING_SCENE_GRAPH, path, "scene graph file does not exist") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _malformed(path, f"not valid JSON ({e})") from None
  if not isinstance(graph, dict):
    raise _malformed(path, f"top level is a {type(graph).__name__}, expected an object")
  for key in ("objects", "attributes"):
    if not isinstance(graph.get(key), list):
      raise _malformed(path, f"{key!r} is missing or not a list")
  if "image_id" in graph and str(graph["image_id"]) != dicom_id:
    raise _malformed(path, f"image_id {graph['image_id']!r} does not match the file's dicom_id {dicom_id!r}")
  return graph


def parse(graph: dict, path: str, label_set: tuple[str, ...] = labels.IMAGENOME_LABELS) -> SceneGraph:
  r = anatomy.NUM_REGIONS
  boxes = np.full((r, 4), np.nan)
  for obj in graph["objects"]:
    if not isinstance(obj, dict):
      raise _malformed(path, f"an entry of 'objects' is a {type(obj).__name__}, expected an object")
    name = obj.get("bbox_name")
    if name not in OBJECT_NAMES:
      close = difflib.get_close_matches(str(name), sorted(OBJECT_NAMES), n=2)
      raise bad_input.BadInput(bad_input.UNKNOWN_REGION, path, f"object bbox_name {name!r} is not a Chest "
                               f"ImaGenome region" + (f" (close: {close})" if close else ""))
    if name not in anatomy.REGION_NAMES:
      continue
    i = anatomy.region_id(name)
    if not np.isnan(boxes[i, 0]):
      raise _malformed(path, f"region {name!r} has two objects")
    boxes[i] = _box(obj, path)

  sources = labels.label_by_source(label_set)
  positive_labels: set[str] = set()
  region_phrases: list[list[str]] = [[] for _ in range(r)]
  region_findings: list[set[str]] = [set() for _ in range(r)]
  for entry in graph["attributes"]:
    if not isinstance(entry, dict) or not isinstance(entry.get("bbox_name"), str):
      raise _malformed(path, f"an entry of 'attributes' lacks a string 'bbox_name': {str(entry)[:80]}")
    phrases, per_phrase = entry.get("phrases", []), entry.get("attributes", [])
    if isinstance(phrases, str):  # a single sentence written without its list
      phrases = [phrases]
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
      raise _malformed(path, f"attributes of {entry['bbox_name']!r}: 'phrases' must be a list of strings")
    if not isinstance(per_phrase, list) or not all(isinstance(a, list) for a in per_phrase):
      raise _malformed(path, f"attributes of {entry['bbox_name']!r}: 'attributes' must be a list of lists")
    region = entry["bbox_name"]
    i = anatomy.REGION_NAMES.index(region) if region in anatomy.REGION_NAMES else None
    if i is not None:
      region_phrases[i].extend(phrases)
    for triple in (t for group in per_phrase for t in group):
      category, relation, name = parse_triple(triple, path)
      if relation != "yes":
        continue
      positive_labels.update(sources.get(name, ()))
      if i is not None:
        if category == labels.NLP_CATEGORY:
          if name == labels.ABNORMAL:
            region_findings[i].add(labels.ABNORMAL)
        else:
          region_findings[i].add(name)
  return SceneGraph(
      boxes=boxes,
      phrases=[join_phrases(p) for p in region_phrases],
      findings=[l for l in label_set if l in positive_labels],
      region_findings=[sorted(f) for f in region_findings],
      regions_missing=int(np.isnan(boxes[:, 0]).sum()))

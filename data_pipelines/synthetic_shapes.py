"""The built-in synthetic corpus: drawn chest-like images with exact boxes, phrases and labels.

Deliberately simple (ellipses, bars and blobs), it exists so that the whole system trains and is
tested without any download; SynthCXR (DRRs from a real CT) is the realistic corpus. Every
record is a pure function of `(seed, split, index)`, so a folder is reproducible bit for bit.

Geometry is in normalised image coordinates; patient right is image left (PA view).
Records also carry exact `region_findings` (each finding in the region it was drawn in) and
`heart`, `right lung` and `left lung` masks (the drawn ellipses) for the evaluators.
"""

from __future__ import annotations

import io
import os
from typing import Iterator

import numpy as np
from PIL import Image

from avlm_jax import anatomy
from avlm_jax.knowledge.base import load_knowledge_base
from avlm_jax.tokenizer import build_wordpiece_tokenizer
from data_pipelines import schema

FINDINGS = ("lung opacity", "nodule", "pleural effusion", "pneumothorax", "cardiomegaly")

# Several phrasings per finding: a model must not key on one template string.
_PHRASINGS = {
    "lung opacity": ("opacity in the {r}", "patchy opacity at the {r}", "{r} airspace opacity",
                     "hazy opacification of the {r}"),
    "nodule": ("nodule in the {r}", "small nodular density in the {r}", "{r} nodule"),
    "pleural effusion": ("blunting of the {r}", "{side} pleural effusion", "fluid layering at the {r}"),
    "pneumothorax": ("{side} apical pneumothorax", "lucency without lung markings at the {r}",
                     "visible pleural line at the {r}"),
    "cardiomegaly": ("the heart is enlarged", "cardiomegaly", "enlarged cardiac silhouette"),
}
_NORMAL_PHRASES = {
    "right lung": "the right lung is clear", "left lung": "the left lung is clear",
    "cardiac silhouette": "heart size is normal", "mediastinum": "mediastinal contours are normal",
    "right costophrenic angle": "the right costophrenic angle is sharp",
    "left costophrenic angle": "the left costophrenic angle is sharp",
}
_NEGATIONS = {
    "lung opacity": "no focal consolidation", "nodule": "no pulmonary nodule",
    "pleural effusion": "no pleural effusion", "pneumothorax": "no pneumothorax",
    "cardiomegaly": "heart size is normal",
}


def _all_texts() -> list[str]:
  """Every word the generator can write (for the tokenizer's vocabulary)."""
  texts = list(_NORMAL_PHRASES.values()) + list(_NEGATIONS.values()) + list(FINDINGS)
  for variants in _PHRASINGS.values():
    for v in variants:
      for r in anatomy.REGION_NAMES:
        texts.append(v.format(r=r, side="right") + " " + v.format(r=r, side="left"))
  texts += ["findings:", "impression:", "no acute cardiopulmonary process", "chest radiograph showing"]
  # The knowledge base's wordings too: sampled negatives, synonyms and label prompts use them.
  return texts + load_knowledge_base().vocabulary_texts()


def _layout(rng: np.random.Generator, cardiomegaly: bool) -> dict[str, np.ndarray]:
  """Normalised xyxy boxes of the 29 regions plus the drawn structures, with random jitter."""
  j = lambda s=0.02: rng.uniform(-s, s)
  mid = 0.5 + j(0.03)
  top, bottom = 0.12 + j(), 0.78 + j()
  lungs = {
      "right": np.array([0.12 + j(), top + j(0.01), mid - 0.06 + j(0.01), bottom + j(0.01)]),
      "left": np.array([mid + 0.06 + j(0.01), top + j(0.01), 0.88 + j(), bottom - 0.03 + j(0.01)]),
  }
  hw = (0.21 if cardiomegaly else 0.14) + j(0.015)
  hcx, hcy, hh = mid + 0.04 + j(0.01), 0.62 + j(0.02), 0.11 + j(0.01)
  heart = np.array([hcx - hw, hcy - hh, hcx + hw, hcy + hh])
  boxes: dict[str, np.ndarray] = {}
  for side, (x1, y1, x2, y2) in lungs.items():
    w, h = x2 - x1, y2 - y1
    lateral_left = side == "right"  # the right lung's lateral edge is on the image left
    boxes[f"{side} lung"] = np.array([x1, y1, x2, y2])
    for k, zone in enumerate(("upper", "mid", "lower")):
      boxes[f"{side} {zone} lung zone"] = np.array([x1, y1 + k * h / 3, x2, y1 + (k + 1) * h / 3])
    boxes[f"{side} apical zone"] = np.array([x1, y1, x2, y1 + h / 6])
    hx1, hx2 = (x1 + 0.55 * w, x2) if lateral_left else (x1, x1 + 0.45 * w)
    boxes[f"{side} hilar structures"] = np.array([hx1, y1 + 0.35 * h, hx2, y1 + 0.6 * h])
    cx1, cx2 = (x1, x1 + 0.3 * w) if lateral_left else (x2 - 0.3 * w, x2)
    boxes[f"{side} costophrenic angle"] = np.array([cx1, y2 - 0.15 * h, cx2, y2])
    boxes[f"{side} hemidiaphragm"] = np.array([x1, y2 - 0.06, x2, y2 + 0.04])
  boxes["trachea"] = np.array([mid - 0.025, 0.04, mid + 0.025, 0.36])
  boxes["spine"] = np.array([mid - 0.04, 0.0, mid + 0.04, 1.0])
  boxes["right clavicle"] = np.array([0.14 + j(), 0.1 + j(0.01), mid - 0.03, 0.16 + j(0.01)])
  boxes["left clavicle"] = np.array([mid + 0.03, 0.1 + j(0.01), 0.86 + j(), 0.16 + j(0.01)])
  boxes["aortic arch"] = np.array([mid + 0.01, 0.28, mid + 0.1, 0.37])
  boxes["mediastinum"] = np.array([mid - 0.1, top, mid + 0.12, bottom])
  boxes["upper mediastinum"] = np.array([mid - 0.1, top, mid + 0.12, 0.42])
  boxes["svc"] = np.array([mid - 0.08, 0.2, mid - 0.02, 0.46])
  boxes["cardiac silhouette"] = heart
  boxes["cavoatrial junction"] = np.array([heart[0] - 0.02, heart[1] - 0.03, heart[0] + 0.05, heart[1] + 0.04])
  boxes["right atrium"] = np.array([heart[0], heart[1] + 0.02, heart[0] + (heart[2] - heart[0]) / 3, heart[3]])
  boxes["carina"] = np.array([mid - 0.04, 0.34, mid + 0.04, 0.4])
  boxes["abdomen"] = np.array([0.1, bottom + 0.04, 0.9, 1.0])
  assert set(boxes) == set(anatomy.REGION_NAMES)
  return {"boxes": np.stack([np.clip(boxes[n], 0, 1) for n in anatomy.REGION_NAMES]),
          "mid": np.array(mid), "heart": heart, **{f"lung_{s}": b for s, b in lungs.items()}}


def _ellipse_mask(h: int, w: int, box: np.ndarray) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w]
  cx, cy = (box[0] + box[2]) / 2 * w, (box[1] + box[3]) / 2 * h
  rx, ry = max((box[2] - box[0]) / 2 * w, 0.5), max((box[3] - box[1]) / 2 * h, 0.5)
  return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0


def _rect_mask(h: int, w: int, box: np.ndarray) -> np.ndarray:
  m = np.zeros((h, w), bool)
  m[int(box[1] * h):max(int(np.ceil(box[3] * h)), int(box[1] * h) + 1),
    int(box[0] * w):max(int(np.ceil(box[2] * w)), int(box[0] * w) + 1)] = True
  return m


def make_triple(seed: int, split: str, index: int, image_size: int = 64, p_normal: float = 0.4,
                p_absent: float = 0.03) -> schema.Triple:
  split_code = {"train": 0, "validation": 1, "test": 2}[split]
  rng = np.random.default_rng([seed, split_code, index])
  findings: list[tuple[str, str]] = []  # (finding, region)
  if rng.random() >= p_normal:
    for f in rng.choice(FINDINGS, size=rng.integers(1, 3), replace=False):
      side = str(rng.choice(["right", "left"]))
      region = {
          "lung opacity": f"{side} {rng.choice(['upper', 'mid', 'lower'])} lung zone",
          "nodule": f"{side} {rng.choice(['upper', 'mid', 'lower'])} lung zone",
          "pleural effusion": f"{side} costophrenic angle",
          "pneumothorax": f"{side} apical zone",
          "cardiomegaly": "cardiac silhouette",
      }[str(f)]
      findings.append((str(f), region))
  names = {f for f, _ in findings}
  geo = _layout(rng, "cardiomegaly" in names)

  h = int(image_size * rng.uniform(0.85, 1.2))
  w = int(image_size * rng.uniform(0.85, 1.2))
  img = np.full((h, w), 20.0)
  img[_ellipse_mask(h, w, np.array([0.04, 0.02, 0.96, 1.1]))] = 150
  for side in ("right", "left"):
    img[_ellipse_mask(h, w, geo[f"lung_{side}"])] = 55
  mid = float(geo["mid"])
  img[_rect_mask(h, w, np.array([mid - 0.035, 0.0, mid + 0.035, 1.0]))] += 40
  img[_ellipse_mask(h, w, geo["heart"])] = 185
  img[_rect_mask(h, w, geo["boxes"][anatomy.region_id("trachea")])] = 40
  for c in ("right clavicle", "left clavicle"):
    img[_rect_mask(h, w, geo["boxes"][anatomy.region_id(c)])] += 60

  yy, xx = np.mgrid[0:h, 0:w]
  for f, region in findings:
    box = geo["boxes"][anatomy.region_id(region)]
    cx, cy = rng.uniform(box[0], box[2]) * w, rng.uniform(box[1], box[3]) * h
    if f == "lung opacity":
      s = rng.uniform(0.05, 0.1) * w
      img += rng.uniform(50, 90) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    elif f == "nodule":
      img[(xx - cx) ** 2 + (yy - cy) ** 2 <= (rng.uniform(0.015, 0.035) * w) ** 2] += 90
    elif f == "pleural effusion":
      lung = geo[f"lung_{region.split()[0]}"]
      level = lung[3] - rng.uniform(0.08, 0.2) * (lung[3] - lung[1])
      lx = (xx + 0.5) / w
      meniscus = level - 0.06 * np.abs(lx - (lung[0] if region.startswith("right") else lung[2]))
      img[_ellipse_mask(h, w, lung) & ((yy + 0.5) / h > meniscus)] = 150
    elif f == "pneumothorax":
      lung = geo[f"lung_{region.split()[0]}"]
      img[_ellipse_mask(h, w, lung) & ((yy + 0.5) / h < lung[1] + rng.uniform(0.08, 0.15))] = 15
  img += rng.normal(0, 6, img.shape)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")

  phrases = [""] * anatomy.NUM_REGIONS
  for f, region in findings:
    side = region.split()[0]
    text = str(rng.choice(_PHRASINGS[f])).format(r=region, side=side)
    rid = anatomy.region_id(region)
    phrases[rid] = f"{phrases[rid]}; {text}" if phrases[rid] else text
  # Normal statements only where no finding sits on the same side (or, midline, no cardiomegaly).
  touched_sides = {anatomy.REGIONS[anatomy.region_id(r)].side for _, r in findings}
  for region, text in _NORMAL_PHRASES.items():
    rid = anatomy.region_id(region)
    side = anatomy.REGIONS[rid].side
    clash = ("cardiomegaly" in names) if side == "midline" else (side in touched_sides)
    if not phrases[rid] and not clash and rng.random() < 0.3:
      phrases[rid] = text
  sentences = list(dict.fromkeys([p for p in phrases if p] + [_NEGATIONS[f] for f in FINDINGS if f not in names]))
  impression = ", ".join(sorted(names)) if names else "no acute cardiopulmonary process"
  report = "FINDINGS: " + ". ".join(s[0].upper() + s[1:] for s in sentences) + ". IMPRESSION: " + impression + "."

  boxes = geo["boxes"] * np.array([w, h, w, h], np.float32)
  present = rng.random(anatomy.NUM_REGIONS) >= p_absent
  # Region-level labels and structure masks are exact here; they draw no random numbers, so the
  # images, boxes and texts are the same as before they were added.
  region_findings: list[list[str]] = [[] for _ in range(anatomy.NUM_REGIONS)]
  for f, region in findings:
    region_findings[anatomy.region_id(region)].append(f)
  masks = {"heart": _png(_ellipse_mask(h, w, geo["heart"])),
           "right lung": _png(_ellipse_mask(h, w, geo["lung_right"])),
           "left lung": _png(_ellipse_mask(h, w, geo["lung_left"]))}
  return schema.Triple(
      id=f"synthetic-{split}-{index:06d}", image=buf.getvalue(), report=report,
      boxes=boxes.astype(np.float32), box_present=present, phrases=phrases,
      findings=sorted(names), region_findings=[sorted(set(fs)) for fs in region_findings],
      masks=masks)


def _png(mask: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
  return buf.getvalue()


def generate(data_dir: str, *, num_train: int, num_val: int, seed: int = 0, image_size: int = 64,
             num_shards: int = 4) -> str:
  """Write train/validation shards, `dataset_info.json` and `tokenizer/` into `data_dir`."""
  for split, n in (("train", num_train), ("validation", num_val)):
    records: Iterator[schema.Triple] = (make_triple(seed, split, i, image_size) for i in range(n))
    schema.write_shards(records, data_dir, split, num_shards=min(num_shards, max(n, 1)))
  build_wordpiece_tokenizer(_all_texts(), os.path.join(data_dir, "tokenizer"))
  schema.write_info(data_dir, {
      "name": "synthetic_shapes", "label_names": list(FINDINGS),
      "splits": {"train": num_train, "validation": num_val},
      "params": _params(num_train, num_val, seed, image_size, num_shards)})
  return data_dir


def _params(num_train: int, num_val: int, seed: int, image_size: int, num_shards: int) -> dict:
  return {"num_train": num_train, "num_val": num_val, "seed": seed, "image_size": image_size,
          "num_shards": num_shards}


def ensure(data_dir: str, **kwargs) -> str:
  """Generate the corpus into `data_dir` (a folder or a gs:// URL) unless an identical one is
  already there."""
  wanted = _params(kwargs["num_train"], kwargs["num_val"], kwargs.get("seed", 0),
                   kwargs.get("image_size", 64), kwargs.get("num_shards", 4))
  return schema.ensure_built(data_dir, wanted, lambda out: generate(out, **kwargs), what="a synthetic corpus")

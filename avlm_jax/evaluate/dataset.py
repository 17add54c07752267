"""A triple dataset split in memory for evaluation: letterboxed images, boxes, labels, masks.

Any triple folder works (the built-in corpus, SynthCXR, a converted MIMIC-CXR). Thresholds are
chosen on `validation` and scores reported on `test`; a folder without a test split is split in
two by record position (even records choose thresholds, odd ones are scored), so a threshold is
never chosen on the examples it is scored on.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np
from PIL import Image

from avlm_jax import anatomy, fs
from data_pipelines import input_pipeline, schema

THRESHOLD_SPLITS = ("validation", "val")  # the first one present chooses thresholds
TEST_SPLIT = "test"


@dataclasses.dataclass
class EvalSet:
  """N examples at `image_size`; boxes are xyxy in letterboxed pixels."""

  name: str
  ids: list[str]
  images: np.ndarray            # (N, S, S) uint8
  boxes: np.ndarray             # (N, R, 4) float32 xyxy pixels of the letterboxed image
  box_present: np.ndarray       # (N, R) bool
  findings: list[list[str]]     # image-level positive findings
  region_findings: list[list[list[str]] | None]  # per example: 29 lists, or None (unknown)
  masks: list[dict[str, np.ndarray]]  # per example: name -> (S, S) bool
  image_size: int

  def __len__(self) -> int:
    return len(self.ids)

  def subset(self, index: Sequence[int], name: str) -> "EvalSet":
    idx = list(index)
    return EvalSet(name, [self.ids[i] for i in idx], self.images[idx], self.boxes[idx],
                   self.box_present[idx], [self.findings[i] for i in idx],
                   [self.region_findings[i] for i in idx], [self.masks[i] for i in idx],
                   self.image_size)

  def labels(self, names: Sequence[str]) -> np.ndarray:
    """(N, C) bool image-level labels for `names`."""
    return np.array([[n in set(f) for n in names] for f in self.findings], bool).reshape(len(self), len(names))

  def region_labels(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """((M, R, C) bool labels, (M,) example indices) over the examples with region-level labels."""
    known = [i for i, rf in enumerate(self.region_findings) if rf is not None]
    out = np.zeros((len(known), anatomy.NUM_REGIONS, len(names)), bool)
    for j, i in enumerate(known):
      for r, found in enumerate(self.region_findings[i]):
        out[j, r] = [n in found for n in names]
    return out, np.asarray(known, np.int64)

  def mask_stack(self, structures: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """((M, S, S, K) bool masks, (M,) example indices) over examples that have every structure."""
    known = [i for i, m in enumerate(self.masks) if all(s in m for s in structures)]
    stack = np.zeros((len(known), self.image_size, self.image_size, len(structures)), bool)
    for j, i in enumerate(known):
      for k, s in enumerate(structures):
        stack[j, ..., k] = self.masks[i][s]
    return stack, np.asarray(known, np.int64)


def _decode_mask(png: bytes, shape: tuple[int, int], where: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(png)) as im:
      m = np.asarray(im.convert("L"))
  except Exception as e:
    raise schema.RecordError(f"{where}: mask does not decode ({type(e).__name__}: {e})") from e
  if m.shape != shape:
    raise schema.RecordError(f"{where}: mask is {m.shape}, the image {shape}")
  return m


def load_split(data_dir: str, split: str, image_size: int, max_examples: int = 0) -> EvalSet:
  """Every record of `split` (the first `max_examples` when > 0), decoded and letterboxed."""
  source = input_pipeline.TripleSource(schema.shard_paths(data_dir, split))
  n = len(source) if max_examples <= 0 else min(len(source), max_examples)
  ids, images, boxes, present, findings, region_findings, masks = [], [], [], [], [], [], []
  for i in range(n):
    shard, local = source.locate(i)
    where = f"{shard}, record {local}"
    try:
      t = schema.decode(source[i][1])
      with Image.open(io.BytesIO(t.image)) as im:
        image = input_pipeline.to_uint8_gray(im)
    except (schema.RecordError, OSError, ValueError) as e:
      raise schema.RecordError(f"{where}: {e}") from e
    boxed, b = input_pipeline.letterbox(image, t.boxes, image_size)
    ok = t.box_present & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    ms = {}
    for name, png in t.masks.items():
      m = _decode_mask(png, image.shape, f"{where} ({t.id!r}, mask {name!r})")
      ms[name] = input_pipeline.letterbox(m, np.zeros((0, 4), np.float32), image_size)[0] >= 128
    ids.append(t.id)
    images.append(boxed)
    boxes.append(b)
    present.append(ok)
    findings.append(list(t.findings))
    region_findings.append(t.region_findings)
    masks.append(ms)
  return EvalSet(split, ids, np.stack(images) if images else np.zeros((0, image_size, image_size), np.uint8),
                 np.asarray(boxes, np.float32).reshape(n, anatomy.NUM_REGIONS, 4),
                 np.asarray(present, bool).reshape(n, anatomy.NUM_REGIONS), findings, region_findings,
                 masks, image_size)


def has_split(data_dir: str, split: str) -> bool:
  return fs.isdir(data_dir) and any(
      f.startswith(split + "-") and f.endswith(schema.SHARD_SUFFIX) for f in fs.listdir(data_dir))


def threshold_and_eval_sets(data_dir: str, image_size: int, max_examples: int = 0) -> tuple[EvalSet, EvalSet]:
  """(set that chooses thresholds, set that is scored): validation and test, or the two halves
  of validation when the folder has no test split."""
  present = [s for s in THRESHOLD_SPLITS if has_split(data_dir, s)]
  if not present:
    raise FileNotFoundError(f"{data_dir!r} has no validation split ('validation-*{schema.SHARD_SUFFIX}' "
                            f"or 'val-*'); evaluation chooses its thresholds there")
  split = present[0]
  val = load_split(data_dir, split, image_size, max_examples)
  if has_split(data_dir, TEST_SPLIT):
    return val, load_split(data_dir, TEST_SPLIT, image_size, max_examples)
  if len(val) < 2:
    raise ValueError(f"{data_dir!r}: the validation split has {len(val)} record(s); evaluation needs "
                     "at least 2 (or a test split)")
  return (val.subset(range(0, len(val), 2), f"{split}[0::2]"),
          val.subset(range(1, len(val), 2), f"{split}[1::2]"))

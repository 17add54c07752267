"""Grain input pipeline: ArrayRecord triples -> model-ready numpy batches for this process.

    source (random access over all shards)
      -> global shuffle(seed), a new permutation every epoch -> repeat
      -> decode + box-aware letterbox resize                (DecodeTriple, picklable)
      -> region-text sampling (optional, seeded per example) (SampleRegionTexts)
      -> this process's slice [process_index::process_count] (lazy: only its records are read)
      -> tokenise the 2·29 slot texts + text identities     (TokenizeTexts)
      -> batch(local_batch, drop_remainder=True)
      -> iterator whose state (`get_state`/`set_state`) is saved in every checkpoint.

`avlm_jax.train.data` turns these numpy batches into global `jax.Array`s on the mesh.
"""

from __future__ import annotations

import bisect
import io
import json
import os
from typing import Sequence

import grain
import numpy as np
from PIL import Image

from avlm_jax import anatomy, fs
from avlm_jax.tokenizer import TextTokenizer, token_hash
from data_pipelines import schema
from data_pipelines.region_text_sampling import SampleRegionTexts, SamplingOptions


class TripleSource:
  """Random access over every record of a list of ArrayRecord shards, with provenance.

  `source[i]` is `(i, raw_bytes)`; `locate(i)` says which shard and record index `i` is, so a
  record that fails to decode can be named precisely.
  """

  def __init__(self, paths: Sequence[str]):
    from array_record.python import array_record_data_source

    self.paths = list(paths)
    counts = []
    for p in self.paths:  # one at a time, so a damaged shard is named (the reader's error is not)
      try:
        counts.append(len(array_record_data_source.ArrayRecordDataSource([p])))
      except Exception as e:  # noqa: BLE001: Riegeli raises RuntimeError/ValueError/OSError
        raise schema.RecordError(f"shard {p} cannot be read: {' '.join(str(e).split())[:300]} "
                                 "(truncated, or not an ArrayRecord file)") from None
    self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
    self._starts = np.cumsum([0] + counts).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> tuple[int, bytes]:
    try:
      return index, self._source[index]
    except Exception as e:  # noqa: BLE001
      path, i = self.locate(index)
      raise schema.RecordError(f"{os.path.basename(path)}, record {i}: cannot be read from {path}: "
                               f"{' '.join(str(e).split())[:300]}") from None

  def locate(self, index: int) -> tuple[str, int]:
    shard = bisect.bisect_right(self._starts, index) - 1
    return self.paths[shard], index - self._starts[shard]

  def __repr__(self) -> str:
    # Grain ties iterator checkpoints to the source's repr: keep it stable and content-based.
    return f"TripleSource(paths={self.paths})"


def letterbox(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Resize keeping the aspect ratio so the longer side is `size`, pad (centred) to a square.

  image (H, W) uint8; boxes (R, 4) pixel xyxy -> (size, size) uint8 and boxes in the new pixels.
  """
  h, w = image.shape
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  top, left = (size - nh) // 2, (size - nw) // 2
  out = np.zeros((size, size), np.uint8)
  out[top:top + nh, left:left + nw] = resized
  sx, sy = nw / w, nh / h  # exact per-axis factors after rounding
  new_boxes = boxes * np.array([sx, sy, sx, sy], np.float32) + np.array([left, top, left, top], np.float32)
  return out, new_boxes


def to_uint8_gray(im: Image.Image) -> np.ndarray:
  """A decoded image as (H, W) uint8. 16-bit and 32-bit grayscale (common for radiograph PNGs) is
  stretched over its own min..max range instead of being clipped at 255 by PIL's 'L' conversion."""
  if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    a = np.asarray(im, np.float64)
    lo, hi = float(a.min()), float(a.max())
    return np.round((a - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
  return np.asarray(im.convert("L"))


def xyxy_to_normalized_cxcywh(boxes: np.ndarray, size: int) -> np.ndarray:
  b = np.clip(boxes / size, 0.0, 1.0)
  return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]],
                  axis=-1).astype(np.float32)


class BadRecordLog:
  """The ledger of records a run skipped: one JSON line per distinct bad record (shard, index,
  reason) in `path`, shared by every process and worker that appends to it. Past `limit`
  distinct records the next one raises RecordError naming the ledger."""

  def __init__(self, path: str, limit: int):
    self.path, self.limit = path, limit

  def entries(self) -> list[dict]:
    if not fs.exists(self.path):
      return []
    return [json.loads(line) for line in fs.read_text(self.path).splitlines() if line.strip()]

  def add(self, shard: str, index: int, reason: str) -> None:
    seen = self.entries()
    if any(e["shard"] == shard and e["index"] == index for e in seen):
      return  # the same record met again (another epoch)
    if len(seen) >= self.limit:
      raise schema.RecordError(f"{os.path.basename(shard)}, record {index}: {reason}; that is one bad record "
                               f"more than data.max_bad_records={self.limit} (the others are listed in "
                               f"{self.path})")
    line = json.dumps({"shard": shard, "index": index, "reason": reason}) + "\n"
    if fs.is_remote(self.path):  # an object cannot be appended to: rewritten whole (bad records are rare)
      fs.write_text(self.path, "".join(json.dumps(e) + "\n" for e in seen) + line)
      return
    with open(self.path, "a") as f:  # one short line per append: whole under O_APPEND
      f.write(line)


class DecodeTriple(grain.transforms.Map):
  """`(index, bytes)` -> one example: image (S, S, 1) uint8; boxes (R, 4) normalised cxcywh;
  box_present (R,) bool; labels (C,) float32; phrases (R strings, '' = none).

  A record that does not decode raises RecordError naming shard and index; with `bad_records`
  it is listed there instead and the next record that decodes takes its place (a pure function
  of the index, so batches keep their shape and a resumed run sees the same data)."""

  def __init__(self, source: TripleSource, *, image_size: int, label_names: Sequence[str],
               bad_records: BadRecordLog | None = None):
    self.source = source
    self.image_size = image_size
    self.label_names = list(label_names)
    self._label_index = {n: i for i, n in enumerate(self.label_names)}
    self.bad_records = bad_records

  def map(self, element: tuple[int, bytes]) -> dict[str, np.ndarray]:
    index, raw = element
    for attempt in range(len(self.source)):
      try:
        return self._decode(raw)
      except (schema.RecordError, OSError, ValueError, KeyError) as e:
        shard, local = self.source.locate(index)
        if self.bad_records is None:
          raise schema.RecordError(f"{shard}, record {local}: {e}") from e
        self.bad_records.add(shard, local, " ".join(str(e).split())[:300])
      index = (index + 1) % len(self.source)
      _, raw = self.source[index]
    raise schema.RecordError(f"no record of {self.source.paths} decodes")

  def _decode(self, raw: bytes) -> dict[str, np.ndarray]:
    t = schema.decode(raw)
    try:
      with Image.open(io.BytesIO(t.image)) as im:
        image = to_uint8_gray(im)
    except Exception as e:  # PIL raises many types for corrupt/truncated files.
      raise schema.RecordError(f"record {t.id!r}: image does not decode ({type(e).__name__}: {e})") from e
    image, boxes = letterbox(image, t.boxes, self.image_size)
    labels = np.zeros(len(self.label_names), np.float32)
    for f in t.findings:
      if f not in self._label_index:
        raise schema.RecordError(f"record {t.id!r}: finding {f!r} is not one of the configured "
                                 f"labels {self.label_names}")
      labels[self._label_index[f]] = 1.0
    present = t.box_present & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    cxcywh = np.where(present[:, None], xyxy_to_normalized_cxcywh(boxes, self.image_size), 0.0)
    return {
        "image": image[..., None],
        "boxes": cxcywh.astype(np.float32),
        "box_present": present,
        "labels": labels,
        "phrases": list(t.phrases),
        "findings": list(t.findings),
    }


class TokenizeTexts(grain.transforms.Map):
  """Region texts -> the slot texts the loss reads, 2·R per example: R true statements (one per
  region slot, the slot's positive) then R false statements (extra candidates).

  phrase_tokens (2R, L) int32; phrase_ids (2R, 2) int32, the text identity (a hash of the token
  ids the tower sees, so texts equal after tokenisation and truncation are one text); has_phrase
  (2R,) bool, the slot has that text. Reads `texts` (2R) from the text sampler, or the record's
  `phrases` as they are (R true texts, no false ones) when sampling is off.
  """

  def __init__(self, tokenizer: TextTokenizer, max_len: int):
    self.tokenizer = tokenizer
    self.max_len = max_len

  def map(self, element: dict) -> dict:
    element = dict(element)
    element.pop("findings", None)
    texts = list(element.pop("texts") if "texts" in element else element.pop("phrases"))
    if len(texts) == anatomy.NUM_REGIONS:  # raw phrases: no false statements
      texts += [""] * anatomy.NUM_REGIONS
    if len(texts) != 2 * anatomy.NUM_REGIONS:
      raise ValueError(f"expected {anatomy.NUM_REGIONS} or {2 * anatomy.NUM_REGIONS} region texts, got {len(texts)}")
    has_text = np.asarray([bool(t.strip()) for t in texts])
    tokens = self.tokenizer(texts, self.max_len)
    element.update({
        "phrase_tokens": tokens,
        "phrase_ids": np.where(has_text[:, None], token_hash(tokens), 0).astype(np.int32),
        "has_phrase": has_text,
    })
    return element


def possible_slot_texts(paths: Sequence[str], text_sampling: SamplingOptions | None,
                        knowledge_path: str | None = None) -> set[str]:
  """Every slot text the pipeline over `paths` can emit, whatever the seed or epoch: what
  SampleRegionTexts can draw for each record (the record's own phrases with sampling off) and
  the '' of slots without a text, which TokenizeTexts still tokenises. Records that do not
  decode are skipped (the pipeline skips or stops at them)."""
  from avlm_jax.knowledge import base as kb_base
  from data_pipelines.region_text_sampling import possible_region_texts

  kb = kb_base.load_knowledge_base(knowledge_path)
  source = TripleSource(paths)
  out = {""}
  for i in range(len(source)):
    try:
      t = schema.decode(source[i][1])
    except schema.RecordError:
      continue
    if text_sampling is None:
      out.update(t.phrases)
    else:
      out |= possible_region_texts(t.phrases, kb, text_sampling, t.findings)
  return out


def make_dataset(paths: Sequence[str], *, seed: int, local_batch_size: int, image_size: int,
                 tokenizer: TextTokenizer, max_phrase_len: int, label_names: Sequence[str],
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None,
                 text_sampling: SamplingOptions | None = None,
                 bad_records: BadRecordLog | None = None) -> grain.MapDataset:
  """The per-process batched MapDataset (see module docstring).

  `text_sampling` switches on the paper's region-text sampling; None uses the record's phrases.
  `bad_records`: skip records that do not decode, listed there (None: the first one stops).
  """
  source = TripleSource(paths)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(DecodeTriple(source, image_size=image_size, label_names=label_names, bad_records=bad_records))
  if text_sampling is not None:
    ds = ds.random_map(SampleRegionTexts(text_sampling), seed=seed)
  # Slice after the random map (lazily: each process still decodes only its own records), so an
  # example's texts are drawn from its global position and do not depend on the process count.
  ds = ds[process_index::process_count]
  ds = ds.map(TokenizeTexts(tokenizer, max_phrase_len))
  return ds.batch(local_batch_size, drop_remainder=True)


def make_iterator(ds: grain.MapDataset, *, num_threads: int = 4, num_workers: int = 0):
  """A checkpointable iterator; `num_workers > 0` decodes in worker processes."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)

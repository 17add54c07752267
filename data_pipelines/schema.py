"""One report–image–anatomy triple, and how it is stored in ArrayRecord shards.

A record is a msgpack map (safe to decode, language-neutral, numpy-aware through flax):

| key        | type                  | meaning                                                        |
|------------|-----------------------|----------------------------------------------------------------|
| `version`  | int                   | schema version (`SCHEMA_VERSION`)                               |
| `id`       | str                   | study/image identifier                                          |
| `image`    | bytes                 | PNG or JPEG, 8-bit grayscale (or RGB, converted on decode)      |
| `report`   | str                   | report text (FINDINGS / IMPRESSION)                             |
| `boxes`    | float32 (29, 4)       | `x1, y1, x2, y2` in pixels of the stored image, region order of `avlm_jax.anatomy` |
| `box_present` | bool (29,)         | False where the region has no box (its row is ignored)          |
| `phrases`  | list of 29 str        | report phrases about each region; "" where there is none        |
| `findings` | list of str           | image-level positive finding labels                             |
| `region_findings` | optional: 29 lists of str | findings positive in each region; absent when the source has no region-level labels |
| `masks`    | optional: map str → bytes | 8-bit PNG masks (stored-image size) by structure name, e.g. `heart`, `left lung`, `right lung` |

Optional keys are left out of the record when unset, so records of sources without them stay as
they were (same schema version).

A dataset folder holds `*.array_record` shards, `dataset_info.json` (counts, label names, how it
was made) and optionally `tokenizer/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Sequence

import flax.serialization
import numpy as np

from avlm_jax import anatomy, fs

SCHEMA_VERSION = 1
INFO_FILE = "dataset_info.json"
SHARD_SUFFIX = ".array_record"


class RecordError(ValueError):
  """A record that cannot be decoded or is inconsistent; the message names where it came from."""


@dataclasses.dataclass
class Triple:
  id: str
  image: bytes
  report: str
  boxes: np.ndarray          # (29, 4) float32 pixel xyxy
  box_present: np.ndarray    # (29,) bool
  phrases: list[str]         # 29 strings
  findings: list[str]
  region_findings: list[list[str]] | None = None  # None: the source has no region-level labels
  masks: dict[str, bytes] = dataclasses.field(default_factory=dict)

  def validate(self) -> None:
    r = anatomy.NUM_REGIONS
    if not isinstance(self.image, bytes) or not self.image:
      raise RecordError(f"record {self.id!r}: 'image' must be non-empty encoded bytes")
    if self.boxes.shape != (r, 4):
      raise RecordError(f"record {self.id!r}: 'boxes' has shape {self.boxes.shape}, expected ({r}, 4)")
    if self.box_present.shape != (r,):
      raise RecordError(f"record {self.id!r}: 'box_present' has shape {self.box_present.shape}, expected ({r},)")
    if len(self.phrases) != r or not all(isinstance(p, str) for p in self.phrases):
      raise RecordError(f"record {self.id!r}: 'phrases' must be {r} strings, got {len(self.phrases)}")
    if not all(isinstance(f, str) and f for f in self.findings):
      raise RecordError(f"record {self.id!r}: 'findings' must be non-empty strings, got {self.findings!r}")
    if self.region_findings is not None:
      if len(self.region_findings) != r or not all(
          isinstance(fs, list) and all(isinstance(f, str) and f for f in fs) for fs in self.region_findings):
        raise RecordError(f"record {self.id!r}: 'region_findings' must be {r} lists of non-empty strings")
    for name, png in self.masks.items():
      if not isinstance(name, str) or not name or not isinstance(png, bytes) or not png:
        raise RecordError(f"record {self.id!r}: mask {name!r} must be non-empty encoded bytes under a name")
    for i in np.flatnonzero(self.box_present):
      box, where = self.boxes[i], f"record {self.id!r}: box of {anatomy.REGION_NAMES[i]!r}"
      if not np.all(np.isfinite(box)):
        raise RecordError(f"{where} has non-finite coordinates {box.tolist()}")
      if np.abs(box).max() > MAX_BOX_COORD:
        raise RecordError(f"{where} has coordinates {box.tolist()} beyond ±{MAX_BOX_COORD:g} px")
      if not (box[2] >= box[0] and box[3] >= box[1]):
        raise RecordError(f"{where} is inverted (x1, y1, x2, y2 = {box.tolist()}): needs x2 >= x1, y2 >= y1")


# No stored radiograph is anywhere near this wide: a larger coordinate is a unit or sign error.
MAX_BOX_COORD = 1e5


def encode(triple: Triple) -> bytes:
  triple.validate()
  rec = {
      "version": SCHEMA_VERSION,
      "id": triple.id,
      "image": triple.image,
      "report": triple.report,
      "boxes": np.asarray(triple.boxes, np.float32),
      "box_present": np.asarray(triple.box_present, bool),
      "phrases": list(triple.phrases),
      "findings": list(triple.findings),
  }
  if triple.region_findings is not None:
    rec["region_findings"] = [list(fs) for fs in triple.region_findings]
  if triple.masks:
    rec["masks"] = dict(sorted(triple.masks.items()))
  return flax.serialization.msgpack_serialize(rec)


def decode(raw: bytes) -> Triple:
  """Bytes -> validated Triple; RecordError (never a bare msgpack/KeyError) on bad input."""
  try:
    rec = flax.serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise RecordError(f"not a msgpack triple record ({type(e).__name__}: {e})") from e
  if not isinstance(rec, dict):
    raise RecordError(f"record is a {type(rec).__name__}, expected a map")
  if rec.get("version") != SCHEMA_VERSION:
    raise RecordError(f"record schema version {rec.get('version')!r}, this code reads {SCHEMA_VERSION}")
  missing = [k for k in ("id", "image", "report", "boxes", "box_present", "phrases", "findings") if k not in rec]
  if missing:
    raise RecordError(f"record {rec.get('id')!r} lacks keys {missing}")
  triple = Triple(
      id=str(rec["id"]), image=rec["image"], report=str(rec["report"]),
      boxes=np.asarray(rec["boxes"], np.float32), box_present=np.asarray(rec["box_present"], bool),
      phrases=list(rec["phrases"]), findings=list(rec["findings"]))
  if "region_findings" in rec:
    rf = rec["region_findings"]
    if not isinstance(rf, list) or not all(isinstance(fs, list) for fs in rf):
      raise RecordError(f"record {triple.id!r}: 'region_findings' must be a list of lists")
    triple.region_findings = [list(fs) for fs in rf]
  if "masks" in rec:
    if not isinstance(rec["masks"], dict):
      raise RecordError(f"record {triple.id!r}: 'masks' is a {type(rec['masks']).__name__}, expected a map")
    triple.masks = dict(rec["masks"])
  triple.validate()
  return triple


def shard_paths(data_dir: str, split: str) -> list[str]:
  """The shards of `split`, sorted; a clear error if there are none."""
  if not fs.isdir(data_dir):
    raise FileNotFoundError(f"dataset folder {data_dir!r} does not exist")
  paths = sorted(fs.join(data_dir, f) for f in fs.listdir(data_dir)
                 if f.startswith(split + "-") and f.endswith(SHARD_SUFFIX))
  if not paths:
    raise FileNotFoundError(f"no '{split}-*{SHARD_SUFFIX}' shards in {data_dir!r}")
  return paths


def write_shards(records: Sequence[Triple] | Iterable[Triple], data_dir: str, split: str,
                 num_shards: int) -> list[str]:
  """Write records round-robin into `num_shards` ArrayRecord files `{split}-{i:05d}-of-{n:05d}`."""
  from array_record.python import array_record_module

  os.makedirs(data_dir, exist_ok=True)
  paths = [os.path.join(data_dir, f"{split}-{i:05d}-of-{num_shards:05d}{SHARD_SUFFIX}")
           for i in range(num_shards)]
  # group_size:1 makes every record its own chunk: random access without decoding neighbours.
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in paths]
  try:
    for i, triple in enumerate(records):
      writers[i % num_shards].write(encode(triple))
  finally:
    for w in writers:
      w.close()
  return paths


def write_info(data_dir: str, info: dict) -> None:
  with open(os.path.join(data_dir, INFO_FILE), "w") as f:
    json.dump({"schema_version": SCHEMA_VERSION, **info}, f, indent=2, sort_keys=True)


def ensure_built(data_dir: str, params: dict, build: Callable[[str], object], *, what: str = "a corpus") -> str:
  """`data_dir` (a folder or a gs:// URL) holding the corpus that `build(local_folder)` writes: built
  unless one made with the same `params` is there already (the cache). A bucket gets the corpus
  uploaded once it is complete, its dataset_info.json last, so a reader never sees half of one."""
  info_path = fs.join(data_dir, INFO_FILE)
  if fs.exists(info_path):
    existing = json.loads(fs.read_text(info_path)).get("params")
    if existing == params:
      return data_dir
    raise FileExistsError(f"{data_dir!r} holds {what} made with {existing}, but the config asks for "
                          f"{params}; use another folder or delete it")
  with fs.staged_dir(data_dir, last=(INFO_FILE,)) as local:
    build(local)
  return data_dir


def read_info(data_dir: str) -> dict:
  path = fs.join(data_dir, INFO_FILE)
  try:
    if not fs.exists(path):
      raise FileNotFoundError(path)
    return json.loads(fs.read_text(path))
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is missing: {data_dir!r} is not a triple dataset folder") from None

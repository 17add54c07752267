"""A TFDS builder over any folder of our triple shards (`*.array_record` + `dataset_info.json`).

A corpus subclasses `TriplesBuilder` with its `name` and description; `prepare(cls, source_dir,
tfds_dir)` reads the folder's records (`data_pipelines.schema`) and writes them as a TFDS dataset
with `file_format='array_record'`, after which, in any process and without our code,

    tfds.data_source('<name>', data_dir=tfds_dir, split='train')[i]

is a dict of numpy arrays and bytes (random access, so `grain.MapDataset.source(...)` takes it).
TFDS stores tf.Example protos, so the prepared copy is a second copy of the data; our own Grain
pipeline (`input_pipeline`) reads the source folder directly. `to_triple(example)` turns a TFDS
example (read with `IMAGE_AS_BYTES` decoders) back into the exact `schema.Triple` it came from.

Features: id, image (the stored PNG/JPEG bytes, decoded to (H, W, 1) uint8 unless skipped), report,
boxes (29, 4) float32 xyxy pixels, box_present (29,), phrases (29 texts), findings (image-level
labels), region_findings as parallel lists (region index, finding) with has_region_findings saying
whether the source has region-level labels at all, masks as parallel lists (name, png bytes).
TFDS without TensorFlow cannot write nested variable-length lists, hence the flat pairs. The
source's `dataset_info.json` (label names, counts, how it was made) is kept in the TFDS metadata.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from avlm_jax import anatomy
from data_pipelines import schema

# Decoders for tfds.data_source(...) that keep the image as its stored bytes (for `to_triple`).
IMAGE_AS_BYTES = {"image": tfds.decode.SkipDecoding()}


def features() -> tfds.features.FeaturesDict:
  r = anatomy.NUM_REGIONS
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(),
      "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
      "report": text(),
      "boxes": tfds.features.Tensor(shape=(r, 4), dtype=np.float32),
      "box_present": tfds.features.Tensor(shape=(r,), dtype=np.bool_),
      "phrases": tfds.features.Sequence(text(), length=r),
      "findings": tfds.features.Sequence(text()),
      "has_region_findings": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "region_findings": tfds.features.Sequence(
          {"region": tfds.features.Tensor(shape=(), dtype=np.int32), "finding": text()}),
      "masks": tfds.features.Sequence(
          {"name": text(), "png": tfds.features.Tensor(shape=(), dtype=np.object_)}),
  })


def to_example(t: schema.Triple) -> dict:
  """Triple -> the TFDS feature dict (images are passed as their encoded bytes: no re-encoding)."""
  region_findings = [{"region": np.int32(i), "finding": f}
                     for i, fs in enumerate(t.region_findings or []) for f in fs]
  return {
      "id": t.id, "image": t.image, "report": t.report,
      "boxes": np.asarray(t.boxes, np.float32), "box_present": np.asarray(t.box_present, bool),
      "phrases": list(t.phrases), "findings": list(t.findings),
      "has_region_findings": t.region_findings is not None, "region_findings": region_findings,
      "masks": [{"name": k, "png": v} for k, v in sorted(t.masks.items())],
  }


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def to_triple(ex: dict) -> schema.Triple:
  """A TFDS example read with IMAGE_AS_BYTES decoders -> the validated Triple."""
  image = ex["image"]
  if not isinstance(image, bytes):
    raise schema.RecordError(f"record {_text(ex['id'])!r}: 'image' is decoded ({type(image).__name__}); read "
                             "with decoders=tfds_triples.IMAGE_AS_BYTES to get the stored bytes")
  region_findings = None
  if bool(ex["has_region_findings"]):
    region_findings = [[] for _ in range(anatomy.NUM_REGIONS)]
    for i, f in zip(ex["region_findings"]["region"], ex["region_findings"]["finding"]):
      region_findings[int(i)].append(_text(f))
  t = schema.Triple(
      id=_text(ex["id"]), image=image, report=_text(ex["report"]),
      boxes=np.asarray(ex["boxes"], np.float32), box_present=np.asarray(ex["box_present"], bool),
      phrases=[_text(p) for p in ex["phrases"]], findings=[_text(f) for f in ex["findings"]],
      region_findings=region_findings,
      masks={_text(n): bytes(p) for n, p in zip(ex["masks"]["name"], ex["masks"]["png"])})
  t.validate()
  return t


def source_splits(source_dir: str) -> list[str]:
  """Split names of the shards in a folder (`{split}-{i}-of-{n}.array_record`)."""
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(f"triple folder {source_dir!r} does not exist")
  return sorted({f.rsplit("-", 3)[0] for f in os.listdir(source_dir) if f.endswith(schema.SHARD_SUFFIX)})


class TriplesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic over a triple folder; a corpus subclasses it with `name`, `VERSION` and `DESCRIPTION`.

  `source_dir` (our shards + dataset_info.json) is needed to prepare, not to read a prepared copy.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Triples of data_pipelines.schema version 1."}
  DESCRIPTION = "Report-image-anatomy triples (data_pipelines.schema)."
  HOMEPAGE = ""

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self.source_dir = source_dir
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = tfds.core.MetadataDict()
    if self.source_dir:
      metadata["source_info"] = schema.read_info(self.source_dir)
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=features(),
                                 homepage=self.HOMEPAGE or None, metadata=metadata)

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self.source_dir:
      raise ValueError(f"{type(self).__name__}: preparing needs source_dir=<folder of triple shards>")
    splits = source_splits(self.source_dir)
    if not splits:
      raise FileNotFoundError(f"no '*{schema.SHARD_SUFFIX}' shards in {self.source_dir!r}")
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split: str):
    from array_record.python import array_record_data_source

    for path in schema.shard_paths(self.source_dir, split):
      source = array_record_data_source.ArrayRecordDataSource([path])
      for i in range(len(source)):
        try:
          triple = schema.decode(source[i])
        except schema.RecordError as e:
          raise schema.RecordError(f"{path}, record {i}: {e}") from e
        yield f"{os.path.basename(path)}:{i}", to_example(triple)


def prepare(builder_cls: type[TriplesBuilder], source_dir: str, tfds_dir: str) -> str:
  """Prepare (once; a prepared version is kept) the TFDS copy of `source_dir`; its folder."""
  builder = builder_cls(source_dir=source_dir, data_dir=tfds_dir)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)

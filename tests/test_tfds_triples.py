"""The generic TFDS builder over triple folders: prepare, read by name, round trip, Grain."""

import io
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import schema, synthetic_shapes, tfds_triples


class SyntheticShapesTriples(tfds_triples.TriplesBuilder, skip_registration=True):
  name = "synthetic_shapes_triples_test"


def _source_records(data_dir, split):
  from array_record.python import array_record_data_source

  source = array_record_data_source.ArrayRecordDataSource(schema.shard_paths(data_dir, split))
  return [schema.decode(source[i]) for i in range(len(source))]


def test_prepare_and_read_by_name_round_trips_every_record(synthetic_dir, tmp_path):
  path = tfds_triples.prepare(SyntheticShapesTriples, synthetic_dir, str(tmp_path))
  assert path.endswith(os.path.join("synthetic_shapes_triples_test", "1.0.0"))
  info = schema.read_info(synthetic_dir)
  for split, count in info["splits"].items():
    # By name from the folder alone: no builder class needed to read.
    ds = tfds.data_source("synthetic_shapes_triples_test", data_dir=str(tmp_path), split=split,
                          decoders=tfds_triples.IMAGE_AS_BYTES)
    assert len(ds) == count
    want = {t.id: schema.encode(t) for t in _source_records(synthetic_dir, split)}
    got = {}
    for i in range(len(ds)):
      t = tfds_triples.to_triple(ds[i])
      got[t.id] = schema.encode(t)
    assert got == want
  meta = tfds.builder_from_directory(path).info.metadata
  assert meta["source_info"]["label_names"] == list(synthetic_shapes.FINDINGS)


def test_region_findings_and_masks_survive_and_images_decode(tmp_path):
  triples = [synthetic_shapes.make_triple(1, "train", i, image_size=24) for i in range(3)]
  for t in triples:
    t.region_findings, t.masks = None, {}
  triples[0].region_findings = [[] for _ in range(29)]
  triples[0].region_findings[3] = ["pleural effusion", "abnormal"]
  triples[0].region_findings[28] = ["lung opacity"]
  triples[1].region_findings = [[] for _ in range(29)]
  triples[1].masks = {"heart": triples[2].image, "left lung": triples[0].image}
  src = tmp_path / "src"
  schema.write_shards(triples, str(src), "train", num_shards=2)
  schema.write_info(str(src), {"name": "t", "label_names": list(synthetic_shapes.FINDINGS), "splits": {"train": 3}})
  tfds_triples.prepare(SyntheticShapesTriples, str(src), str(tmp_path / "tfds"))
  raw = tfds.data_source("synthetic_shapes_triples_test", data_dir=str(tmp_path / "tfds"), split="train",
                         decoders=tfds_triples.IMAGE_AS_BYTES)
  back = {t.id: t for t in map(tfds_triples.to_triple, (raw[i] for i in range(3)))}
  for t in triples:
    assert schema.encode(back[t.id]) == schema.encode(t)
  # Default decoding: images as (H, W, 1) uint8; and Grain takes the TFDS source as it is.
  decoded = tfds.data_source("synthetic_shapes_triples_test", data_dir=str(tmp_path / "tfds"), split="train")
  ds = grain.MapDataset.source(decoded).shuffle(seed=0).map(lambda ex: (ex["id"].decode(), ex["image"]))
  seen = set()
  for id_, image in ds:
    want = np.asarray(Image.open(io.BytesIO(back[id_].image)).convert("L"))
    np.testing.assert_array_equal(image, want[..., None])
    seen.add(id_)
  assert seen == set(back) and back[triples[2].id].region_findings is None
  with pytest.raises(schema.RecordError, match="IMAGE_AS_BYTES"):
    tfds_triples.to_triple(decoded[0])


def test_preparing_needs_a_source_folder_with_shards(tmp_path):
  with pytest.raises(ValueError, match="needs source_dir"):
    SyntheticShapesTriples(data_dir=str(tmp_path / "a")).download_and_prepare()
  (tmp_path / "empty").mkdir()
  schema.write_info(str(tmp_path / "empty"), {"name": "empty"})
  with pytest.raises(FileNotFoundError, match="no '\\*.array_record' shards"):
    tfds_triples.prepare(SyntheticShapesTriples, str(tmp_path / "empty"), str(tmp_path / "b"))

import numpy as np
import pytest

from data_pipelines import schema, synthetic_shapes


def test_round_trip():
  t = synthetic_shapes.make_triple(0, "train", 5)
  back = schema.decode(schema.encode(t))
  assert back.id == t.id and back.image == t.image and back.report == t.report
  np.testing.assert_array_equal(back.boxes, t.boxes)
  np.testing.assert_array_equal(back.box_present, t.box_present)
  assert back.phrases == t.phrases and back.findings == t.findings


def test_generator_is_deterministic_and_seed_dependent():
  a = synthetic_shapes.make_triple(3, "train", 7)
  b = synthetic_shapes.make_triple(3, "train", 7)
  c = synthetic_shapes.make_triple(4, "train", 7)
  assert schema.encode(a) == schema.encode(b)
  assert schema.encode(a) != schema.encode(c)


def test_generator_labels_and_phrases_agree():
  for i in range(30):
    t = synthetic_shapes.make_triple(0, "train", i)
    assert set(t.findings) <= set(synthetic_shapes.FINDINGS)
    assert len(t.phrases) == 29
    if not t.findings:
      assert "no acute cardiopulmonary process" in t.report.lower()
    present = t.boxes[t.box_present]
    assert np.all(present[:, 2] >= present[:, 0]) and np.all(present[:, 3] >= present[:, 1])


@pytest.mark.parametrize("raw, message", [
    (b"\x00\x01garbage", "not a msgpack triple record|record is a"),
    (__import__("flax").serialization.msgpack_serialize({"version": 99}), "schema version 99"),
    (__import__("flax").serialization.msgpack_serialize({"version": 1, "id": "x"}), "lacks keys"),
])
def test_bad_records_raise_record_error(raw, message):
  with pytest.raises(schema.RecordError, match=message):
    schema.decode(raw)


def test_wrong_box_shape_is_named():
  t = synthetic_shapes.make_triple(0, "train", 0)
  t.boxes = t.boxes[:5]
  with pytest.raises(schema.RecordError, match=r"'boxes' has shape \(5, 4\)"):
    schema.encode(t)


@pytest.mark.parametrize("box, message", [
    ([30.0, 10.0, 20.0, 40.0], r"box of 'right lung' is inverted \(x1, y1, x2, y2 = \[30.0, 10.0, 20.0, 40.0\]\)"),
    ([10.0, 10.0, 20.0, float("nan")], r"box of 'right lung' has non-finite coordinates"),
    ([10.0, 10.0, 1e30, 40.0], r"box of 'right lung' has coordinates .* beyond ±100000 px"),
    ([-1e30, 10.0, 20.0, 40.0], r"beyond ±100000 px"),
])
def test_a_bad_present_box_is_refused_at_write_and_at_read_time(box, message):
  from avlm_jax import anatomy
  import flax

  t = synthetic_shapes.make_triple(0, "train", 0)
  r = anatomy.REGION_NAMES.index("right lung")
  t.boxes = t.boxes.copy()
  t.boxes[r], t.box_present = box, t.box_present.copy()
  t.box_present[r] = True
  with pytest.raises(schema.RecordError, match=message):
    schema.encode(t)
  # A record written by other code is refused the same way when read.
  raw = flax.serialization.msgpack_serialize({
      "version": schema.SCHEMA_VERSION, "id": t.id, "image": t.image, "report": t.report,
      "boxes": np.asarray(t.boxes, np.float32), "box_present": t.box_present,
      "phrases": list(t.phrases), "findings": list(t.findings)})
  with pytest.raises(schema.RecordError, match=message):
    schema.decode(raw)
  t.box_present[r] = False  # an absent region's row is ignored, whatever it holds
  schema.decode(schema.encode(t))


def test_missing_dataset_folder_and_shards(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    schema.shard_paths(str(tmp_path / "nope"), "train")
  with pytest.raises(FileNotFoundError, match="no 'train-"):
    schema.shard_paths(str(tmp_path), "train")


def test_optional_region_findings_and_masks_round_trip():
  t = synthetic_shapes.make_triple(0, "train", 5)
  t.region_findings, t.masks = None, {}
  plain = schema.encode(t)
  t.region_findings = [[] for _ in range(29)]
  t.region_findings[3] = ["pleural effusion"]
  t.masks = {"heart": b"\x89PNG-a", "left lung": b"\x89PNG-b"}
  back = schema.decode(schema.encode(t))
  assert back.region_findings == t.region_findings and back.masks == t.masks
  # Unset optional keys leave the record bytes as they were.
  assert schema.decode(plain).region_findings is None and schema.decode(plain).masks == {}
  t.region_findings = [["x"]] * 5
  with pytest.raises(schema.RecordError, match="'region_findings' must be 29 lists"):
    schema.encode(t)

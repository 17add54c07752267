import os

import numpy as np
import pytest

from avlm_jax import anatomy
from data_pipelines import input_pipeline, schema, synthetic_shapes


def _dataset(data_dir, tokenizer, seed=0, batch=4, process_index=0, process_count=1, text_sampling=None):
  return input_pipeline.make_dataset(
      schema.shard_paths(data_dir, "train"), seed=seed, local_batch_size=batch, image_size=32,
      tokenizer=tokenizer, max_phrase_len=12, label_names=synthetic_shapes.FINDINGS,
      process_index=process_index, process_count=process_count, text_sampling=text_sampling)


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batch_shapes_and_dtypes(synthetic_dir, tokenizer):
  b = next(input_pipeline.make_iterator(_dataset(synthetic_dir, tokenizer)))
  r = anatomy.NUM_REGIONS
  assert b["image"].shape == (4, 32, 32, 1) and b["image"].dtype == np.uint8
  assert b["boxes"].shape == (4, r, 4) and b["boxes"].dtype == np.float32
  assert b["box_present"].shape == (4, r) and b["box_present"].dtype == bool
  assert b["phrase_tokens"].shape == (4, 2 * r, 12) and b["phrase_tokens"].dtype == np.int32
  assert b["phrase_ids"].shape == (4, 2 * r, 2)
  assert b["labels"].shape == (4, len(synthetic_shapes.FINDINGS))
  assert np.all((b["boxes"] >= 0) & (b["boxes"] <= 1))
  # Without text sampling the true texts are the record's phrases and there are no false ones; a
  # slot without a text has the empty hash and only [CLS] [SEP].
  assert b["has_phrase"][:, :r].any() and not b["has_phrase"][:, r:].any()
  empty = ~b["has_phrase"]
  assert np.all(b["phrase_ids"][empty] == 0)
  assert np.all(b["phrase_tokens"][empty][:, 2:] == 0)


def test_same_seed_same_batches_other_seed_other_batches(synthetic_dir, tokenizer):
  a = _batches(input_pipeline.make_iterator(_dataset(synthetic_dir, tokenizer, seed=1)), 20)
  b = _batches(input_pipeline.make_iterator(_dataset(synthetic_dir, tokenizer, seed=1), num_threads=1), 20)
  c = _batches(input_pipeline.make_iterator(_dataset(synthetic_dir, tokenizer, seed=2)), 20)
  assert _equal(a, b)
  assert not _equal(a, c)


def test_epochs_are_reshuffled_and_complete(synthetic_dir, tokenizer):
  """64 records, batch 4: epoch 1 = batches 0..15. Each epoch holds every record once, in a new order."""
  it = input_pipeline.make_iterator(_dataset(synthetic_dir, tokenizer, batch=4))
  batches = _batches(it, 32)
  key = lambda b: [hash(x.tobytes()) for x in b["image"]]
  e1 = sum((key(b) for b in batches[:16]), [])
  e2 = sum((key(b) for b in batches[16:]), [])
  assert len(set(e1)) == 64 and set(e1) == set(e2)
  assert e1 != e2


def test_iterator_state_resumes_exactly(synthetic_dir, tokenizer):
  it = input_pipeline.make_iterator(_dataset(synthetic_dir, tokenizer))
  _batches(it, 5)
  state = it.get_state()
  expected = _batches(it, 4)
  fresh = input_pipeline.make_iterator(_dataset(synthetic_dir, tokenizer))
  fresh.set_state(state)
  assert _equal(expected, _batches(fresh, 4))


def test_process_slices_partition_the_global_order(synthetic_dir, tokenizer):
  """Each process reads its share of the global order, with the texts the global position draws:
  a 2-process run sees exactly the examples of a 1-process run."""
  from data_pipelines.region_text_sampling import SamplingOptions

  opts = SamplingOptions()
  whole = _dataset(synthetic_dir, tokenizer, batch=1, text_sampling=opts)
  parts = [_dataset(synthetic_dir, tokenizer, batch=1, process_index=i, process_count=2, text_sampling=opts)
           for i in range(2)]
  for k in range(8):
    for key in ("image", "phrase_tokens", "phrase_ids"):
      np.testing.assert_array_equal(parts[k % 2][k // 2][key], whole[k][key], err_msg=f"{key}, example {k}")


@pytest.mark.parametrize("h, w", [(80, 40), (40, 80)])  # portrait, landscape
def test_letterbox_moves_boxes_with_the_pixels(h, w):
  img = np.zeros((h, w), np.uint8)
  img[10:20, 5:15] = 255  # a bright square at x 5..15, y 10..20
  out, boxes = input_pipeline.letterbox(img, np.array([[5, 10, 15, 20]], np.float32), 40)
  scale = 40 / max(h, w)  # 0.5
  pad_x, pad_y = (40 - w * scale) / 2, (40 - h * scale) / 2
  np.testing.assert_allclose(boxes[0], [5 * scale + pad_x, 10 * scale + pad_y, 15 * scale + pad_x,
                                        20 * scale + pad_y])
  x1, y1, x2, y2 = boxes[0].astype(int)
  assert out[y1:y2, x1:x2].mean() > 200  # the square is where the box says
  assert out.shape == (40, 40)
  norm = input_pipeline.xyxy_to_normalized_cxcywh(boxes, 40)
  bx1, by1, bx2, by2 = boxes[0]
  np.testing.assert_allclose(norm[0], [(bx1 + bx2) / 80, (by1 + by2) / 80, (bx2 - bx1) / 40, (by2 - by1) / 40],
                             rtol=1e-6)


def test_corrupt_record_names_shard_and_index(tmp_path, tokenizer):
  from array_record.python import array_record_module

  good = [synthetic_shapes.make_triple(0, "train", i) for i in range(3)]
  path = str(tmp_path / "train-00000-of-00001.array_record")
  w = array_record_module.ArrayRecordWriter(path, "group_size:1")
  w.write(schema.encode(good[0]))
  w.write(b"this is not a record")
  broken = good[2]
  broken.image = broken.image[:40]  # truncated PNG
  w.write(schema.encode(broken))
  w.close()
  source = input_pipeline.TripleSource([path])
  decode = input_pipeline.DecodeTriple(source, image_size=32, label_names=synthetic_shapes.FINDINGS)
  decode.map(source[0])
  with pytest.raises(schema.RecordError, match=r"train-00000-of-00001.array_record, record 1: not a msgpack"):
    decode.map(source[1])
  with pytest.raises(schema.RecordError, match=r"record 2: .*image does not decode"):
    decode.map(source[2])


def test_unknown_finding_label_is_an_error(synthetic_dir, tokenizer):
  source = input_pipeline.TripleSource(schema.shard_paths(synthetic_dir, "train"))
  decode = input_pipeline.DecodeTriple(source, image_size=32, label_names=["nodule"])
  with pytest.raises(schema.RecordError, match="is not one of the configured labels"):
    for i in range(len(source)):
      decode.map(source[i])


def test_sixteen_bit_png_is_stretched_not_clipped():
  import io

  from PIL import Image

  ramp = (np.arange(40 * 40).reshape(40, 40) * 25).astype(np.uint16)  # 0 .. 39975
  buf = io.BytesIO()
  Image.fromarray(ramp).save(buf, format="PNG")
  with Image.open(io.BytesIO(buf.getvalue())) as im:
    assert im.mode.startswith("I")
    out = input_pipeline.to_uint8_gray(im)
  assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
  assert len(np.unique(out)) > 200  # a ramp, not a white image


def test_text_identity_is_the_token_sequence(tokenizer):
  tok = input_pipeline.TokenizeTexts(tokenizer, max_len=6)
  texts = ["no pleural effusion", "No pleural effusion", "no pleural effusion at the right base", ""] + [""] * 25
  out = tok.map({"texts": texts + [""] * 29})
  ids = out["phrase_ids"]
  assert (ids[0] == ids[1]).all()  # the uncased tokenizer sees one text
  # Equal identities exactly when the (truncated) token rows are equal.
  same_tokens = (out["phrase_tokens"][0] == out["phrase_tokens"][2]).all()
  assert (ids[0] == ids[2]).all() == same_tokens
  assert (ids[3] == 0).all() and not out["has_phrase"][3] and not out["has_phrase"][29:].any()
  with pytest.raises(ValueError, match="expected 29 or 58 region texts, got 30"):
    tok.map({"texts": texts + [""]})


def test_a_truncated_shard_is_named(tmp_path):
  """A shard cut off mid-file (a failed copy, a full disk) is named, not a bare Riegeli error."""
  from array_record.python import array_record_module

  paths = []
  for k in range(2):
    path = str(tmp_path / f"train-0000{k}-of-00002.array_record")
    w = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i in range(4):
      w.write(schema.encode(synthetic_shapes.make_triple(0, "train", 4 * k + i)))
    w.close()
    paths.append(path)
  assert len(input_pipeline.TripleSource(paths)) == 8
  with open(paths[1], "r+b") as f:
    f.truncate(os.path.getsize(paths[1]) // 2)
  with pytest.raises(schema.RecordError, match=rf"shard {paths[1]} cannot be read: .*truncated"):
    input_pipeline.TripleSource(paths)

"""MIMIC-CXR-JPG + Chest ImaGenome converter on the self-written fixture tree (tests/fixtures)."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from avlm_jax import anatomy
from data_pipelines import schema
from data_pipelines.mimic import bad_input, convert, images, labels, layout, reports
from tests.fixtures.mimic_imagenome import make_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RIGHT_LUNG = 0  # anatomy.region_id("right lung")


def _opts(**kw):
  return convert.Options(**{"image_size": 40, "pad": True, "shard_size": 2, **kw})


def _convert(tree, out, **kw):
  workers = kw.pop("workers", 1)
  return convert.convert(layout.Roots(tree.mimic, tree.imagenome), str(out), _opts(**kw), workers=workers,
                         stream=open(os.devnull, "w"))


def _records(out, split="train"):
  return {t.id: t for t in convert.iter_triples(str(out), split)}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
  d = tmp_path_factory.mktemp("mimic")
  tree = make_tree(str(d / "src"))
  summary = _convert(tree, d / "out")
  return tree, d / "out", summary


# --- boxes ---------------------------------------------------------------------------------------

def test_box_transform_portrait_and_landscape_by_hand():
  box = np.array([[6.0, 8.0, 30.0, 64.0], [np.nan] * 4])
  # portrait 60×80 -> longer side 40: scale 0.5 -> 30×40; padded: 5 px each side horizontally.
  geo = images.geometry(60, 80, 40, pad=True)
  assert (geo.new_w, geo.new_h, geo.left, geo.top, geo.out_w, geo.out_h) == (30, 40, 5, 0, 40, 40)
  out, present, _ = images.transform_boxes(box, geo)
  np.testing.assert_allclose(out[0], [8, 4, 20, 32])
  assert present.tolist() == [True, False]
  out, _, _ = images.transform_boxes(box, images.geometry(60, 80, 40, pad=False))
  np.testing.assert_allclose(out[0], [3, 4, 15, 32])
  # landscape 800×400 -> 100: scale 1/8 -> 100×50; padded 25 px top and bottom.
  box = np.array([[80.0, 40.0, 400.0, 200.0]])
  out, _, _ = images.transform_boxes(box, images.geometry(800, 400, 100, pad=True))
  np.testing.assert_allclose(out[0], [10, 30, 50, 50])
  out, _, _ = images.transform_boxes(box, images.geometry(800, 400, 100, pad=False))
  np.testing.assert_allclose(out[0], [10, 5, 50, 25])


def test_faulty_boxes_are_dropped_or_clipped_and_counted():
  geo = images.geometry(80, 60, 40, pad=False)  # scale 0.5
  boxes = np.array([[30, 5, 30, 40], [100, 70, 120, 90], [50, -10, 90, 20], [10, 10, 5, 20.0]])
  out, present, stats = images.transform_boxes(boxes, geo)
  assert present.tolist() == [False, False, True, False]
  np.testing.assert_allclose(out[2], [25, 0, 40, 10])  # cut at the image's top and right edges
  assert stats == {"dropped_zero_area": 2, "dropped_outside_image": 1, "clipped": 1}


def test_converted_boxes_match_hand_computed_coordinates(converted):
  _, out, _ = converted
  recs = _records(out)
  portrait, landscape = recs["p10000001/s50000001/d1-pa"], recs["p10000002/s50000002/d2-ap"]
  # right lung = (0.1, 0.1, 0.5, 0.8) of the original: 60×80 -> (6, 8, 30, 64); 80×60 -> (8, 6, 40, 48).
  np.testing.assert_allclose(portrait.boxes[RIGHT_LUNG], [8, 4, 20, 32])
  np.testing.assert_allclose(landscape.boxes[RIGHT_LUNG], [4, 3 + 5, 20, 24 + 5])
  assert Image.open(io.BytesIO(portrait.image)).size == (40, 40)


# --- phrases, labels, reports -----------------------------------------------------------------

def test_phrases_and_labels_from_fixture_graphs(converted):
  _, out, summary = converted
  recs = _records(out)
  rid = {n: i for i, n in enumerate(anatomy.REGION_NAMES)}
  first = recs["p10000001/s50000001/d1-pa"]
  # Duplicate phrases (case and whitespace aside) kept once; each ends with a stop.
  assert first.phrases[rid["right lung"]] == "Patchy opacity at the right lung base."
  assert first.phrases[rid["right lower lung zone"]] == (
      "Patchy opacity at the right lung base. Right basilar opacity, possibly pneumonia.")
  # Negated attributes: the phrase stays, the label does not.
  assert first.phrases[rid["left costophrenic angle"]] == "No pleural effusion."
  assert first.findings == ["lung opacity", "pneumonia"]
  assert first.region_findings[rid["right lower lung zone"]] == ["abnormal", "lung opacity", "pneumonia"]
  assert first.region_findings[rid["left costophrenic angle"]] == []
  assert first.box_present.all()
  # Missing regions absent; a subtype feeds its label; a finding on a place without a box still
  # counts for the image but gives no region a phrase.
  second = recs["p10000002/s50000002/d2-ap"]
  for name in ("carina", "svc", "abdomen", "trachea", "right clavicle"):
    assert not second.box_present[rid[name]], name
  assert second.box_present.sum() == 24
  assert second.findings == ["pleural effusion", "atelectasis"]
  assert second.region_findings[rid["left lower lung zone"]] == ["abnormal", "linear/patchy atelectasis"]
  assert not any("chest wall" in p for p in second.phrases)
  # An image with no findings.
  normal = recs["p10000003/s50000003/d3-pa"]
  assert normal.findings == [] and all(f == [] for f in normal.region_findings)
  assert normal.phrases[rid["right lung"]] == "Lungs are clear."
  assert summary["regions_without_object"] == 3
  assert summary["boxes"] == {"clipped": 1, "dropped_outside_image": 1, "dropped_zero_area": 1}
  assert summary["label_counts"] == {"atelectasis": 1, "lung opacity": 1, "pleural effusion": 1, "pneumonia": 1}


def test_report_sections():
  text = ("  FINAL REPORT\n EXAMINATION: CHEST\n INDICATION: cough\n FINDINGS:\n\n Lungs are\n clear.\n"
          " IMPRESSION: No acute process.\n")
  assert reports.extract(text) == ("FINDINGS: Lungs are clear. IMPRESSION: No acute process.", True)
  assert reports.extract(" FINAL REPORT\n Lungs clear.\n") == ("Lungs clear.", False)
  assert reports.extract("FINDINGS AND IMPRESSION: Normal.") == ("FINDINGS AND IMPRESSION: Normal.", True)


def test_splits_views_and_dataset_info(converted):
  tree, out, summary = converted
  assert summary["records"] == {"train": 3, "validation": 1, "test": 1}
  assert [t.id for t in convert.iter_triples(str(out), "validation")] == ["p10000004/s50000004/d4-pa"]
  assert "p10000001/s50000001/d1-pa" in _records(out)  # PA chosen over the study's AP image
  info = schema.read_info(str(out))
  assert info["label_names"] == list(labels.IMAGENOME_LABELS)
  assert info["splits"] == summary["records"]
  assert sorted(f for f in os.listdir(out) if f.startswith("train-")) == [
      f"train-{i:05d}-of-00004.array_record" for i in range(4)]


def test_config_labels_are_the_converter_labels_and_known_to_the_knowledge_base():
  from avlm_jax.knowledge.base import load_knowledge_base
  from configs import mimic_imagenome

  assert mimic_imagenome.LABELS == labels.IMAGENOME_LABELS
  assert mimic_imagenome.get_config().labels == labels.IMAGENOME_LABELS
  kb = load_knowledge_base()
  assert [l for l in labels.IMAGENOME_LABELS if l not in kb] == []


# --- bad input ----------------------------------------------------------------------------------

def test_bad_inputs_are_counted_with_the_files_named(converted):
  tree, _, summary = converted
  assert summary["skipped"] == {
      "images_to_avoid": 1, "other_frontal_image_of_study": 1, "missing_study": 1, "missing_image": 1,
      "truncated_or_corrupt_image": 1, "unknown_region": 1, "malformed_scene_graph": 1, "missing_report": 1}
  assert summary["bad_input"] == 6
  ex = summary["examples"]
  assert ex["missing_image"][0].endswith("files/p10/p10000006/s50000006/d6-pa.jpg")
  assert ex["truncated_or_corrupt_image"][0].endswith("s50000007/d7-pa.jpg")
  assert ex["unknown_region"][0].endswith("scene_graph/d8-pa_SceneGraph.json")
  assert ex["malformed_scene_graph"][0].endswith("scene_graph/d9-pa_SceneGraph.json")
  assert ex["missing_report"][0].endswith("mimic-cxr-reports/files/p10/p10000010/s50000010.txt")
  assert ex["missing_study"][0].endswith("silver_dataset/splits/valid.csv")


def _sabotage(tree, kind):
  """Break one source file of a clean tree; returns a pattern the strict error must contain."""
  sdir = os.path.join(tree.mimic, "files", "p10", "p10000003", "s50000003")
  graph = os.path.join(tree.imagenome, "silver_dataset", "scene_graph", "d3-pa_SceneGraph.json")
  if kind == "missing_image":
    os.remove(os.path.join(sdir, "d3-pa.jpg"))
    return "d3-pa.jpg: image file does not exist"
  if kind == "truncated":
    data = open(os.path.join(sdir, "d3-pa.jpg"), "rb").read()
    open(os.path.join(sdir, "d3-pa.jpg"), "wb").write(data[:len(data) // 2])
    return "d3-pa.jpg: JPEG is truncated"
  if kind == "unknown_region":
    g = json.load(open(graph))
    g["objects"][3]["bbox_name"] = "right lowr lung zone"
    json.dump(g, open(graph, "w"))
    return "d3-pa_SceneGraph.json: object bbox_name 'right lowr lung zone' is not a Chest ImaGenome region"
  if kind == "malformed_json":
    open(graph, "w").write('{"objects": [')
    return "d3-pa_SceneGraph.json: not valid JSON"
  if kind == "missing_report":
    os.remove(os.path.join(tree.mimic, "mimic-cxr-reports", "files", "p10", "p10000003", "s50000003.txt"))
    return "s50000003.txt: the study has no report file"
  if kind == "missing_study":
    with open(os.path.join(tree.imagenome, "silver_dataset", "splits", "train.csv"), "a") as f:
      f.write("d99,10000099,50000099,d99,files/p10/p10000099/s50000099/d99.dcm\n")
    return "train.csv: line 6: study 50000099 (subject 10000099) is not in MIMIC-CXR-JPG"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing_image", "truncated", "unknown_region", "malformed_json",
                                  "missing_report", "missing_study"])
def test_strict_turns_each_bad_input_into_an_error_naming_the_file(tmp_path, kind):
  tree = make_tree(str(tmp_path / "src"), bad=False)
  expected = _sabotage(tree, kind)
  summary = _convert(tree, tmp_path / "lenient")
  assert summary["bad_input"] == 1 and summary["records"]["train"] == (3 if kind == "missing_study" else 2)
  with pytest.raises(bad_input.ConversionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
    _convert(tree, tmp_path / "strict", strict=True)


# --- resume ---------------------------------------------------------------------------------------

def _shard_bytes(out):
  return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".array_record")}


def test_resume_after_an_injected_failure_and_checksum_verification(tmp_path, monkeypatch):
  tree = make_tree(str(tmp_path / "src"), bad=False, extra_studies=3)
  reference = _convert(tree, tmp_path / "ref")
  real, calls = convert.make_triple, []

  def failing(*args):
    calls.append(1)
    if len(calls) == 4:  # the first two shards (2 studies each) are complete by now
      raise RuntimeError("injected failure")
    return real(*args)

  monkeypatch.setattr(convert, "make_triple", failing)
  with pytest.raises(RuntimeError, match="injected failure"):
    _convert(tree, tmp_path / "out")
  monkeypatch.setattr(convert, "make_triple", real)
  manifest = json.load(open(tmp_path / "out" / "manifest.json"))
  assert sorted(manifest["shards"]) == ["train-00000-of-00003.array_record"]
  assert os.path.exists(tmp_path / "out" / "train-00001-of-00003.array_record.tmp")  # cut mid-write

  again = _convert(tree, tmp_path / "out")
  assert again["shards"]["already_done"] == 1
  assert again["shards"]["converted"] == {"not_converted_yet": 4}
  assert again["records"] == reference["records"]
  assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")

  # A changed shard and a deleted one are redone; the rest is verified and kept.
  path = tmp_path / "out" / "train-00002-of-00003.array_record"
  path.write_bytes(path.read_bytes()[:-1] + b"x")
  os.remove(tmp_path / "out" / "test-00000-of-00001.array_record")
  third = _convert(tree, tmp_path / "out")
  assert third["shards"]["converted"] == {"checksum_mismatch": 1, "file_missing": 1}
  assert third["shards"]["already_done"] == 3
  assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")

  with pytest.raises(bad_input.ConversionError,
                     match="made with image_size=40; this run asks for image_size=48. Rerun with the same"):
    _convert(tree, tmp_path / "out", image_size=48)


@pytest.mark.slow
def test_cli_killed_part_way_resumes_with_two_workers(tmp_path):
  """A real kill: the CLI (2 worker processes) blocks reading one image (a FIFO) after the other
  shards finish; the process group is SIGKILLed; a rerun converts only the unfinished shard."""
  tree = make_tree(str(tmp_path / "src"), bad=False, extra_studies=3)
  reference = _convert(tree, tmp_path / "ref")
  blocked = os.path.join(tree.mimic, "files", "p11", "p11000002", "s51000002", "x2-pa.jpg")
  jpeg = open(blocked, "rb").read()
  os.remove(blocked)
  os.mkfifo(blocked)  # opening it waits for a writer that never comes
  cmd = [sys.executable, "-m", "launch.convert_mimic", "--mimic_root", tree.mimic, "--imagenome_root",
         tree.imagenome, "--out", str(tmp_path / "out"), "--image_size", "40", "--pad", "--shard_size", "2",
         "--workers", "2"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  # stderr goes to a file so it can be read while the process runs: the manifest is written just
  # before the shard's progress line, so both are waited for.
  err_path = tmp_path / "stderr.txt"
  with open(err_path, "wb") as err_file:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_file,
                            start_new_session=True)
  manifest_path = tmp_path / "out" / "manifest.json"
  try:
    deadline = time.time() + 120
    while time.time() < deadline:
      if (manifest_path.exists() and len(json.loads(manifest_path.read_text())["shards"]) == 4
          and "shards 4/5" in err_path.read_text()):
        break
      assert proc.poll() is None, err_path.read_text()
      time.sleep(0.1)
    else:
      pytest.fail("the conversion did not reach its blocked shard: " + err_path.read_text())
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert "ETA" in err_path.read_text()
  assert not os.path.exists(tmp_path / "out" / schema.INFO_FILE)  # never finished
  os.remove(blocked)
  open(blocked, "wb").write(jpeg)

  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "1 converted now (not_converted_yet: 1)" in done.stderr
  assert "4 already done (checksum verified)" in done.stderr
  assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")
  assert schema.read_info(str(tmp_path / "out"))["splits"] == reference["records"]


# --- consumers: TFDS and the training pipeline ---------------------------------------------------

def test_tfds_builder_reads_the_converted_shards(converted, tmp_path):
  import tensorflow_datasets as tfds
  from data_pipelines import tfds_triples
  from data_pipelines.mimic import tfds_builder

  _, out, _ = converted
  tfds_builder.prepare(str(out), str(tmp_path))
  ds = tfds.data_source("mimic_imagenome_triples", data_dir=str(tmp_path), split="train",
                        decoders=tfds_triples.IMAGE_AS_BYTES)
  originals = _records(out)
  back = {t.id: t for t in (tfds_triples.to_triple(ds[i]) for i in range(len(ds)))}
  assert sorted(back) == sorted(originals)
  for k, t in back.items():
    assert schema.encode(t) == schema.encode(originals[k])
  builder = tfds.builder_from_directory(os.path.join(str(tmp_path), "mimic_imagenome_triples", "1.0.0"))
  assert builder.info.metadata["source_info"]["label_names"] == list(labels.IMAGENOME_LABELS)


@pytest.mark.slow
def test_converted_fixture_trains_a_few_steps(tmp_path, synthetic_dir):
  import jax

  from avlm_jax.train.loop import train_and_evaluate
  from tests.conftest import tiny_config

  tree = make_tree(str(tmp_path / "src"), extra_studies=5)
  _convert(tree, tmp_path / "data", image_size=48, pad=False, shard_size=3)
  cfg = tiny_config(**{"data.kind": "array_record", "data.dir": str(tmp_path / "data"),
                       "data.tokenizer_dir": os.path.join(synthetic_dir, "tokenizer"),
                       "labels": labels.IMAGENOME_LABELS, "total_steps": 3, "log_every": 1, "batch_size": 8,
                       "data.text_sampling.enabled": True})
  out = train_and_evaluate(cfg, str(tmp_path / "work"), devices=jax.devices()[:2])
  assert [h["step"] for h in out["history"]] == [1, 2, 3]
  assert all(np.isfinite(h["loss"]) for h in out["history"])

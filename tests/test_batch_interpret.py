"""Batch interpretation of a folder of real radiographs (pydicom-data's adult CR, the pneumonia
package's pediatric JPEGs) plus unreadable files, on the session's tiny checkpoint: the JSON, CSV,
overlays and index.html, agreement with `Interpreter.interpret`, the batch split over the 8 fake
devices, and the command line."""

import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from avlm_jax import anatomy, batch_interpret, interpret
from tests.test_interpret import pneumonia_jpegs, rg1_dicom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def model(tiny_checkpoint):
  workdir, config = tiny_checkpoint
  return interpret.load(os.path.join(workdir, "checkpoints"), config)


@pytest.fixture(scope="session")
def scans(tmp_path_factory):
  """adult/RG1_UNCR.dcm, pediatric/*.jpeg (16), and in bad/: a text file named x.png and a
  truncated copy of a pediatric JPEG under the same name as the good one."""
  root = tmp_path_factory.mktemp("scans")
  jpegs = pneumonia_jpegs()
  for sub in ("adult", "pediatric", "bad"):
    (root / sub).mkdir()
  shutil.copy(rg1_dicom(), root / "adult")
  for path in jpegs:
    shutil.copy(path, root / "pediatric")
  (root / "bad" / "x.png").write_text("not an image\n")
  data = open(jpegs[0], "rb").read()
  (root / "bad" / os.path.basename(jpegs[0])).write_bytes(data[:len(data) // 3])
  return root


@pytest.fixture(scope="session")
def run(model, scans, tmp_path_factory):
  out = tmp_path_factory.mktemp("interpreted")
  return batch_interpret.interpret_folder(model, str(scans), str(out), batch_size=5, progress=False)


def test_every_readable_image_is_interpreted_on_the_mesh(run, scans):
  names = [r["name"] for r in run.records]
  assert names == ["adult/RG1_UNCR.dcm"] + sorted(f"pediatric/{f}" for f in os.listdir(scans / "pediatric"))
  # The tiny config's mesh is data=-1: the batch is split over all 8 fake devices (5 rounds up to 8).
  assert run.num_devices == 8 and run.batch_size == 8
  truncated = "bad/" + sorted(os.listdir(scans / "pediatric"))[0]
  reasons = {f.name: f.reason for f in run.failures}
  assert set(reasons) == {"bad/x.png", truncated}
  assert reasons["bad/x.png"].startswith("not a readable PNG, JPEG or DICOM image (UnidentifiedImageError")
  assert "truncated" in reasons[truncated] and str(scans) not in reasons[truncated]


def test_json_equals_interpret(run, model):
  out = run.out_dir
  for record in run.records:
    saved = json.load(open(os.path.join(out, record["json"])))
    w, h = saved["width"], saved["height"]
    assert os.path.isfile(os.path.join(out, saved["file"])) and not os.path.isabs(saved["file"])
    assert [r["region"] for r in saved["regions"]] == list(anatomy.REGION_NAMES)
    for r in saved["regions"]:
      x1, y1, x2, y2 = r["box_xyxy"]
      assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
      assert 0 <= r["presence"] <= 1 and all(0 <= p <= 1 for p in r["findings"].values())
    assert set(saved["image_findings"]) == set(model.findings)
    assert all(0 <= p <= 1 for p in saved["image_findings"].values())
    assert saved["top_finding"]["probability"] == max(saved["image_findings"].values())
  # The batched, sharded path reads each image as the one-image API does (the DICOM and two JPEGs).
  for record in run.records[:3]:
    saved = json.load(open(os.path.join(out, record["json"])))
    single = model.interpret(os.path.join(out, saved["file"]))
    assert (saved["height"], saved["width"]) == single.image.shape
    for r in saved["regions"]:
      np.testing.assert_allclose(r["box_xyxy"], single.boxes[r["region"]], rtol=1e-5, atol=1e-3)
      assert r["presence"] == pytest.approx(single.presence[r["region"]], abs=1e-5)
      for f, p in r["findings"].items():
        assert p == pytest.approx(single.region_findings[r["region"]][f], abs=1e-5)
    for f, p in saved["image_findings"].items():
      assert p == pytest.approx(single.image_findings[f], abs=1e-5)


def test_csv_tables(run):
  with open(os.path.join(run.out_dir, "findings.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["file"] for r in rows] == [r["file"] for r in run.records]
  for row, record in zip(rows, run.records):
    saved = json.load(open(os.path.join(run.out_dir, row["json"])))
    assert row["overlay"] == saved["overlay"] and int(row["width"]) == saved["width"]
    for finding, p in saved["image_findings"].items():
      assert float(row[finding]) == pytest.approx(p, rel=1e-5)
    assert row["top_finding"] == saved["top_finding"]["finding"]
  with open(os.path.join(run.out_dir, "errors.csv")) as f:
    errors = list(csv.DictReader(f))
  assert [(e["file"], e["reason"]) for e in errors] == [(f.file, f.reason) for f in run.failures]
  assert all(e["file"].startswith("../") and e["file"].endswith(f.name) for e, f in zip(errors, run.failures))


def test_overlays_and_index(run):
  out = run.out_dir
  for record in run.records:
    with Image.open(os.path.join(out, record["overlay"])) as im:
      im.load()
      assert im.mode == "RGB" and max(im.size) <= 512 + 64 and np.asarray(im).std() > 5
  page = open(os.path.join(out, "index.html")).read()
  assert page.count('class="card"') == len(run.records)
  for record in run.records:
    assert f'data-name="{record["name"]}"' in page and f'src="{record["overlay"]}"' in page
  for failure in run.failures:  # each unreadable file, with its reason
    assert f"<td>{failure.name}</td>" in page and failure.reason.split("(")[0].strip() in page
  for control in ('id="finding"', 'id="order"', 'id="min"', 'id="query"', "<script>"):
    assert control in page
  assert all(f'<option value="{i}">{f}</option>' in page for i, f in enumerate(run.findings))
  # Self-contained: nothing is fetched from elsewhere.
  assert "http://" not in page and "https://" not in page and "<link" not in page and "src=\"/" not in page


def test_find_images(tmp_path):
  (tmp_path / "a.png").write_bytes(b"")
  (tmp_path / "notes.txt").write_text("")
  (tmp_path / "scan0001").write_bytes(b"")  # DICOM folders often have no suffixes
  (tmp_path / "out" / "overlays").mkdir(parents=True)
  (tmp_path / "out" / "overlays" / "a.png.png").write_bytes(b"")  # an earlier run's output
  found = batch_interpret.find_images(str(tmp_path), exclude=[str(tmp_path / "out" / "overlays")])
  assert [x.name for x in found] == ["a.png", "scan0001"]
  assert [x.name for x in batch_interpret.find_images(str(tmp_path / "*.png"))] == ["a.png"]
  with pytest.raises(FileNotFoundError, match=r"nothing\*.dcm: no such folder, and no file matches"):
    batch_interpret.find_images(str(tmp_path / "nothing*.dcm"))
  with pytest.raises(FileNotFoundError, match=r"out/overlays: the folder holds no PNG, JPEG or DICOM"):
    batch_interpret.find_images(str(tmp_path / "out" / "overlays"), exclude=[str(tmp_path / "out" / "overlays")])


def test_command_line(tiny_checkpoint, synthetic_dir, scans, tmp_path, capsys, monkeypatch):
  """`python -m launch.interpret`'s main, in this process: a glob with one readable and one
  unreadable file exits 0 and names the bad one; only unreadable files exit 1."""
  from absl import flags

  from launch import interpret as cli

  workdir, _ = tiny_checkpoint
  args = ["interpret", f"--config={ROOT}/configs/tiny.py:data=shapes", "--config.data.kind=array_record",
          f"--config.data.dir={synthetic_dir}", f"--checkpoint={workdir}", "--batch_size=3", "--noprogress"]
  def reset():
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # each parse defines its overrides anew
      delattr(flags.FLAGS, name)

  def parse(*more):
    argv = [*args, *more]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
    reset()
    flags.FLAGS(argv)

  try:
    parse(f"--images={scans}/*/*1430*.jpeg", f"--out={tmp_path / 'ok'}")
    cli.main()
    printed = capsys.readouterr()
    assert "interpreted 1 of 1 files" in printed.out and (tmp_path / "ok" / "index.html").is_file()
    parse(f"--images={scans}/bad/*", f"--out={tmp_path / 'bad'}")
    with pytest.raises(SystemExit, match="none of the 2 files could be interpreted"):
      cli.main()
    printed = capsys.readouterr()
    assert "cannot read x.png: not a readable PNG, JPEG or DICOM image" in printed.err
    assert len(list(csv.DictReader(open(tmp_path / "bad" / "errors.csv")))) == 2
  finally:
    reset()

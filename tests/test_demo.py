"""The Gradio demo (the optional `[demo]` extra), served on a free local port and called through
gradio_client with real radiographs as a browser would; skipped where the extra is not installed.
Also: the package imports without gradio, and the app makes no network call beyond the loopback."""

import ipaddress
import os
import socket
import subprocess
import sys

import pytest
from PIL import Image

from avlm_jax import anatomy, interpret
from tests.test_interpret import pneumonia_jpegs, rg1_dicom

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_imports_without_gradio():
  code = ("import sys; import avlm_jax.demo_app, avlm_jax.interpret, launch.demo; "
          "assert 'gradio' not in sys.modules, 'gradio imported at import time'")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _is_loopback(host) -> bool:
  if host in (None, "localhost", ""):
    return True
  try:
    return ipaddress.ip_address(host if isinstance(host, str) else host.decode()).is_loopback
  except ValueError:
    return False


class _Outbound:
  """Every host that a socket of this process resolves or connects to, other than the loopback,
  while `watching` (an audit hook stays for the process, so it is a no-op when not watching)."""

  def __init__(self):
    self.watching, self.hosts = False, []
    sys.addaudithook(self._hook)

  def _hook(self, event, args):
    if not self.watching:
      return
    if event == "socket.getaddrinfo":
      host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
      host = args[1][0]
    else:
      return
    if not _is_loopback(host):
      self.hosts.append(host)


@pytest.fixture(scope="session")
def app(tiny_checkpoint, tmp_path_factory):
  """(interpreter, gradio_client.Client, outbound watcher) of the demo served on 127.0.0.1."""
  pytest.importorskip("gradio", reason="gradio is the [demo] extra; pip install -e .[demo]")
  gradio_client = pytest.importorskip("gradio_client", reason="the [demo] extra; pip install -e .[demo]")
  from avlm_jax import demo_app

  workdir, config = tiny_checkpoint
  interpreter = interpret.load(os.path.join(workdir, "checkpoints"), config)
  outbound = _Outbound()
  with pytest.MonkeyPatch.context() as env:
    env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio_cache")))
    outbound.watching = True
    demo = demo_app.build_demo(interpreter)
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    client = None
    try:
      client = gradio_client.Client(demo.local_url, verbose=False, analytics_enabled=False,
                                    download_files=str(tmp_path_factory.mktemp("gradio_downloads")))
      yield interpreter, client, outbound
    finally:
      if client is not None:
        client.close()
      demo.close()
      outbound.watching = False


def _check_outputs(outputs, interpreter, path, shape):
  """The app's five outputs for `path` against `Interpreter.interpret` on the same file."""
  h, w = shape
  boxes, figure, image_findings, table, caption = outputs
  expected = interpreter.interpret(path)

  # Image level: gr.Label carries every finding's probability, unrounded.
  assert {c["label"]: c["confidence"] for c in image_findings["confidences"]} == pytest.approx(
      expected.image_findings, abs=1e-6)
  assert image_findings["label"] == max(expected.image_findings, key=expected.image_findings.get)

  # Region level: 29 rows, most suspicious first, each with its top three findings (rounded to 3 places).
  assert table["headers"] == ["region", "finding 1", "p 1", "finding 2", "p 2", "finding 3", "p 3"]
  rows = table["data"]
  assert sorted(row[0] for row in rows) == sorted(anatomy.REGION_NAMES)
  assert [row[2] for row in rows] == sorted((row[2] for row in rows), reverse=True)
  for region, *cells in rows:
    probs = expected.region_findings[region]
    ranked = sorted(probs, key=probs.get, reverse=True)[:3]
    assert cells[0::2] == ranked
    assert cells[1::2] == pytest.approx([probs[f] for f in ranked], abs=5e-4 + 1e-9)

  # The boxes view: the radiograph (shrunk to 768 px on its long side) and one box per region.
  assert [a["label"] for a in boxes["annotations"]] == list(anatomy.REGION_NAMES)
  with Image.open(boxes["image"]) as im:  # gradio_client downloads every file output: local paths
    assert max(im.size) == min(768, max(h, w))
    assert abs(im.width / im.height - w / h) < 0.01
  with Image.open(boxes["annotations"][0]["image"]) as mask:
    assert mask.size == im.size
  # The interpretation figure: image left, image-level bars right.
  with Image.open(figure) as im:
    assert im.width > im.height > 300
  assert f"{os.path.basename(path)}**: {w} × {h} pixels" in caption


def test_demo_on_real_dicom_and_jpeg(app):
  from gradio_client import handle_file

  interpreter, client, outbound = app
  dicom = rg1_dicom()
  _check_outputs(client.predict(handle_file(dicom), api_name="/interpret"), interpreter, dicom, (1955, 1841))
  jpeg = pneumonia_jpegs()[0]
  with Image.open(jpeg) as im:
    shape = (im.height, im.width)
  _check_outputs(client.predict(handle_file(jpeg), api_name="/interpret"), interpreter, jpeg, shape)
  assert outbound.hosts == [], f"the demo reached beyond the loopback: {outbound.hosts}"


def test_unreadable_upload_is_a_message(app, tmp_path):
  from gradio_client import handle_file
  from gradio_client.exceptions import AppError

  interpreter, client, outbound = app
  bad = tmp_path / "scan.png"
  bad.write_bytes(b"\x89PNG but not really")
  with pytest.raises(AppError) as error:
    client.predict(handle_file(str(bad)), api_name="/interpret")
  # Named as the user knows the file, not by its path in gradio's upload cache.
  assert str(error.value).startswith("scan.png: not a readable PNG, JPEG or DICOM image")
  with pytest.raises(AppError, match="Upload a radiograph first"):
    client.predict(None, api_name="/interpret")
  # The app carries on after an error.
  jpeg = pneumonia_jpegs()[0]
  _, _, image_findings, _, _ = client.predict(handle_file(jpeg), api_name="/interpret")
  assert {c["label"]: c["confidence"] for c in image_findings["confidences"]} == pytest.approx(
      interpreter.interpret(jpeg).image_findings, abs=1e-6)
  assert outbound.hosts == [], f"the demo reached beyond the loopback: {outbound.hosts}"

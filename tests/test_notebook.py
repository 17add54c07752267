"""The interpretation notebook runs headless (nbclient), training the tiny config itself."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "interpret_checkpoint.ipynb")


def test_notebook_is_small_and_stripped():
  nb = json.load(open(NOTEBOOK))
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert all(not c["outputs"] and c["execution_count"] is None for c in code)
  assert os.path.getsize(NOTEBOOK) < 20_000


@pytest.mark.slow
def test_notebook_executes_headless(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("AVLM_NOTEBOOK_STEPS", "2")
  monkeypatch.setenv("AVLM_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("AVLM_REPO", ROOT)
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "image:" in text and "cardiac silhouette box:" in text
  assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")

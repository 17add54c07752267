"""The interpretation notebook runs headless (nbclient) from a directory outside the clone, trains
its demo model on SynthCXR itself, and interprets the real radiographs of the data wheels."""

import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "interpret_checkpoint.ipynb")


def test_notebook_is_small_and_stripped_and_the_readme_opens_it_in_colab():
  nb = json.load(open(NOTEBOOK))
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert all(not c["outputs"] and c["execution_count"] is None for c in code)
  assert os.path.getsize(NOTEBOOK) < 20_000
  badge = re.compile(r"\(https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/"
                     r"notebooks/interpret_checkpoint\.ipynb\)")
  repo = badge.search(open(os.path.join(ROOT, "README.md")).read())
  assert repo, "README.md has no 'Open in Colab' badge for the notebook"
  assert badge.search("".join(nb["cells"][0]["source"])).group(1) == repo.group(1)
  # The install cell clones the repository the badge opens, and the package metadata names it.
  assert f'"https://github.com/{repo.group(1)}.git"' in "".join(code[0]["source"])
  assert f"url = https://github.com/{repo.group(1)}\n" in open(os.path.join(ROOT, "setup.cfg")).read()


@pytest.mark.slow
def test_notebook_executes_headless_outside_the_clone(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("AVLM_NOTEBOOK_STEPS", "2")
  monkeypatch.setenv("AVLM_NOTEBOOK_STUDIES", "16")
  monkeypatch.setenv("AVLM_WORKDIR", str(tmp_path / "run"))
  monkeypatch.delenv("AVLM_SOURCE", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "3 radiographs: ['RG1_UNCR.dcm'" in text
  assert text.count("image: ") == 3 and text.count("cardiac silhouette box:") == 3
  assert "image: RG1_UNCR.dcm" in text and ".jpeg (" in text
  pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 3
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
  assert os.path.isfile(tmp_path / "run" / "data" / "dataset_info.json")  # SynthCXR, built by the notebook

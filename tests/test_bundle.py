"""Model bundles (avlm_jax/bundle.py): a checkpoint exported to safetensors + config + tokenizer +
card loads without an orbax checkpoint or the config file and interprets exactly as the checkpoint."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from avlm_jax import bundle, interpret
from avlm_jax.evaluate.model_runner import restore_params
from avlm_jax.tokenizer import TextTokenizer
from tests.test_interpret import rg1_dicom


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
  workdir, config = tiny_checkpoint
  out = str(tmp_path_factory.mktemp("bundles") / "tiny")
  bundle.export(workdir, out, log=lambda s: None)
  return workdir, config, out


def test_a_bundle_holds_the_checkpoints_params_config_tokenizer_and_a_card(exported):
  workdir, config, out = exported
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "manifest.json", "params.safetensors", "tokenizer"]
  loaded = bundle.load(out)
  assert loaded.step == 2 and json.loads(loaded.config.to_json()) == json.loads(config.to_json())
  vocab = TextTokenizer(loaded.tokenizer_dir).vocab_size
  original = restore_params(config, os.path.join(workdir, "checkpoints", "2"), vocab)
  flat_a, flat_b = bundle.flatten_params(jax.device_get(original)), bundle.flatten_params(loaded.params)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  card = open(os.path.join(out, "README.md")).read()
  assert "Not for diagnosis" in card and ", ".join(config.labels) in card and "step 2 of 2" in card
  # The tiny run evaluated itself in training only: no standalone evaluation, and the card says so.
  assert "No evaluation was found beside the checkpoint" in card


def test_a_bundle_interprets_as_its_checkpoint_without_orbax_or_the_config_file(exported, monkeypatch):
  workdir, config, out = exported
  image = rg1_dicom()
  expected = interpret.load(workdir, config).interpret(image)
  from avlm_jax.train import checkpoint

  def no_orbax(*args, **kwargs):
    raise AssertionError("a bundle must load without reading an orbax checkpoint")

  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", no_orbax)
  moved = os.path.join(os.path.dirname(out), "moved")  # a copy elsewhere, as a user receives it
  shutil.copytree(out, moved)
  got = interpret.load(moved).interpret(image)
  assert got.boxes == expected.boxes and got.image_findings == expected.image_findings
  assert got.region_findings == expected.region_findings


def test_a_damaged_or_mismatched_bundle_is_named(exported, tmp_path):
  _, config, out = exported
  broken = tmp_path / "broken"
  shutil.copytree(out, broken)
  with open(broken / "params.safetensors", "r+b") as f:
    f.truncate(os.path.getsize(broken / "params.safetensors") // 2)
  with pytest.raises(bundle.BundleError, match="params.safetensors does not match its checksum"):
    bundle.load(str(broken))
  os.remove(broken / "config.json")
  with pytest.raises(bundle.BundleError, match="config.json is missing"):
    bundle.load(str(broken))
  wider = config.copy_and_resolve_references()
  wider.model.image.width = 64
  with pytest.raises(bundle.BundleError, match=r"another config: model.image.width: 32 in the checkpoint, 64 now"):
    bundle.load(out, wider)
  with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
    bundle.export(exported[0], out, log=lambda s: None)


def test_the_evaluate_command_takes_a_bundle(exported, synthetic_dir, tmp_path):
  """`python -m launch.evaluate --checkpoint=<bundle>` with no --config, and a damaged bundle in one line."""
  import subprocess
  import sys

  _, _, out = exported
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  run = lambda *a: subprocess.run([sys.executable, "-m", "launch.evaluate", *a], cwd=root, env=env,  # noqa: E731
                                  capture_output=True, text=True, timeout=300)
  ok = run(f"--checkpoint={out}", f"--data_dir={synthetic_dir}", "--only=localisation", f"--out={tmp_path / 'eval'}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  res = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert res["step"] == 2 and set(res["subjects"]) == {"model", "random_init", "box_prior"}
  broken = tmp_path / "broken"
  shutil.copytree(out, broken)
  (broken / "tokenizer" / "tokenizer.json").write_text("{}")
  bad = run(f"--checkpoint={broken}", f"--data_dir={synthetic_dir}", f"--out={tmp_path / 'e2'}")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
  assert bad.stderr.strip().splitlines()[-1].endswith(
      "tokenizer/tokenizer.json does not match its checksum in manifest.json (truncated or changed)")

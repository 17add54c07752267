"""A portable model bundle: what a checkpoint's user needs, without orbax or the config file.

    python -m launch.export --checkpoint=workdir/tiny --out=bundle/
    interpret.load("bundle/")                                   # or launch.evaluate --checkpoint=bundle/

A bundle folder holds:
  * `params.safetensors`: the model parameters only (no optimizer state), one tensor per parameter
    named by its '/'-joined path, readable by any safetensors reader;
  * `config.json`: the resolved training config (every key, as the checkpoint saved it);
  * `tokenizer/`: the tokenizer files the model was trained with;
  * `README.md`: a model card (training data, evaluation numbers where an evaluation sits beside
    the checkpoint, labels, intended use and limits);
  * `manifest.json`: each file's SHA-256, checked on load, so a truncated copy is named.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from avlm_jax import fs
from avlm_jax.paths import file_sha256

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CARD_FILE = "README.md"
MANIFEST_FILE = "manifest.json"
FORMAT = "avlm_jax.bundle.v1"


class BundleError(ValueError):
  """A folder that is not a usable bundle: a file missing, corrupt, or not matching the config."""


def is_bundle(path: str) -> bool:
  if fs.is_remote(path):
    return fs.exists(fs.join(path, MANIFEST_FILE))
  return os.path.isfile(os.path.join(path, MANIFEST_FILE))


@dataclasses.dataclass
class Bundle:
  config: ml_collections.ConfigDict
  params: Any  # nested dict of numpy arrays, as the model's `params` collection
  tokenizer_dir: str
  step: int


def _files(root: str) -> list[str]:
  return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                if os.path.isfile(p) and os.path.basename(p) != MANIFEST_FILE)


def param_leaves(params: Any) -> dict[str, Any]:
  """'/'-joined parameter path -> leaf (arrays, or shape structs from `jax.eval_shape`)."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def flatten_params(params: Any) -> dict[str, np.ndarray]:
  return {name: np.asarray(leaf) for name, leaf in param_leaves(params).items()}


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def export(checkpoint: str, out: str, config: str | ml_collections.ConfigDict | None = None,
           log=print) -> str:
  """Write the bundle of `checkpoint` (a step folder, checkpoints folder or workdir) into `out`
  (a new or empty folder). Written beside, then renamed: a failed export leaves no half bundle."""
  from safetensors.numpy import save_file

  from avlm_jax.evaluate.model_runner import (resolve_checkpoint, resolve_tokenizer, restore_params, saved_config,
                                              workdir_of)
  from avlm_jax.interpret import load_config

  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out {out} exists and is not an empty folder; choose a new one")
  directory, step = resolve_checkpoint(checkpoint)
  config = saved_config(checkpoint) if config is None else load_config(config)
  tokenizer = resolve_tokenizer(config, workdir_of(directory))
  params = restore_params(config, os.path.join(directory, str(step)), tokenizer.vocab_size)
  flat = flatten_params(jax.device_get(params))
  tmp = out + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(flat, os.path.join(tmp, PARAMS_FILE), metadata={"format": FORMAT, "step": str(step)})
  with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  shutil.copytree(tokenizer.tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR))
  with open(os.path.join(tmp, CARD_FILE), "w") as f:
    f.write(model_card(config, flat, step, f"{directory}/{step}", _evaluation(directory, step)))
  manifest = {"format": FORMAT, "step": step, "files": {p: file_sha256(os.path.join(tmp, p)) for p in _files(tmp)}}
  with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  if os.path.isdir(out):
    os.rmdir(out)
  os.replace(tmp, out)
  log(f"wrote {out}: {len(flat)} parameter tensors, {sum(v.size for v in flat.values()):,} values, step {step}")
  return out


def _evaluation(directory: str, step: int) -> dict[str, Any] | None:
  """The newest `metrics.json` of an evaluation of this step beside the checkpoint, if any."""
  if fs.is_remote(directory):  # a bucket: the evaluations' folders in listing order
    workdir = directory.rstrip("/").rsplit("/", 1)[0]
    for name in fs.listdir(workdir):
      path = fs.join(workdir, name, "metrics.json")
      if name.startswith("eval") and fs.exists(path):
        result = json.loads(fs.read_text(path))
        if result.get("step") == step and "subjects" in result:
          return result
    return None
  workdir = os.path.dirname(directory)
  mine = []
  for path in glob.glob(os.path.join(workdir, "eval*", "metrics.json")):
    try:
      with open(path) as f:
        result = json.load(f)
    except (OSError, ValueError):
      continue
    if result.get("step") == step and "subjects" in result:
      mine.append((os.path.getmtime(path), result))
  return max(mine, key=lambda m: m[0])[1] if mine else None


_HEADLINES = (("zeroshot_image", "mean_auc", "image-level AUC, training wording"),
              ("zeroshot_image", "heldout_mean_auc", "image-level AUC, held-out wording"),
              ("zeroshot_anatomy", "finding_means/mean_auc", "anatomy-wise AUC (mean over findings)"),
              ("localisation", "map50", "box mAP@0.5"), ("localisation", "mean_iou", "box mean IoU"))


def model_card(config: ml_collections.ConfigDict, flat: dict[str, np.ndarray], step: int, source: str,
               evaluation: dict[str, Any] | None) -> str:
  data = os.path.basename(config.data.dir.rstrip("/")) if config.data.dir else "<workdir>/data"
  lines = [
      "# Anatomy-VLM model bundle (avlm_jax)", "",
      "**Research use only. Not for diagnosis**, triage or any clinical decision: this model has not been "
      "validated on patients, and its findings are zero-shot scores, not calibrated probabilities of disease.", "",
      "## What it is", "",
      f"- Exported from `{source}` (step {step} of {config.total_steps}).",
      f"- Image tower: ViT, width {config.model.image.width}, depth {config.model.image.depth}, patch "
      f"{config.model.image.patch_size}, {'29 anatomy tokens' if config.model.image.anatomy_tokens else 'no anatomy tokens (holistic)'}; "
      f"input {config.data.image_size} px grayscale.",
      f"- Text tower: width {config.model.text.width}, depth {config.model.text.depth}"
      f"{', frozen ' + repr(config.model.text.init_from) if config.model.text.frozen else ''}.",
      f"- Parameters: {sum(v.size for v in flat.values()):,} in {len(flat)} tensors.", "",
      "## Trained on", "",
      f"- Data kind `{config.data.kind}`, folder `{data}`"
      + (" (SynthCXR: radiographs rendered from one real chest CT"
         + (", warped onto real patients' lung shapes" if config.data.synthcxr.get("patients") == "v7_masks" else "")
         + ", with exact anatomy and synthetic findings)"
         if config.data.kind == "synthcxr" or "synth" in data.lower() else "") + ".",
      f"- {config.total_steps} steps of batch {config.batch_size}, seed {config.seed}.", "",
      "## Labels", "", ", ".join(config.labels), "",
      "## Evaluation", ""]
  if evaluation is None:
    lines.append("No evaluation was found beside the checkpoint (`python -m launch.evaluate` writes one).")
  else:
    subjects = evaluation["subjects"]
    names = [s for s in ("model", "random_init", "box_prior", "label_frequency", "holistic") if s in subjects]
    lines += [f"From `{evaluation.get('checkpoint', source)}` on its `{evaluation.get('eval_split', 'test')}` split, "
              "beside the free baselines:", "",
              "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for evaluator, key, label in _HEADLINES:
      row = []
      for s in names:
        node: Any = subjects[s].get(evaluator, {})
        for part in key.split("/"):
          node = node.get(part) if isinstance(node, dict) else None
        row.append(f"{node:.3f}" if isinstance(node, (int, float)) else "–")
      if any(v != "–" for v in row):
        lines.append(f"| {label} | " + " | ".join(row) + " |")
  lines += ["", "## Use", "", "```python", "from avlm_jax import interpret",
            'model = interpret.load("path/to/this/folder")', 'model.interpret("chest.dcm").image_findings', "```", "",
            "Files: `params.safetensors` (parameters), `config.json` (the training config), `tokenizer/`, "
            "`manifest.json` (SHA-256 of each file).", ""]
  return "\n".join(lines)


def bundled_config(path: str) -> ml_collections.ConfigDict:
  """The training config a bundle holds (no checksums, no params read)."""
  from avlm_jax.evaluate.model_runner import config_from_saved

  config_path = fs.join(path, CONFIG_FILE)
  try:
    return config_from_saved(json.loads(fs.read_text(config_path)))
  except (OSError, ValueError) as e:
    raise BundleError(f"{config_path}: not a readable bundle config ({e})") from None


def load(path: str, config: str | ml_collections.ConfigDict | None = None) -> Bundle:
  """Read a bundle, checking every file against the manifest and the params against the config's
  model; `config` (optional) must equal the bundle's on the keys that shape the model. A gs://
  bundle is read from a local copy."""
  from safetensors.numpy import load_file

  from avlm_jax.evaluate.model_runner import expected_param_shapes
  from avlm_jax.tokenizer import TextTokenizer
  from avlm_jax.train.checkpoint import config_differences

  path = fs.local_copy(path)
  manifest_path = os.path.join(path, MANIFEST_FILE)
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise BundleError(f"{manifest_path}: not a readable bundle manifest ({e})") from None
  for name, digest in manifest.get("files", {}).items():
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise BundleError(f"bundle {path}: {name} is missing")
    if file_sha256(file) != digest:
      raise BundleError(f"bundle {path}: {name} does not match its checksum in manifest.json (truncated or changed)")
  bundled = bundled_config(path)
  if config is not None:
    from avlm_jax.interpret import load_config
    given = load_config(config)
    diffs = config_differences(json.loads(bundled.to_json()), json.loads(given.to_json()))
    if diffs:
      raise BundleError(f"bundle {path} was made by another config: " + "; ".join(diffs))
    bundled = given
  tokenizer = TextTokenizer(os.path.join(path, TOKENIZER_DIR))
  flat = load_file(os.path.join(path, PARAMS_FILE))
  want = expected_param_shapes(bundled, tokenizer.vocab_size)
  for name in sorted(set(want) | set(flat)):
    if name not in flat:
      raise BundleError(f"bundle {path}: parameter {name!r} is missing from {PARAMS_FILE}")
    if name not in want:
      raise BundleError(f"bundle {path}: parameter {name!r} is not part of the config's model")
    if tuple(flat[name].shape) != want[name]:
      raise BundleError(f"bundle {path}: parameter {name!r} has shape {tuple(flat[name].shape)}, the config's "
                        f"model has {want[name]}")
  return Bundle(bundled, unflatten_params(flat), os.path.join(path, TOKENIZER_DIR), int(manifest["step"]))

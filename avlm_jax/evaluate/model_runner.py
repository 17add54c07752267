"""A model to evaluate: config + params + tokenizer, and batched image/text encoding on one device.

Params come from a training checkpoint (`from_checkpoint`, checked against the config first), a
fresh initialisation (`random_init`: the random-encoder baseline), or a live train state. Every
evaluator and the interpretation API go through `ModelRunner`, so they score alike.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avlm_jax import anatomy, fs, paths, sentencepiece_tokenizer, sharding
from avlm_jax.models.anatomy_vlm import TEXT_KINDS, build_model
from avlm_jax.tokenizer import TextTokenizer
from avlm_jax.train.step import normalize_images


class CheckpointNotFoundError(FileNotFoundError):
  """The path names no orbax checkpoint step."""


def resolve_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints folder, step) for a step folder, a checkpoints folder (its latest step) or a
  training workdir (its `checkpoints/`, latest step); a folder or a gs:// URL."""
  path = fs.abspath(path)
  if not fs.isdir(path):
    raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist")
  base = fs.basename(path)
  if base.isdigit() and fs.isdir(fs.join(path, "state")):
    return path[:-len(base)].rstrip("/"), int(base)
  steps = [int(d) for d in fs.listdir(path) if d.isdigit() and fs.isdir(fs.join(path, d, "state"))]
  if steps:
    return path, max(steps)
  if fs.isdir(fs.join(path, "checkpoints")):
    return resolve_checkpoint(fs.join(path, "checkpoints"))
  raise CheckpointNotFoundError(
      f"{path!r} holds no checkpoint: expected a step folder with a 'state' item (…/checkpoints/200), "
      "a checkpoints folder, or a training workdir")


def workdir_of(checkpoint_dir: str) -> str | None:
  """The training workdir a `<workdir>/checkpoints` folder belongs to."""
  if fs.basename(checkpoint_dir) != "checkpoints":
    return None
  return checkpoint_dir.rstrip("/")[:-len("checkpoints")].rstrip("/")


def resolve_tokenizer(config: ml_collections.ConfigDict, workdir: str | None = None) -> TextTokenizer:
  """The tokenizer the model was trained with: data.tokenizer_dir, else the folder data.tokenizer
  names (`tokenizer/`, or the SentencePiece one training made: sentencepiece_tokenizer) in
  data.dir or <workdir>/data (the built-in corpus' default place)."""
  tried = []
  if config.data.tokenizer_dir:
    return TextTokenizer(paths.resolve(config.data.tokenizer_dir))
  for d in filter(None, (config.data.dir, workdir and fs.join(workdir, "data"))):
    candidate = sentencepiece_tokenizer.config_tokenizer_dir(config, d)
    if fs.isdir(candidate):
      return TextTokenizer(candidate)
    tried.append(candidate)
  raise FileNotFoundError(f"no tokenizer for this config: tried {tried or ['(no data.dir, no workdir)']}; "
                          "set --config.data.tokenizer_dir or --config.data.dir")


def eval_data_dir(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  """The triple folder evaluators read: evals.data_dir, data.dir, or <workdir>/data."""
  d = config.evals.data_dir or config.data.dir or (workdir and fs.join(workdir, "data"))
  if not d:
    raise ValueError("no evaluation data: set --config.evals.data_dir (or data.dir)")
  return d


def _init_fn(model, config: ml_collections.ConfigDict, prompt_len: int):
  s = config.data.image_size

  def init(rng):
    images = jnp.zeros((1, s, s, 1), jnp.float32)
    phrases = jnp.zeros((1, anatomy.NUM_REGIONS, config.data.max_phrase_len), jnp.int32)
    prompts = jnp.zeros((len(config.labels), prompt_len), jnp.int32)
    return model.init({"params": rng}, images, phrases, prompts)["params"]

  return init


def restore_params(config: ml_collections.ConfigDict, checkpoint: str, vocab_size: int) -> Any:
  """Params of the checkpoint at `checkpoint`, on this process's first device.

  The checkpoint's saved config and parameter shapes are checked against `config` first; a
  mismatch raises IncompatibleCheckpointError naming the keys or parameters that differ.
  """
  import orbax.checkpoint as ocp
  from flax import linen as nn

  from avlm_jax.train.checkpoint import Checkpointer
  from avlm_jax.train.state import StatePlan, make_optimizer, optimizer_groups

  directory, step = resolve_checkpoint(checkpoint)
  model = build_model(config.model, vocab_size)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
  tx = make_optimizer(config.optimizer, config.total_steps, optimizer_groups(config.optimizer))
  plan = StatePlan(_init_fn(model, config, config.data.max_prompt_len), tx, mesh,
                   sharding.rules_for(config.sharding.preset),
                   frozen=("text",) if config.model.text.frozen else ())
  ckpt = Checkpointer(directory)
  try:
    ckpt.check_compatible(step, plan.abstract, json.loads(config.to_json()))
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(plan.abstract)))
  finally:
    ckpt.close()
  return nn.unbox(restored["state"].params)


def saved_config(checkpoint: str) -> ml_collections.ConfigDict:
  """The config `checkpoint` (anything `resolve_checkpoint` takes) was trained with, as saved beside
  it (`config_from_saved`)."""
  from avlm_jax.train.checkpoint import Checkpointer

  directory, step = resolve_checkpoint(checkpoint)
  ckpt = Checkpointer(directory)
  try:
    return config_from_saved(ckpt.saved_config(step))
  finally:
    ckpt.close()


def config_from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (JSON) as a ConfigDict: keys added to the project since it was written get the
  values older checkpoints implied (ADDED_KEYS); keys this version no longer knows are dropped."""
  from configs import common

  from avlm_jax.train.checkpoint import ADDED_KEYS, flatten

  saved = flatten(saved)
  config = common.base_config()
  known = flatten(json.loads(config.to_json()))
  for dotted in known:
    value = saved.get(dotted, ADDED_KEYS.get(dotted, known[dotted]))
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(node[leaf], tuple) and isinstance(value, list) else value
  return config


def expected_param_shapes(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, tuple[int, ...]]:
  """'/'-joined parameter path -> shape of the model `config` describes (nothing is computed)."""
  from flax import linen as nn

  model = build_model(config.model, vocab_size)
  shapes = jax.eval_shape(lambda: nn.unbox(_init_fn(model, config, config.data.max_prompt_len)(jax.random.key(0))))
  from avlm_jax.bundle import param_leaves
  return {name: tuple(leaf.shape) for name, leaf in param_leaves(shapes).items()}


def baseline_config(config: ml_collections.ConfigDict, checkpoint: str) -> ml_collections.ConfigDict:
  """The config a baseline checkpoint was trained with (saved beside it), evaluated with
  `config`'s evaluator settings; its image size and labels must be `config`'s."""
  from avlm_jax.train.checkpoint import IncompatibleCheckpointError

  directory, step = resolve_checkpoint(checkpoint)
  saved = saved_config(checkpoint)
  for key, ours, theirs in (("data.image_size", config.data.image_size, saved.data.image_size),
                            ("labels", list(config.labels), list(saved.labels))):
    if ours != theirs:
      raise IncompatibleCheckpointError(
          f"baseline checkpoint {directory}/{step} was trained with {key}={theirs!r}, the evaluated "
          f"config has {ours!r}; a baseline must see the same images and labels")
  saved.evals = copy.deepcopy(config.evals)
  return saved


def random_params(config: ml_collections.ConfigDict, vocab_size: int, seed: int = 0) -> Any:
  """A fresh initialisation, with the config's pretrained *text* tower loaded when it names one
  (the baseline isolates what training the image side bought; the paper's text tower is frozen)."""
  from flax import linen as nn

  from avlm_jax.train import pretrained

  model = build_model(config.model, vocab_size)
  params = nn.unbox(jax.jit(_init_fn(model, config, config.data.max_prompt_len))(jax.random.key(seed)))
  model_cfg = copy.deepcopy(config.model)
  with model_cfg.unlocked():
    model_cfg.image.init_from = ""
  params, _ = pretrained.load_pretrained(params, model_cfg, config.data.image_size)
  return params


class ModelRunner:
  """Batched, jitted encoding with fixed batch shapes (one compile per shape)."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, tokenizer: TextTokenizer,
               batch_size: int = 32, name: str = "model"):
    self.config = config
    self.tokenizer = tokenizer
    self.name = name
    self.batch_size = batch_size
    self.model = build_model(config.model, tokenizer.vocab_size)
    self.params = jax.device_put(params, jax.local_devices()[0])
    model = self.model
    self._encode_image = jax.jit(lambda p, x: model.apply({"params": p}, normalize_images(x),
                                                          method=model.encode_image))
    self._encode_text = jax.jit(
        lambda p, t, kind: model.apply({"params": p}, t, kind=kind, method=model.encode_text)["embedding"],
        static_argnames="kind")
    self._scales = jax.jit(lambda p: model.apply({"params": p}, method=model.logit_scales))
    self._text_memo: dict[tuple[str, int, str], np.ndarray] = {}

  @functools.cached_property
  def scales(self) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(self._scales(self.params)).items()}

  def encode_images(self, images: np.ndarray,
                    keep: Sequence[str] = ("boxes", "presence_logits", "region_emb", "image_emb")
                    ) -> dict[str, np.ndarray]:
    """uint8 images (N, S, S) or (N, S, S, 1) -> numpy outputs of `keep` (boxes normalised cxcywh)."""
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    s = self.config.data.image_size
    if images.shape[1:] != (s, s, 1):
      raise ValueError(f"images are {images.shape[1:]}, this model takes ({s}, {s}, 1)")
    out: dict[str, list] = {k: [] for k in keep}
    b = self.batch_size
    for i in range(0, len(images), b):
      chunk = images[i:i + b]
      padded = np.zeros((b, s, s, 1), np.uint8)
      padded[:len(chunk)] = chunk
      res = self._encode_image(self.params, padded)
      for k in keep:
        out[k].append(np.asarray(res[k])[:len(chunk)])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}

  def embed_texts(self, texts: Sequence[str], max_len: int | None = None, *, kind: str) -> np.ndarray:
    """(len(texts), E) L2-normalised joint-space embeddings. `kind`: 'prompt' for image-level label
    prompts, 'phrase' for region statements (they differ with model.separate_text_projections)."""
    if kind not in TEXT_KINDS:
      raise ValueError(f"text kind {kind!r}; expected one of {TEXT_KINDS}")
    max_len = max_len or self.config.data.max_prompt_len
    missing = [t for t in dict.fromkeys(texts) if (t, max_len, kind) not in self._text_memo]
    b = self.batch_size
    for i in range(0, len(missing), b):
      chunk = missing[i:i + b]
      tokens = np.zeros((b, max_len), np.int32)
      tokens[:len(chunk)] = self.tokenizer(chunk, max_len)
      emb = np.asarray(self._encode_text(self.params, tokens, kind))
      for j, t in enumerate(chunk):
        self._text_memo[(t, max_len, kind)] = emb[j]
    return np.stack([self._text_memo[(t, max_len, kind)] for t in texts]) if texts else np.zeros((0, 0), np.float32)

"""Interpret radiographs with a trained checkpoint: the notebook API.

    from avlm_jax import interpret
    model = interpret.load("workdir/tiny")       # the config saved with the checkpoint
    result = model.interpret("chest.dcm")        # or a PNG/JPEG path, or an (H, W) array
    result.image_findings                        # {"pleural effusion": 0.83, ...}
    result.region_findings["left costophrenic angle"]   # {"pleural effusion": 0.91, ...}
    result.boxes["cardiac silhouette"]           # (x1, y1, x2, y2) in the input's pixels
    result.figure                                # matplotlib Figure

Probabilities are read the way the losses were trained (avlm_jax/evaluate/scoring.py): image
level, sigmoid(scale · cos + bias) of the CLS embedding against each label prompt; region level,
the region's softmax preference for "<finding> in the <region>" over its negation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from avlm_jax import anatomy, bundle, fs
from avlm_jax.evaluate import pictures, scoring
from avlm_jax.evaluate.model_runner import (ModelRunner, resolve_checkpoint, resolve_tokenizer, restore_params,
                                            saved_config, workdir_of)
from avlm_jax.evaluate.radiograph_io import ImageReadError, read_radiograph  # noqa: F401 (re-exported)
from data_pipelines.input_pipeline import letterbox


def load_config(spec: str | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A ConfigDict as is, or `path/to/config.py[:arg]` through its `get_config(arg)`."""
  if isinstance(spec, ml_collections.ConfigDict):
    return spec
  path, _, arg = str(spec).partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("avlm_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


@dataclasses.dataclass
class Interpretation:
  image: np.ndarray                             # (H, W) uint8, as read
  boxes: dict[str, tuple[float, float, float, float]]  # region -> xyxy in the input's pixels
  region_findings: dict[str, dict[str, float]]  # region -> finding -> probability
  image_findings: dict[str, float]              # finding -> probability
  figure: Figure
  source: str = "array"
  presence: dict[str, float] = dataclasses.field(default_factory=dict)  # region -> P(its box exists)

  def top_regions(self, finding: str, k: int = 3) -> list[tuple[str, float]]:
    if finding not in self.image_findings:
      raise KeyError(f"finding {finding!r} was not scored; scored: {list(self.image_findings)}")
    ranked = sorted(self.region_findings.items(), key=lambda kv: -kv[1][finding])
    return [(region, probs[finding]) for region, probs in ranked[:k]]

  def png(self) -> bytes:
    return pictures.png_bytes(self.figure)


@dataclasses.dataclass
class Scores:
  """What the model reads off N radiographs, batched (`Interpreter.score`)."""
  boxes: np.ndarray         # (N, R, 4) xyxy in each input's pixels
  presence: np.ndarray      # (N, R) probability that each region's box exists
  region_probs: np.ndarray  # (N, R, F) finding probabilities per region
  image_probs: np.ndarray   # (N, F) image-level finding probabilities


def interpretation_figure(image: np.ndarray, boxes: np.ndarray, region_probs: np.ndarray,
                          image_probs: np.ndarray, findings: Sequence[str], title: str) -> Figure:
  """Left: regions filled by their top finding probability; right: image-level probabilities."""
  fig = pictures.region_heat_figure(image, boxes, region_probs, findings, title=title)
  fig.set_size_inches(12, 6)
  fig.axes[0].set_position([0.01, 0.05, 0.52, 0.88])
  fig.axes[1].set_position([0.54, 0.05, 0.012, 0.88])  # the colour bar
  ax = fig.add_axes([0.76, 0.15, 0.22, 0.7])
  order = np.argsort(image_probs)
  ax.barh([findings[i] for i in order], image_probs[order], color="tab:red")
  ax.set_xlim(0, 1)
  ax.set_xlabel("image-level probability")
  ax.tick_params(labelsize=8)
  return fig


class Interpreter:
  """A loaded checkpoint; `interpret(image)` per radiograph. Text embeddings are computed once."""

  def __init__(self, runner: ModelRunner, findings: Sequence[str] | None = None):
    config = runner.config
    self.runner = runner
    self.findings = scoring.check_findings(findings or config.labels, "findings")
    anat = config.evals.zeroshot_anatomy
    self._prompt_emb = runner.embed_texts(
        scoring.image_prompts(self.findings, config.prompt_template, config.prompt_style), config.data.max_prompt_len,
        kind="prompt")
    # A holistic checkpoint (no anatomy tokens) gives image-level findings only.
    self.regions = anatomy.REGION_NAMES[:runner.model.image.num_regions]
    if self.regions:
      pos, neg = scoring.region_texts(self.findings, anat.positive_template, anat.negative_template)
      shape = (anatomy.NUM_REGIONS, len(self.findings), -1)
      self._pos = runner.embed_texts(pos, config.data.max_phrase_len, kind="phrase").reshape(shape)
      self._neg = runner.embed_texts(neg, config.data.max_phrase_len, kind="phrase").reshape(shape)

  def interpret(self, image: Any, *, title: str | None = None) -> Interpretation:
    """`image`: a PNG/JPEG/DICOM path, a PIL image or an array (H, W[, C])."""
    source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "array"
    pixels = read_radiograph(image)
    scores = self.score(self.runner.encode_images(self.model_input(pixels)[None]), [pixels.shape])
    boxes, presence, region_probs, image_probs = (scores.boxes[0], scores.presence[0], scores.region_probs[0],
                                                  scores.image_probs[0])
    fig = interpretation_figure(pixels, boxes, region_probs, image_probs, self.findings,
                                title if title is not None else os.path.basename(source))
    return Interpretation(
        image=pixels,
        boxes={r: tuple(float(v) for v in boxes[i]) for i, r in enumerate(self.regions)},
        region_findings={r: {f: float(region_probs[i, c]) for c, f in enumerate(self.findings)}
                         for i, r in enumerate(self.regions)},
        image_findings={f: float(image_probs[c]) for c, f in enumerate(self.findings)},
        figure=fig, source=source, presence={r: float(presence[i]) for i, r in enumerate(self.regions)})

  def model_input(self, pixels: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> the (S, S) letterboxed image the model sees."""
    return letterbox(pixels, np.zeros((0, 4), np.float32), self.runner.config.data.image_size)[0]

  def score(self, encoded: dict[str, np.ndarray], shapes: Sequence[tuple[int, int]]) -> Scores:
    """Encoder outputs of N letterboxed images (as `ModelRunner.encode_images` gives them) and the
    inputs' (H, W) -> boxes in the inputs' pixels, presence and finding probabilities. Batch
    interpretation (avlm_jax/batch_interpret.py) scores through here too, so both read alike."""
    size = self.runner.config.data.image_size
    sc = self.runner.scales
    image_probs = scoring.image_probabilities(encoded["image_emb"], self._prompt_emb, sc["global_scale"],
                                              sc["global_bias"])
    if self.regions:
      region_probs = scoring.region_probabilities(encoded["region_emb"], self._pos, self._neg, sc["region_scale"])
    else:
      region_probs = np.zeros((len(shapes), 0, len(self.findings)))
    boxes = np.stack([to_input_pixels(pictures.cxcywh_to_xyxy(b, size), shape, size)
                      for b, shape in zip(encoded["boxes"], shapes)]).reshape(len(shapes), -1, 4)
    presence = scoring.sigmoid(np.asarray(encoded["presence_logits"], np.float64)).reshape(len(shapes), -1)
    return Scores(boxes=boxes, presence=presence, region_probs=region_probs, image_probs=image_probs)


def to_input_pixels(boxes: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
  """xyxy in the letterboxed `size` square -> xyxy in the (H, W) input, clipped to the image
  (a box reaching into the letterbox padding ends at the image border)."""
  h, w = shape
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  top, left = (size - nh) // 2, (size - nw) // 2
  sx, sy = nw / w, nh / h
  b = (np.asarray(boxes, np.float64) - np.array([left, top, left, top])) / np.array([sx, sy, sx, sy])
  return np.clip(b, 0.0, np.array([w, h, w, h], np.float64))


def load(checkpoint: str, config: str | ml_collections.ConfigDict | None = None, *,
         findings: Sequence[str] | None = None, tokenizer_dir: str | None = None) -> Interpreter:
  """Load `checkpoint` (a step folder, a checkpoints folder, a training workdir or a model bundle
  from `launch.export`). `config` (a
  ConfigDict or `configs/x.py[:arg]`) defaults to the one saved with the checkpoint; one given
  must be the one it was made by, else IncompatibleCheckpointError names the keys that differ. An
  unknown finding name raises KeyError."""
  if findings is not None:
    scoring.check_findings(findings, "findings")
  if bundle.is_bundle(checkpoint):  # no orbax, no config file: everything is in the folder
    from avlm_jax.tokenizer import TextTokenizer
    b = bundle.load(checkpoint, config)
    tokenizer = TextTokenizer(tokenizer_dir or b.tokenizer_dir)
    return Interpreter(ModelRunner(b.config, b.params, tokenizer, batch_size=1, name=fs.abspath(checkpoint)),
                       findings)
  config = saved_config(checkpoint) if config is None else load_config(config)
  directory, step = resolve_checkpoint(checkpoint)
  if tokenizer_dir:
    from avlm_jax.tokenizer import TextTokenizer
    tokenizer = TextTokenizer(tokenizer_dir)
  else:
    tokenizer = resolve_tokenizer(config, workdir_of(directory))
  params = restore_params(config, fs.join(directory, str(step)), tokenizer.vocab_size)
  return Interpreter(ModelRunner(config, params, tokenizer, batch_size=1, name=f"{directory}/{step}"), findings)

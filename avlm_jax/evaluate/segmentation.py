"""Segmentation transfer: a U-Net-style decoder over intermediate ViT blocks, trained on a dataset's
structure masks (heart, lungs) with the encoder frozen or fine-tuned; Dice and mIoU on held-out
images.

The decoder is UNETR-shaped and the same for any encoder: the deepest tapped block's patch grid
is upsampled ×2 per level, and at each level the output of an earlier block, brought to that
resolution by a strided transposed convolution, is concatenated; the last level joins a
full-resolution convolutional stem on the pixels. Structures are separate sigmoid channels (they
may overlap), trained with binary cross-entropy + soft Dice. Our choices: taps spread evenly
over the depth, two 3×3 conv+ReLU per level, Adam, no augmentation. Beside the scores stands the
Dice of the training masks' per-pixel majority (`mean_mask_prior`), which sees no image: where
anatomy varies little (SynthCXR's one CT) it is high, and an encoder's gain is what lies above it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from avlm_jax.evaluate import metrics, pictures
from avlm_jax.evaluate.context import EvalContext
from avlm_jax.evaluate.dataset import load_split
from avlm_jax.models import layers as model_layers
from avlm_jax.models.anatomy_vit import AnatomyViT
from avlm_jax.train.step import normalize_images


def upsampling_levels(patch_size: int) -> int:
  n = int(round(math.log2(patch_size)))
  if 2 ** n != patch_size:
    raise ValueError(f"the segmentation decoder needs a power-of-two patch size, got {patch_size}")
  return n


def tap_layers(depth: int, levels: int, requested: Sequence[int] = ()) -> list[int]:
  """Which encoder blocks feed the decoder, shallow to deep: `requested`, or `levels` blocks spread
  evenly (ViT-B/16, 12 blocks, 4 levels: 2, 5, 8, 11, UNETR's z3/z6/z9/z12)."""
  if requested:
    taps = [int(t) for t in requested]
    if len(taps) != levels or any(not 0 <= t < depth for t in taps):
      raise ValueError(f"config.evals.segmentation.layers={tuple(requested)}: need {levels} block indices "
                       f"in [0, {depth}) for this patch size")
    return taps
  return [max(0, round(depth * (i + 1) / levels) - 1) for i in range(levels)]


class UNetDecoder(nn.Module):
  num_classes: int
  levels: int  # log2(patch size)
  width: int = 32
  # The full-resolution convolutional stem on the pixels (UNETR has it). Without it the masks come
  # from the encoder's features alone, which tells encoders apart where pixels nearly suffice.
  pixel_stem: bool = True

  def _channels(self, level: int) -> int:
    return self.width * 2 ** min(self.levels - level, 3)

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], images: jax.Array) -> jax.Array:
    """features: `levels` maps (B, h, w, D), shallow to deep; images (B, H, W, 1) -> (B, H, W, K) logits."""

    def block(x, c):
      for _ in range(2):
        x = nn.relu(nn.Conv(c, (3, 3))(x))
      return x

    x = block(nn.Conv(self._channels(0), (1, 1))(features[-1]), self._channels(0))
    for level in range(1, self.levels + 1):
      c = self._channels(level)
      x = nn.ConvTranspose(c, (2, 2), strides=(2, 2))(x)
      if level < self.levels:
        s = 2 ** level
        skip = nn.ConvTranspose(c, (s, s), strides=(s, s))(features[self.levels - 1 - level])
      elif self.pixel_stem:
        skip = block(images, c)  # the full-resolution stem
      else:
        skip = None
      x = block(x if skip is None else jnp.concatenate([x, skip], axis=-1), c)
    return nn.Conv(self.num_classes, (1, 1))(x).astype(jnp.float32)


def unscanned_encoder(vit: AnatomyViT, image_params: dict) -> tuple[AnatomyViT, dict]:
  """A scanned encoder as its per-block twin, so each block's output can be captured."""
  if not vit.scan:
    return vit, image_params
  return vit.clone(scan=False), model_layers.unscan_layers(image_params, "block")


def encoder_features(vit: AnatomyViT, image_params: dict, images: jax.Array, taps: Sequence[int]) -> list[jax.Array]:
  """Patch-token grids (B, h, w, D) output by blocks `taps` (float images in [-1, 1])."""
  want = {f"block_{t}" for t in taps}
  _, state = vit.apply({"params": image_params}, images, mutable=["intermediates"],
                       capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name in want)
  b, h, w = images.shape[0], images.shape[1] // vit.patch_size, images.shape[2] // vit.patch_size
  out = []
  for t in taps:
    seq = state["intermediates"][f"block_{t}"]["__call__"][0]
    out.append(seq[:, 1 + vit.num_regions:].reshape(b, h, w, -1))
  return out


def _loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
  bce = optax.sigmoid_binary_cross_entropy(logits, masks).mean()
  p = jax.nn.sigmoid(logits)
  inter = (p * masks).sum(axis=(1, 2))
  dice = (2 * inter + 1.0) / (p.sum(axis=(1, 2)) + masks.sum(axis=(1, 2)) + 1.0)
  return bce + (1.0 - dice.mean())


def train_and_predict(vit: AnatomyViT, image_params: dict, train_images: np.ndarray, train_masks: np.ndarray,
                      eval_images: np.ndarray, mode: str, cfg: ml_collections.ConfigDict, taps: Sequence[int]
                      ) -> tuple[np.ndarray, list[float]]:
  """Train the decoder (mode 'frozen') or decoder + encoder ('finetune'); returns the eval images'
  predicted masks (N, S, S, K) bool and the training loss every 10 steps."""
  if mode not in ("frozen", "finetune"):
    raise ValueError(f"segmentation mode {mode!r}; expected 'frozen' or 'finetune'")
  levels = upsampling_levels(vit.patch_size)
  decoder = UNetDecoder(train_masks.shape[-1], levels, cfg.width, cfg.pixel_stem)
  x0 = normalize_images(jnp.asarray(train_images[:1, ..., None]))
  dec_params = decoder.init(jax.random.key(cfg.seed), encoder_features(vit, image_params, x0, taps), x0)["params"]

  def forward(params, x):
    enc = params.get("encoder", image_params)
    feats = encoder_features(vit, enc, x, taps)
    if mode == "frozen":
      feats = [jax.lax.stop_gradient(f) for f in feats]
    return decoder.apply({"params": params["decoder"]}, feats, x)

  params = {"decoder": dec_params}
  txs = {"decoder": optax.adam(cfg.learning_rate)}
  if mode == "finetune":
    params["encoder"] = image_params
    txs["encoder"] = optax.adam(cfg.learning_rate * cfg.encoder_lr_multiplier)
  tx = optax.multi_transform(txs, {k: k for k in params})
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, masks):
    x = normalize_images(images[..., None])
    loss, grads = jax.value_and_grad(lambda p: _loss(forward(p, x), masks.astype(jnp.float32)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(cfg.seed)
  n, bs = len(train_images), min(cfg.batch_size, len(train_images))
  losses = []
  for i in range(cfg.steps):
    idx = rng.choice(n, size=bs, replace=False)
    params, opt_state, loss = step(params, opt_state, jnp.asarray(train_images[idx]), jnp.asarray(train_masks[idx]))
    if i % 10 == 0 or i == cfg.steps - 1:
      losses.append(float(loss))

  predict = jax.jit(lambda p, images: forward(p, normalize_images(images[..., None])) > 0)
  preds = [np.asarray(predict(params, jnp.asarray(eval_images[i:i + bs]))) for i in range(0, len(eval_images), bs)]
  return np.concatenate(preds), losses


def mask_scores(pred: np.ndarray, true: np.ndarray, structures: Sequence[str]) -> dict[str, Any]:
  """Per-structure Dice and IoU averaged over images (an image where prediction and truth are both
  empty is skipped for that structure); `mean_dice` and `miou` average the structures."""
  out: dict[str, Any] = {"dice": {}, "iou": {}}
  for k, s in enumerate(structures):
    pairs = [metrics.dice_iou(pred[i, ..., k], true[i, ..., k]) for i in range(len(pred))]
    out["dice"][s] = metrics.mean_defined([d for d, _ in pairs])[0]
    out["iou"][s] = metrics.mean_defined([j for _, j in pairs])[0]
  out["mean_dice"] = metrics.mean_defined(list(out["dice"].values()))[0]
  out["miou"] = metrics.mean_defined(list(out["iou"].values()))[0]
  return out


def evaluate(ctx: EvalContext, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  structures = list(cfg.structures)
  if ctx.train_dir is None:
    return {"skipped": "no training folder to learn the decoder from"}
  size = ctx.eval_set.image_size
  train = load_split(ctx.train_dir, "train", size, ctx.runner.config.evals.max_examples)
  train_masks, k_train = train.mask_stack(structures)
  eval_masks, k_eval = ctx.eval_set.mask_stack(structures)
  if len(k_train) == 0 or len(k_eval) == 0:
    return {"skipped": f"the dataset's records carry no masks for all of {structures}"}
  vit, image_params = unscanned_encoder(ctx.runner.model.image, ctx.runner.params["image"])
  taps = tap_layers(vit.depth, upsampling_levels(vit.patch_size), cfg.layers)
  out: dict[str, Any] = {"structures": structures, "layers": taps, "pixel_stem": bool(cfg.pixel_stem),
                         "num_train": int(len(k_train)),
                         "num_eval": int(len(k_eval)), "eval_split": ctx.eval_set.name}
  eval_images = ctx.eval_set.images[k_eval]
  # The floor any encoder must clear: the training masks' per-pixel majority, ignoring the image.
  prior = np.broadcast_to(train_masks.mean(axis=0) > 0.5, eval_masks.shape)
  out["mean_mask_prior"] = mask_scores(prior, eval_masks, structures)
  for mode in cfg.modes:
    pred, losses = train_and_predict(vit, image_params, train.images[k_train], train_masks, eval_images,
                                     mode, cfg, taps)
    out[mode] = {**mask_scores(pred, eval_masks, structures), "train_loss": losses}
    path = ctx.picture(f"segmentation_{mode}")
    if path:
      pictures.save(pictures.segmentation_figure(eval_images[:3], eval_masks[:3], pred[:3], structures,
                                                 f"Segmentation transfer, encoder {mode}"), path)
      out[mode]["pictures"] = {"overlay": path}
  return out

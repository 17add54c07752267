"""The multi-scale objective:
L = λ_anat·(w_L1·L1 + w_GIoU·GIoU + w_presence·BCE_presence) + λ_fine·L_fine + λ_global·L_global.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from avlm_jax.losses import contrastive, detection, ring

IMPLEMENTATIONS = ("global", "ring")


def check_weights(model_cfg, loss_cfg) -> None:
  """A model without anatomy tokens (holistic) has no boxes or region embeddings to weigh."""
  if not model_cfg.image.anatomy_tokens:
    bad = [f"loss.{k}={loss_cfg[k]}" for k in ("anatomy_weight", "fine_weight") if loss_cfg[k]]
    if bad:
      raise ValueError(f"config.model.image.anatomy_tokens=False (holistic) leaves nothing for {', '.join(bad)}; "
                       "set them to 0 (configs.common.holistic does)")


def anatomy_vlm_loss(outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
                     weights: Mapping[str, jax.Array | float], implementation: str = "global",
                     ring_chunk: int = 1024, global_normalization: str = "mean"
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss, and every part reported separately (unweighted) with logit statistics.

  `implementation`: 'global' writes the alignment losses on the global arrays (GSPMD partitions
  them; the region logits are (B·R)²); 'ring' uses the shard_map versions in `losses/ring.py`
  (same values, per-device memory linear in the local batch; needs the mesh set).
  `global_normalization`: the image-level loss's reduction, 'mean' or 'siglip' (contrastive.py).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.loss.implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
  losses = ring if implementation == "ring" else contrastive
  extra = {"chunk": ring_chunk} if implementation == "ring" else {}
  b, r, e = outputs["region_emb"].shape
  if r:
    det = detection.detection_loss(outputs["boxes"], batch["boxes"], batch["box_present"])
    det["presence"] = detection.presence_loss(outputs["presence_logits"], batch["box_present"])
    # Slot texts are (B, 2R): each region's true statement, then each region's false one.
    texts, ids, has = outputs["phrase_emb"], batch["phrase_ids"], batch["has_phrase"]
    if texts.shape[1] != 2 * r:
      raise ValueError(f"expected {2 * r} slot texts per image (a true and a false one per region), "
                       f"got {texts.shape[1]}")
    fine = losses.region_phrase_loss(
        outputs["region_emb"].reshape(b * r, e),
        texts[:, :r].reshape(b * r, e), ids[:, :r].reshape(b * r, -1), has[:, :r].reshape(b * r),
        outputs["region_scale"],
        texts[:, r:].reshape(b * r, e), ids[:, r:].reshape(b * r, -1), has[:, r:].reshape(b * r),
        **extra,
    )
  else:  # the holistic ablation: no anatomy tokens, so no box or region-phrase terms
    zero = jnp.zeros((), jnp.float32)
    det = {"l1": zero, "giou": zero, "presence": zero}
    fine = {"loss": zero, "top1_acc": zero, "num_candidates": zero, "num_anchors": zero}
  glob = losses.image_label_loss(
      outputs["image_emb"], outputs["prompt_emb"], batch["labels"],
      outputs["global_scale"], outputs["global_bias"], global_normalization)
  presence_weight = weights.get("presence_weight", 0.0)
  anat = (weights["l1_weight"] * det["l1"] + weights["giou_weight"] * det["giou"]
          + presence_weight * det["presence"])
  # The weighted terms that add up to the total (gradient-signal logging reads `term_*`).
  terms = {
      "term_detection": weights["anatomy_weight"] * (weights["l1_weight"] * det["l1"]
                                                     + weights["giou_weight"] * det["giou"]),
      "term_presence": weights["anatomy_weight"] * presence_weight * det["presence"],
      "term_fine": weights["fine_weight"] * fine["loss"],
      "term_global": weights["global_weight"] * glob["loss"],
  }
  total = sum(terms.values())
  metrics = {
      "loss": total,
      **terms,
      "loss_anatomy": anat,
      "loss_l1": det["l1"],
      "loss_giou": det["giou"],
      "loss_presence": det["presence"],
      "loss_fine": fine["loss"],
      "loss_global": glob["loss"],
      "fine_top1": fine["top1_acc"],
      "fine_candidates": fine["num_candidates"],
      "fine_anchors": fine["num_anchors"],
      "global_pos_logit": glob["pos_logit"],
      "global_neg_logit": glob["neg_logit"],
      "region_scale": outputs["region_scale"],
      "global_scale": outputs["global_scale"],
      "global_bias": jnp.asarray(outputs["global_bias"], jnp.float32),
  }
  return total, metrics

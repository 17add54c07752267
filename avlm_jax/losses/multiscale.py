"""The multi-scale objective: L = λ_anat·(w_L1·L1 + w_GIoU·GIoU) + λ_fine·L_fine + λ_global·L_global."""

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
                     ring_chunk: int = 1024) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss, and every part reported separately (unweighted) with logit statistics.

  `implementation`: 'global' writes the alignment losses on the global arrays (GSPMD partitions
  them; the region logits are (B·R)²); 'ring' uses the shard_map versions in `losses/ring.py`
  (same values, per-device memory linear in the local batch; needs the mesh set).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.loss.implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
  losses = ring if implementation == "ring" else contrastive
  extra = {"chunk": ring_chunk} if implementation == "ring" else {}
  b, r, e = outputs["region_emb"].shape
  if r:
    det = detection.detection_loss(outputs["boxes"], batch["boxes"], batch["box_present"])
    fine = losses.region_phrase_loss(
        outputs["region_emb"].reshape(b * r, e),
        outputs["phrase_emb"].reshape(b * r, e),
        batch["phrase_ids"].reshape(b * r, -1),
        batch["has_phrase"].reshape(b * r),
        outputs["region_scale"],
        batch["phrase_positive"].reshape(b * r) if "phrase_positive" in batch else None,
        **extra,
    )
  else:  # the holistic ablation: no anatomy tokens, so no box or region-phrase terms
    zero = jnp.zeros((), jnp.float32)
    det = {"l1": zero, "giou": zero}
    fine = {"loss": zero, "top1_acc": zero, "num_candidates": zero}
  glob = losses.image_label_loss(
      outputs["image_emb"], outputs["prompt_emb"], batch["labels"],
      outputs["global_scale"], outputs["global_bias"])
  anat = weights["l1_weight"] * det["l1"] + weights["giou_weight"] * det["giou"]
  total = (weights["anatomy_weight"] * anat + weights["fine_weight"] * fine["loss"]
           + weights["global_weight"] * glob["loss"])
  metrics = {
      "loss": total,
      "loss_anatomy": anat,
      "loss_l1": det["l1"],
      "loss_giou": det["giou"],
      "loss_fine": fine["loss"],
      "loss_global": glob["loss"],
      "fine_top1": fine["top1_acc"],
      "fine_candidates": fine["num_candidates"],
      "global_pos_logit": glob["pos_logit"],
      "global_neg_logit": glob["neg_logit"],
      "region_scale": outputs["region_scale"],
      "global_scale": outputs["global_scale"],
      "global_bias": jnp.asarray(outputs["global_bias"], jnp.float32),
  }
  return total, metrics

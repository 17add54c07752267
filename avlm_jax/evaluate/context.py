"""What every evaluator gets: the model, the threshold and scored sets, and where pictures go.

Image encodings are computed once per set and shared by the evaluators that need them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from avlm_jax.evaluate.dataset import EvalSet
from avlm_jax.evaluate.model_runner import ModelRunner


@dataclasses.dataclass
class EvalContext:
  runner: ModelRunner
  threshold_set: EvalSet
  eval_set: EvalSet
  train_dir: str | None = None  # the triple folder whose train split segmentation trains on
  picture_dir: str | None = None  # None: no pictures
  encodings: dict = dataclasses.field(default_factory=dict)  # 'threshold'/'eval' -> model outputs
  # Per-example arrays an evaluator scored ('zeroshot_image/scores' -> (N, C)): the runner saves
  # them beside metrics.json, so confidence intervals can be bootstrapped over images later.
  kept: dict = dataclasses.field(default_factory=dict)

  def encoded(self, which: str) -> dict[str, np.ndarray]:
    """Model outputs for 'threshold' or 'eval' (boxes, presence_logits, region_emb, image_emb)."""
    if which not in self.encodings:
      s = self.threshold_set if which == "threshold" else self.eval_set
      self.encodings[which] = self.runner.encode_images(s.images)
    return self.encodings[which]

  def keep(self, evaluator: str, **arrays: Any) -> None:
    """Keep the per-example arrays of the scored split under '<evaluator>/<name>'."""
    for name, a in arrays.items():
      self.kept[f"{evaluator}/{name}"] = np.asarray(a)

  def picture(self, name: str) -> str | None:
    """A path for picture `name` (PNG), or None when pictures are off."""
    if self.picture_dir is None:
      return None
    os.makedirs(self.picture_dir, exist_ok=True)
    return os.path.join(self.picture_dir, name + ".png")

  def splits(self) -> dict[str, Any]:
    return {"threshold_split": self.threshold_set.name, "eval_split": self.eval_set.name,
            "num_threshold": len(self.threshold_set), "num_eval": len(self.eval_set)}

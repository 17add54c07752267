"""Similarities -> finding probabilities, the way the training losses read them.

Image level: the image-label loss is a sigmoid of `global_scale · cos(image, prompt) + global_bias`,
so that sigmoid is the probability of a finding.

Region level: the region-phrase loss is a softmax over candidate texts at `region_scale`. A
region's probability of a finding is that softmax over the pair {"<finding> in the <region>",
"no <finding> in the <region>"}: sigmoid(region_scale · (cos(r, positive) − cos(r, negative))).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from avlm_jax import anatomy
from avlm_jax.knowledge import label_prompts, load_knowledge_base


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def check_findings(findings: Sequence[str], where: str) -> list[str]:
  """The finding names, each known to the knowledge base; one KeyError naming every unknown one."""
  kb = load_knowledge_base()
  findings = list(findings)
  unknown = [f for f in findings if f not in kb]
  if unknown:
    raise KeyError(f"{where}: unknown finding name(s) {unknown}; close matches: "
                   f"{ {u: kb.suggestions(u) for u in unknown} }; known: {list(kb.names)}")
  if not findings:
    raise ValueError(f"{where}: no finding names given")
  return findings


def image_prompts(findings: Sequence[str], template: str, style: str) -> list[str]:
  return label_prompts(load_knowledge_base(), list(findings), template=template, style=style)


def image_probabilities(image_emb: np.ndarray, prompt_emb: np.ndarray, scale: float, bias: float) -> np.ndarray:
  """(N, E), (C, E) L2-normalised -> (N, C) probabilities."""
  return sigmoid(scale * np.asarray(image_emb, np.float64) @ np.asarray(prompt_emb, np.float64).T + bias)


def region_texts(findings: Sequence[str], positive_template: str, negative_template: str
                 ) -> tuple[list[str], list[str]]:
  """R·F positive and R·F negative statements, region-major."""
  pos, neg = [], []
  for template in (positive_template, negative_template):
    if "{finding}" not in template or "{region}" not in template:
      raise ValueError(f"region text template {template!r} must hold '{{finding}}' and '{{region}}'")
  for region in anatomy.REGION_NAMES:
    for f in findings:
      pos.append(positive_template.format(finding=f, region=region))
      neg.append(negative_template.format(finding=f, region=region))
  return pos, neg


def region_probabilities(region_emb: np.ndarray, pos_emb: np.ndarray, neg_emb: np.ndarray,
                         scale: float) -> np.ndarray:
  """(N, R, E) regions; (R, F, E) positive and negative texts -> (N, R, F) probabilities."""
  r = np.asarray(region_emb, np.float64)
  diff = np.einsum("nre,rfe->nrf", r, np.asarray(pos_emb, np.float64) - np.asarray(neg_emb, np.float64))
  return sigmoid(scale * diff)

"""Chest radiograph finding knowledge (findings.json) and the knowledge-augmented text builders."""

from __future__ import annotations

from avlm_jax.knowledge.base import (DEFAULT_PATH, NO_FINDING, Finding, KnowledgeBase, Mention,
                                     load_knowledge_base)
from avlm_jax.knowledge.prompts import (GENERIC, LABEL_STYLES, REGION_STYLES, attribute_negative,
                                        attribute_negative_options, hard_negative,
                                        hard_negative_options, label_prompts,
                                        region_text)

__all__ = [
    "DEFAULT_PATH", "NO_FINDING", "Finding", "KnowledgeBase", "Mention", "load_knowledge_base",
    "GENERIC", "LABEL_STYLES", "REGION_STYLES", "attribute_negative", "attribute_negative_options",
    "hard_negative", "hard_negative_options", "label_prompts", "region_text",
]

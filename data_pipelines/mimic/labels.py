"""The image-level label set of converted Chest ImaGenome data, and which attributes feed each label.

Chest ImaGenome writes findings as attribute triples `category|relation|name`
(`anatomicalfinding|yes|lung opacity`, `disease|no|pneumonia`, `nlp|yes|abnormal`). A label is
positive for an image when any region of its scene graph holds `<category>|yes|<source name>` for
one of the label's source names; `|no|` (negated) attributes never make a label positive.

The set is ours (the paper's 20 Chest ImaGenome classes are not published): the common thoracic
findings whose names the knowledge base resolves, so label prompts can be built for every one of
them. Label names are ImaGenome's own where the knowledge base knows them; 'pulmonary edema' stands
for ImaGenome's 'pulmonary edema/hazy opacity'. A few labels also take ImaGenome's more specific
names (a lobar collapse is an atelectasis, a hydropneumothorax a pneumothorax, a nodule or mass a
lung lesion).
"""

from __future__ import annotations

IMAGENOME_LABELS: tuple[str, ...] = (
    "lung opacity",
    "pleural effusion",
    "atelectasis",
    "enlarged cardiac silhouette",
    "pulmonary edema",
    "consolidation",
    "pneumonia",
    "pneumothorax",
    "lung lesion",
    "mediastinal widening",
)

# label -> ImaGenome attribute names that make it positive (a label not listed is its own source).
LABEL_SOURCES: dict[str, tuple[str, ...]] = {
    "atelectasis": ("atelectasis", "linear/patchy atelectasis", "lobar/segmental collapse"),
    "pulmonary edema": ("pulmonary edema/hazy opacity",),
    "pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "lung lesion": ("lung lesion", "mass/nodule (not otherwise specified)", "multiple masses/nodules"),
}

# The category of ImaGenome's per-phrase normal/abnormal flag (not a finding).
NLP_CATEGORY = "nlp"
ABNORMAL = "abnormal"  # region_findings carries this name where ImaGenome flags the region abnormal


def label_by_source(labels: tuple[str, ...] = IMAGENOME_LABELS) -> dict[str, tuple[str, ...]]:
  """ImaGenome attribute name -> the labels it makes positive."""
  out: dict[str, list[str]] = {}
  for label in labels:
    for source in LABEL_SOURCES.get(label, (label,)):
      out.setdefault(source, []).append(label)
  return {k: tuple(v) for k, v in out.items()}

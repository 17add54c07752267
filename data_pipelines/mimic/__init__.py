"""MIMIC-CXR-JPG + Chest ImaGenome -> ArrayRecord triple shards.

`layout` (where files are, CSVs), `scene_graph` (boxes, phrases, labels of one graph), `labels`
(the image-level label set), `images` (JPEG -> stored bytes, box transform), `reports` (FINDINGS /
IMPRESSION), `bad_input` (skip reasons, errors naming the file), `convert` (plan, multi-process
shards, manifest and resume, summary), `tfds_builder` (the TFDS dataset over converted folders).
"""

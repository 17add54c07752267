"""Bad source files: the reasons the converter counts, and the error that names the file.

Without `--strict` a study hit by one of these is skipped and counted under its reason; with
`--strict` the first one stops the conversion with its message.
"""

from __future__ import annotations

MISSING_STUDY = "missing_study"            # a split CSV row whose study MIMIC-CXR-JPG does not have
MISSING_IMAGE = "missing_image"            # the study is there, its chosen JPEG is not
CORRUPT_IMAGE = "truncated_or_corrupt_image"
MISSING_SCENE_GRAPH = "missing_scene_graph"
MALFORMED_SCENE_GRAPH = "malformed_scene_graph"  # not JSON, or fields of the wrong type/shape
UNKNOWN_REGION = "unknown_region"          # an object's bbox_name is not a Chest ImaGenome region
MISSING_REPORT = "missing_report"          # no report file, or an empty one

REASONS = (MISSING_STUDY, MISSING_IMAGE, CORRUPT_IMAGE, MISSING_SCENE_GRAPH, MALFORMED_SCENE_GRAPH,
           UNKNOWN_REGION, MISSING_REPORT)


class BadInput(Exception):
  """One bad source file: `reason` is one of REASONS, `path` the file, the message says what is wrong."""

  def __init__(self, reason: str, path: str, detail: str):
    assert reason in REASONS, reason
    super().__init__(f"{path}: {detail} [{reason}]")
    self.reason = reason
    self.path = path


class ConversionError(RuntimeError):
  """A conversion stopped: a bad input under --strict, or a folder made with other settings."""

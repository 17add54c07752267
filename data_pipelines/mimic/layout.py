"""Where things are in the published MIMIC-CXR-JPG and Chest ImaGenome trees, and their CSVs.

    <mimic_root>/files/p10/p10000032/s50414267/<dicom_id>.jpg
    <mimic_root>/mimic-cxr-2.0.0-metadata.csv[.gz]      dicom_id, subject_id, study_id, ViewPosition, ...
    <reports_root>/files/p10/p10000032/s50414267.txt    (MIMIC-CXR's mimic-cxr-reports.zip;
                                                         default <mimic_root>/mimic-cxr-reports)
    <imagenome_root>/silver_dataset/scene_graph/<dicom_id>_SceneGraph.json
    <imagenome_root>/silver_dataset/splits/{train,valid,test}.csv   dicom_id, subject_id, study_id, ...
    <imagenome_root>/silver_dataset/splits/images_to_avoid.csv      (optional) dicom_id, ...
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import os

from data_pipelines.mimic import bad_input

METADATA_NAME = "mimic-cxr-2.0.0-metadata.csv"
# ImaGenome split file -> our split name (the training pipeline reads 'train' and 'validation').
SPLITS = {"train": "train", "valid": "validation", "test": "test"}
VIEW_ORDER = ("PA", "AP")  # the frontal view a study is represented by: PA first, then AP


@dataclasses.dataclass(frozen=True)
class Roots:
  mimic: str
  imagenome: str
  reports: str = ""  # '' -> <mimic>/mimic-cxr-reports

  @property
  def reports_dir(self) -> str:
    return self.reports or os.path.join(self.mimic, "mimic-cxr-reports")


@dataclasses.dataclass(frozen=True)
class Study:
  """One planned record: the study, and the image chosen to represent it."""
  split: str
  subject_id: str
  study_id: str
  dicom_id: str
  view: str


def _patient_dir(subject_id: str) -> str:
  return os.path.join("files", f"p{subject_id[:2]}", f"p{subject_id}")


def study_dir(roots: Roots, s: Study) -> str:
  return os.path.join(roots.mimic, _patient_dir(s.subject_id), f"s{s.study_id}")


def image_path(roots: Roots, s: Study) -> str:
  return os.path.join(study_dir(roots, s), f"{s.dicom_id}.jpg")


def report_path(roots: Roots, s: Study) -> str:
  return os.path.join(roots.reports_dir, _patient_dir(s.subject_id), f"s{s.study_id}.txt")


def scene_graph_path(roots: Roots, dicom_id: str) -> str:
  return os.path.join(roots.imagenome, "silver_dataset", "scene_graph", f"{dicom_id}_SceneGraph.json")


def split_csv_path(roots: Roots, imagenome_split: str) -> str:
  return os.path.join(roots.imagenome, "silver_dataset", "splits", f"{imagenome_split}.csv")


def _open_csv(path: str):
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def _rows(path: str, required: tuple[str, ...]):
  """Dict rows of a CSV, after checking its header has `required` columns."""
  with _open_csv(path) as f:
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
      raise bad_input.ConversionError(f"{path}: lacks column(s) {missing}; its header is {reader.fieldnames}")
    for line, row in enumerate(reader, start=2):
      yield line, row


def _id(value: str, path: str, line: int, column: str) -> str:
  """An integer id as digits ('10000032'; '10000032.0' as pandas may write it)."""
  v = (value or "").strip()
  if v.endswith(".0"):
    v = v[:-2]
  if not v.isdigit():
    raise bad_input.ConversionError(f"{path}, line {line}: {column}={value!r} is not an integer id")
  return v


def read_metadata(roots: Roots) -> tuple[dict[str, str], set[str]]:
  """(dicom_id -> ViewPosition, the set of study ids) from MIMIC-CXR-JPG's metadata CSV."""
  base = os.path.join(roots.mimic, METADATA_NAME)
  path = next((p for p in (base, base + ".gz") if os.path.exists(p)), None)
  if path is None:
    raise bad_input.ConversionError(f"{base}[.gz] does not exist: is {roots.mimic!r} the MIMIC-CXR-JPG root?")
  views, studies = {}, set()
  for line, row in _rows(path, ("dicom_id", "study_id", "ViewPosition")):
    views[row["dicom_id"].strip()] = (row["ViewPosition"] or "").strip().upper()
    studies.add(_id(row["study_id"], path, line, "study_id"))
  return views, studies


def read_split(roots: Roots, imagenome_split: str) -> list[tuple[int, str, str, str]]:
  """(line, dicom_id, subject_id, study_id) rows of one ImaGenome split CSV."""
  path = split_csv_path(roots, imagenome_split)
  if not os.path.exists(path):
    raise bad_input.ConversionError(f"{path} does not exist: is {roots.imagenome!r} the Chest ImaGenome root?")
  return [(line, row["dicom_id"].strip(), _id(row["subject_id"], path, line, "subject_id"),
           _id(row["study_id"], path, line, "study_id"))
          for line, row in _rows(path, ("dicom_id", "subject_id", "study_id"))]


def images_to_avoid(roots: Roots) -> set[str]:
  """dicom_ids ImaGenome asks not to train on (its gold-set patients); empty when the file is absent."""
  path = os.path.join(roots.imagenome, "silver_dataset", "splits", "images_to_avoid.csv")
  if not os.path.exists(path):
    return set()
  return {row["dicom_id"].strip() for _, row in _rows(path, ("dicom_id",))}

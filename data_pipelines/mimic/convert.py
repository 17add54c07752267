"""MIMIC-CXR-JPG + Chest ImaGenome -> ArrayRecord triple shards: plan, convert shards, resume, report.

    split CSVs + metadata ──plan──> per split, studies sorted by (subject, study), cut into shards
    shard task ──worker──> for each study: image, scene graph, report -> Triple, or a counted skip
               ──> <name>.tmp, sha256, rename to `{split}-{i:05d}-of-{n:05d}.array_record`
    main process ──> manifest.json (atomic rewrite after every shard) + progress line with ETA
                 ──> dataset_info.json and a summary of what was written and skipped, and why.

The plan is a pure function of the inputs and the options, so a rerun plans the same shards; a
shard whose manifest entry has the same plan hash and whose file still has the recorded sha256 is
skipped. Any other shard (never finished, killed mid-write, changed, or planned differently) is
converted again. A folder made with other options (size, format, ...) is refused, not mixed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from typing import Iterable, TextIO

from avlm_jax.paths import file_sha256
from data_pipelines import schema
from data_pipelines.mimic import bad_input, images, labels, layout, reports, scene_graph

CONVERTER_VERSION = 1
MANIFEST = "manifest.json"
DATASET_NAME = "mimic_imagenome"
_EXAMPLES_KEPT = 5  # file paths kept per skip reason, for the summary


@dataclasses.dataclass(frozen=True)
class Options:
  image_size: int = 512
  fmt: str = "png"
  pad: bool = False
  shard_size: int = 1000
  strict: bool = False
  label_names: tuple[str, ...] = labels.IMAGENOME_LABELS

  def __post_init__(self):
    if self.fmt not in images.FORMATS:
      raise ValueError(f"--format={self.fmt!r}; expected one of {images.FORMATS}")
    if self.image_size < 8 or self.shard_size < 1:
      raise ValueError(f"image_size={self.image_size} (>= 8) and shard_size={self.shard_size} (>= 1)")

  def params(self) -> dict:
    """What the shards' bytes depend on; a folder is only resumed with the same params."""
    return {"converter_version": CONVERTER_VERSION, "schema_version": schema.SCHEMA_VERSION,
            "image_size": self.image_size, "format": self.fmt, "pad": self.pad,
            "shard_size": self.shard_size, "label_names": list(self.label_names)}


@dataclasses.dataclass
class ShardTask:
  name: str
  split: str
  studies: list[layout.Study]
  plan_sha256: str


class Tally:
  """Skip counts by reason, with the first few files of each, and other counters."""

  def __init__(self):
    self.skipped: collections.Counter = collections.Counter()
    self.examples: dict[str, list[str]] = {}
    self.notes: collections.Counter = collections.Counter()

  def skip(self, reason: str, path: str) -> None:
    self.skipped[reason] += 1
    kept = self.examples.setdefault(reason, [])
    if len(kept) < _EXAMPLES_KEPT:
      kept.append(path)

  def bad(self, err: bad_input.BadInput, strict: bool) -> None:
    if strict:
      raise bad_input.ConversionError(f"bad input (--strict): {err}")
    self.skip(err.reason, err.path)

  def as_dict(self) -> dict:
    return {"skipped": dict(self.skipped), "examples": self.examples, "notes": dict(self.notes)}

  def add(self, d: dict) -> None:
    self.skipped.update(d["skipped"])
    self.notes.update(d["notes"])
    for reason, paths in d["examples"].items():
      kept = self.examples.setdefault(reason, [])
      kept.extend(paths[:_EXAMPLES_KEPT - len(kept)])


# --- planning --------------------------------------------------------------------------------

def plan(roots: layout.Roots, opts: Options, tally: Tally) -> list[ShardTask]:
  """Every shard of every split, each with the studies it will hold (see module docstring)."""
  views, known_studies = layout.read_metadata(roots)
  avoid = layout.images_to_avoid(roots)
  rank = {v: i for i, v in enumerate(layout.VIEW_ORDER)}
  tasks = []
  for imagenome_split, split in layout.SPLITS.items():
    by_study: dict[tuple[str, str], list[str]] = {}
    csv_path = layout.split_csv_path(roots, imagenome_split)
    for line, dicom, subject, study in layout.read_split(roots, imagenome_split):
      if dicom in avoid:
        tally.skip("images_to_avoid", dicom)
        continue
      if study not in known_studies:
        tally.bad(bad_input.BadInput(bad_input.MISSING_STUDY, csv_path,
                                     f"line {line}: study {study} (subject {subject}) is not in "
                                     f"MIMIC-CXR-JPG's {layout.METADATA_NAME}"), opts.strict)
        continue
      by_study.setdefault((subject, study), []).append(dicom)
    studies = []
    for (subject, study), dicoms in sorted(by_study.items()):
      dicoms = sorted(set(dicoms), key=lambda d: (rank.get(views.get(d, ""), len(rank)), d))
      chosen = dicoms[0]
      if views.get(chosen) not in rank:
        tally.notes["chosen_view_not_pa_or_ap"] += 1  # ImaGenome lists frontal images only
      for other in dicoms[1:]:
        tally.skip("other_frontal_image_of_study", other)
      studies.append(layout.Study(split, subject, study, chosen, views.get(chosen, "")))
    n = -(-len(studies) // opts.shard_size)
    for i in range(n):
      chunk = studies[i * opts.shard_size:(i + 1) * opts.shard_size]
      digest = hashlib.sha256(json.dumps([opts.params(), [dataclasses.astuple(s) for s in chunk]])
                              .encode()).hexdigest()
      tasks.append(ShardTask(f"{split}-{i:05d}-of-{n:05d}{schema.SHARD_SUFFIX}", split, chunk, digest))
  return tasks


# --- one study, one shard (runs in worker processes) -------------------------------------------

def make_triple(roots: layout.Roots, study: layout.Study, opts: Options,
                notes: collections.Counter) -> schema.Triple:
  """One study -> its Triple; BadInput naming the file when a source is missing or broken."""
  try:
    image, geo = images.load_resized(layout.image_path(roots, study), opts.image_size, opts.fmt, opts.pad)
  except bad_input.BadInput as e:
    sdir = layout.study_dir(roots, study)
    if e.reason == bad_input.MISSING_IMAGE and not os.path.isdir(sdir):
      raise bad_input.BadInput(bad_input.MISSING_STUDY, sdir, "study folder does not exist") from None
    raise
  graph_path = layout.scene_graph_path(roots, study.dicom_id)
  graph = scene_graph.parse(scene_graph.load(graph_path, study.dicom_id), graph_path, opts.label_names)
  report, from_sections = reports.read(layout.report_path(roots, study))
  boxes, present, box_stats = images.transform_boxes(graph.boxes, geo)
  notes.update({f"boxes_{k}": v for k, v in box_stats.items()})
  notes["regions_without_object"] += graph.regions_missing
  notes["report_without_findings_or_impression"] += not from_sections
  for f in graph.findings:
    notes[f"label:{f}"] += 1
  for fs in graph.region_findings:
    for f in fs:
      notes[f"region_finding:{f}"] += 1
  return schema.Triple(
      id=f"p{study.subject_id}/s{study.study_id}/{study.dicom_id}", image=image, report=report,
      boxes=boxes, box_present=present, phrases=graph.phrases, findings=graph.findings,
      region_findings=graph.region_findings)


def convert_shard(task: ShardTask, roots: layout.Roots, opts: Options, out_dir: str) -> dict:
  """Write one shard (via a .tmp file, renamed when complete); its manifest entry."""
  from array_record.python import array_record_module

  start = time.perf_counter()
  path = os.path.join(out_dir, task.name)
  tally = Tally()
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
  records = 0
  try:
    for study in task.studies:
      try:
        triple = make_triple(roots, study, opts, tally.notes)
      except bad_input.BadInput as e:
        tally.bad(e, opts.strict)
        continue
      writer.write(schema.encode(triple))
      records += 1
  finally:
    writer.close()
  os.replace(path + ".tmp", path)
  return {"name": task.name, "split": task.split, "planned": len(task.studies), "records": records,
          "sha256": file_sha256(path), "plan_sha256": task.plan_sha256,
          "seconds": round(time.perf_counter() - start, 3), **tally.as_dict()}


def _convert_shard_star(args) -> dict:
  return convert_shard(*args)


# --- manifest, progress, driver --------------------------------------------------------------

def _write_json_atomic(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def load_manifest(out_dir: str, params: dict) -> dict:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return {"version": 1, "params": params, "shards": {}}
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise bad_input.ConversionError(f"{path} is not valid JSON ({e}); delete it to convert from scratch") from None
  old = manifest.get("params") or {}
  if old != params:
    keys = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
    raise bad_input.ConversionError(
        f"{out_dir!r} holds a conversion made with {', '.join(f'{k}={old.get(k)!r}' for k in keys)}; "
        f"this run asks for {', '.join(f'{k}={params.get(k)!r}' for k in keys)}. Rerun with the same "
        "options to resume, or use another --out (or delete that folder)")
  return manifest


def shard_state(task: ShardTask, manifest: dict, out_dir: str) -> str:
  """'done', or why the shard must be (re)converted."""
  entry = manifest["shards"].get(task.name)
  path = os.path.join(out_dir, task.name)
  if entry is None:
    return "not_converted_yet"
  if entry.get("plan_sha256") != task.plan_sha256:
    return "inputs_changed"
  if not os.path.exists(path):
    return "file_missing"
  if file_sha256(path) != entry.get("sha256"):
    return "checksum_mismatch"
  return "done"


class Progress:
  """One stderr line per finished shard: shards, records, rate and ETA of this run."""

  def __init__(self, total_shards: int, done_shards: int, todo_records: int, stream: TextIO):
    self.total_shards, self.done_shards = total_shards, done_shards
    self.todo_records, self.records = todo_records, 0
    self.stream = stream
    self.start = time.perf_counter()
    self.tty = hasattr(stream, "isatty") and stream.isatty()

  def update(self, planned: int) -> None:
    self.done_shards += 1
    self.records += planned
    elapsed = time.perf_counter() - self.start
    rate = self.records / max(elapsed, 1e-9)
    eta = (self.todo_records - self.records) / max(rate, 1e-9)
    line = (f"shards {self.done_shards}/{self.total_shards} | studies {self.records:,}/{self.todo_records:,}"
            f" | {rate:,.1f} studies/s | elapsed {_hms(elapsed)} | ETA {_hms(eta)}")
    self.stream.write(("\r" + line) if self.tty else line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")


def _hms(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _remove_unplanned(out_dir: str, planned: set[str], manifest: dict) -> list[str]:
  """Shards (and .tmp leftovers) of another plan would be read by the pipeline: delete them."""
  removed = []
  for f in sorted(os.listdir(out_dir)):
    if (f.endswith(schema.SHARD_SUFFIX) and f not in planned) or f.endswith(schema.SHARD_SUFFIX + ".tmp"):
      os.remove(os.path.join(out_dir, f))
      removed.append(f)
  for name in list(manifest["shards"]):
    if name not in planned:
      del manifest["shards"][name]
  return removed


def convert(roots: layout.Roots, out_dir: str, opts: Options, *, workers: int = 1,
            stream: TextIO = sys.stderr) -> dict:
  """Convert (or finish converting) into `out_dir`; returns the summary (also in dataset_info.json)."""
  os.makedirs(out_dir, exist_ok=True)
  manifest = load_manifest(out_dir, opts.params())
  plan_tally = Tally()
  tasks = plan(roots, opts, plan_tally)
  removed = _remove_unplanned(out_dir, {t.name for t in tasks}, manifest)
  states = {t.name: shard_state(t, manifest, out_dir) for t in tasks}
  todo = [t for t in tasks if states[t.name] != "done"]
  progress = Progress(len(tasks), len(tasks) - len(todo), sum(len(t.studies) for t in todo), stream)
  manifest_path = os.path.join(out_dir, MANIFEST)
  _write_json_atomic(manifest_path, manifest)

  def finished(entry: dict) -> None:
    manifest["shards"][entry["name"]] = entry
    _write_json_atomic(manifest_path, manifest)
    progress.update(entry["planned"])

  args = [(t, roots, opts, out_dir) for t in todo]
  try:
    if workers <= 1 or len(todo) <= 1:
      for a in args:
        finished(convert_shard(*a))
    else:
      # spawn: workers start clean (no inherited locks or file handles from the caller).
      with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
        for entry in pool.imap_unordered(_convert_shard_star, args):
          finished(entry)
  finally:
    progress.close()

  summary = summarize(tasks, states, manifest, plan_tally, removed)
  schema.write_info(out_dir, {
      "name": DATASET_NAME, "label_names": list(opts.label_names), "splits": summary["records"],
      "params": opts.params(), "summary": summary,
      "source": "MIMIC-CXR-JPG 2.0.0 + Chest ImaGenome 1.0.0 silver scene graphs"})
  stream.write(format_summary(summary, out_dir) + "\n")
  return summary


def summarize(tasks: list[ShardTask], states: dict[str, str], manifest: dict, plan_tally: Tally,
              removed: list[str]) -> dict:
  tally = Tally()
  tally.add(plan_tally.as_dict())
  records: collections.Counter = collections.Counter()
  for t in tasks:
    entry = manifest["shards"][t.name]
    tally.add(entry)
    records[t.split] += entry["records"]
  notes = tally.notes
  return {
      "records": {s: records[s] for s in layout.SPLITS.values() if s in records},
      "shards": {"total": len(tasks),
                 "already_done": sum(s == "done" for s in states.values()),
                 "converted": dict(collections.Counter(s for s in states.values() if s != "done")),
                 "removed_unplanned": removed},
      "skipped": {r: tally.skipped[r] for r in sorted(tally.skipped)},
      "bad_input": sum(tally.skipped[r] for r in bad_input.REASONS),
      "examples": tally.examples,
      "boxes": {k[len("boxes_"):]: v for k, v in sorted(notes.items()) if k.startswith("boxes_")},
      "regions_without_object": notes["regions_without_object"],
      "report_without_findings_or_impression": notes["report_without_findings_or_impression"],
      "chosen_view_not_pa_or_ap": notes["chosen_view_not_pa_or_ap"],
      "label_counts": {k[len("label:"):]: v for k, v in sorted(notes.items()) if k.startswith("label:")},
      "region_finding_counts": {k[len("region_finding:"):]: v for k, v in sorted(notes.items())
                                if k.startswith("region_finding:")},
  }


def format_summary(summary: dict, out_dir: str) -> str:
  recs = summary["records"]
  sh = summary["shards"]
  lines = [f"wrote {sum(recs.values()):,} records to {out_dir}: "
           + ", ".join(f"{s} {n:,}" for s, n in recs.items()),
           f"shards: {sh['total']} planned, {sh['already_done']} already done (checksum verified), "
           f"{sum(sh['converted'].values())} converted now"
           + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(sh['converted'].items()))})" if sh["converted"] else "")
           + (f"; removed {len(sh['removed_unplanned'])} shard file(s) of another plan"
              if sh["removed_unplanned"] else "")]
  if summary["skipped"]:
    lines.append(f"skipped {sum(summary['skipped'].values()):,} ({summary['bad_input']:,} bad input):")
    for reason, n in summary["skipped"].items():
      kind = "bad input" if reason in bad_input.REASONS else "by design"
      example = summary["examples"].get(reason, [""])[0]
      lines.append(f"  {reason}: {n:,} [{kind}]" + (f" e.g. {example}" if example else ""))
  else:
    lines.append("skipped: nothing")
  boxes = summary["boxes"]
  lines.append(f"boxes: {boxes.get('dropped_zero_area', 0):,} dropped (zero area), "
               f"{boxes.get('dropped_outside_image', 0):,} dropped (outside the image), "
               f"{boxes.get('clipped', 0):,} clipped; {summary['regions_without_object']:,} regions "
               f"without an object; {summary['report_without_findings_or_impression']:,} reports "
               f"without FINDINGS/IMPRESSION (whole text kept)")
  return "\n".join(lines)


def iter_triples(out_dir: str, split: str) -> Iterable[schema.Triple]:
  """Every record of a converted split, in shard order (for checks and tools)."""
  from array_record.python import array_record_data_source

  for path in schema.shard_paths(out_dir, split):
    source = array_record_data_source.ArrayRecordDataSource([path])
    for i in range(len(source)):
      yield schema.decode(source[i])

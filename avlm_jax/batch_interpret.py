"""Interpret a folder (or a glob) of radiographs in batches: `python -m launch.interpret`.

    from avlm_jax import batch_interpret, interpret
    summary = batch_interpret.interpret_folder(interpret.load("workdir/tiny"), "scans/", "scans_out/")

Writes into the output folder:
  json/<name>.json     per image: the anatomy boxes (xyxy in the input's pixels) with each box's
                       presence probability and the region's finding probabilities, and the
                       image-level finding probabilities
  overlays/<name>.png  the radiograph with its boxes and top findings (avlm_jax/evaluate/overlay.py)
  findings.csv         a row per interpreted image: its image-level probabilities and top finding
  errors.csv           a row per file that could not be read, with the reason (a header alone if none)
  index.html           every image's overlay and top findings, sortable and filterable by finding

<name> is the file's path relative to the folder given (for a glob, to the matches' common folder),
so files of one name in different sub-folders stay apart. Every path written is relative to the
output folder. A file that cannot be read is printed and listed with its reason, and the rest
carry on. Scores are `Interpreter.score`'s, the same as `Interpreter.interpret` gives one image.

Reading and decoding run in threads ahead of the model. The model runs on fixed-size batches (one
compile), jitted over the config's mesh on this host's devices: parameters replicated, each batch
split over the data-parallel axes ('data', 'fsdp'). A batch is in flight on the devices while the
host scores and writes the one before.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import glob
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from avlm_jax import sharding
from avlm_jax.config_check import ConfigValueError
from avlm_jax.evaluate import interpret_html, overlay
from avlm_jax.evaluate.model_runner import ModelRunner
from avlm_jax.evaluate.radiograph_io import DICOM_SUFFIXES, ImageReadError, read_radiograph
from avlm_jax.interpret import Interpreter, Scores
from avlm_jax.train.step import normalize_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + DICOM_SUFFIXES
JSON_DIR, OVERLAY_DIR = "json", "overlays"
CSV_NAME, ERRORS_NAME, HTML_NAME = "findings.csv", "errors.csv", "index.html"
ENCODED = ("boxes", "presence_logits", "region_emb", "image_emb")


@dataclasses.dataclass(frozen=True)
class Input:
  path: str  # absolute
  name: str  # relative to the inputs' root, '/'-separated: names the outputs


@dataclasses.dataclass
class Failure:
  file: str    # the input, relative to the output folder
  name: str
  reason: str  # the reader's message, without the path


@dataclasses.dataclass
class Summary:
  out_dir: str
  findings: list[str]
  records: list[dict]      # per interpreted image: name, file, json, overlay, width, height, image_findings
  failures: list[Failure]
  seconds: float           # the whole run, compile included
  batch_size: int
  num_devices: int

  @property
  def images_per_s(self) -> float:
    return len(self.records) / max(self.seconds, 1e-9)


def _inside(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


def find_images(spec: str, exclude: Sequence[str] = ()) -> list[Input]:
  """The radiographs `spec` names: a folder, searched recursively for PNG, JPEG and DICOM files and
  for files without a suffix (as DICOM folders often hold; hidden ones are skipped), or a glob
  pattern (every file it matches; `**` is recursive). Files under `exclude` folders are left out
  (the outputs of an earlier run into a folder inside the input)."""
  exclude = [os.path.abspath(e) for e in exclude]
  if os.path.isdir(spec):
    root = os.path.abspath(spec)
    paths = []
    for folder, subfolders, files in os.walk(root):
      subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
      for f in sorted(files):
        suffix = os.path.splitext(f)[1].lower()
        if not f.startswith(".") and (suffix in IMAGE_SUFFIXES or not suffix):
          paths.append(os.path.join(folder, f))
    paths = [p for p in paths if not any(_inside(p, e) for e in exclude)]
    if not paths:
      raise FileNotFoundError(f"{spec}: the folder holds no PNG, JPEG or DICOM files")
  else:
    paths = sorted(os.path.abspath(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    paths = [p for p in paths if not any(_inside(p, e) for e in exclude)]
    if not paths:
      raise FileNotFoundError(f"{spec}: no such folder, and no file matches it as a glob pattern")
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
  return [Input(p, os.path.relpath(p, root).replace(os.sep, "/")) for p in paths]


def inference_mesh(config, devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
  """The config's mesh over `devices`; a mesh laid out for other hardware (fixed sizes that do not
  fit these devices, e.g. a pod's) becomes every device on the data axis."""
  try:
    return sharding.make_mesh(config.mesh.to_dict(), devices)
  except ConfigValueError:
    return sharding.make_mesh({"data": -1}, devices)


class BatchEncoder:
  """The image encoder jitted over a mesh for fixed-size batches: parameters replicated on every
  device, each batch split over the data-parallel axes. `batch_size` is rounded up to a multiple
  of the devices the batch is split over."""

  def __init__(self, runner: ModelRunner, batch_size: int, devices: Sequence[jax.Device] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; expected a positive number of images")
    self.mesh = inference_mesh(runner.config, list(devices or jax.local_devices()))
    ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_size = -(-batch_size // ways) * ways
    self.image_size = runner.config.data.image_size
    replicated, split = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
    self._split = split
    self._params = jax.device_put(runner.params, replicated)
    model = runner.model

    def encode(params, images):
      out = model.apply({"params": params}, normalize_images(images), method=model.encode_image)
      return {k: out[k] for k in ENCODED}

    self._encode = jax.jit(encode, in_shardings=(replicated, split))

  def dispatch(self, images: np.ndarray) -> tuple[dict[str, jax.Array], int]:
    """Start encoding up to `batch_size` uint8 images (N, S, S); returns at once (JAX dispatch is
    asynchronous). `fetch` waits for the result."""
    n, s = len(images), self.image_size
    if not 0 < n <= self.batch_size or images.shape[1:] != (s, s):
      raise ValueError(f"a batch of {images.shape}; this encoder takes 1..{self.batch_size} images of ({s}, {s})")
    padded = np.zeros((self.batch_size, s, s, 1), np.uint8)
    padded[:n, ..., 0] = images
    return self._encode(self._params, jax.device_put(padded, self._split)), n

  @staticmethod
  def fetch(handle: tuple[dict[str, jax.Array], int]) -> dict[str, np.ndarray]:
    out, n = handle
    return {k: np.asarray(v)[:n] for k, v in out.items()}

  def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Any number of images (N, S, S) -> numpy outputs, as `ModelRunner.encode_images`."""
    parts = [self.fetch(self.dispatch(images[i:i + self.batch_size]))
             for i in range(0, len(images), self.batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ENCODED}


@dataclasses.dataclass
class _Read:
  input: Input
  shape: tuple[int, int]  # (H, W) as read
  model_input: np.ndarray  # (S, S) letterboxed
  display: np.ndarray      # the overlay's background, shrunk


def _read(item: Input, interpreter: Interpreter) -> _Read | tuple[Input, str]:
  try:
    pixels = read_radiograph(item.path)
    return _Read(item, pixels.shape, interpreter.model_input(pixels), overlay.shrink(pixels))
  except Exception as e:  # noqa: BLE001: one bad file must not stop a folder, whatever its reader raised
    reason = str(e) if isinstance(e, ImageReadError) else f"{type(e).__name__}: {e}"
    prefix = item.path + ": "
    reason = reason[len(prefix):] if reason.startswith(prefix) else reason
    return item, reason.replace(item.path, item.name)  # no absolute paths in the outputs


def _read_ahead(pool: concurrent.futures.Executor, inputs: Sequence[Input], batch_size: int,
                read: Callable[[Input], Any], depth: int = 2) -> Iterator[list[concurrent.futures.Future]]:
  """Batches of read futures, `depth` batches submitted ahead of the one handed out."""
  pending: collections.deque = collections.deque()
  for i in range(0, len(inputs), batch_size):
    pending.append([pool.submit(read, x) for x in inputs[i:i + batch_size]])
    if len(pending) > depth:
      yield pending.popleft()
  yield from pending


def image_json(interpreter: Interpreter, scores: Scores, i: int, *, file: str, name: str, overlay_path: str,
               shape: tuple[int, int]) -> dict:
  """Image `i` of `scores` as the JSON written per image."""
  findings = interpreter.findings
  image = {f: float(scores.image_probs[i, c]) for c, f in enumerate(findings)}
  top = max(image, key=image.get)
  return {
      "file": file, "name": name, "overlay": overlay_path, "height": int(shape[0]), "width": int(shape[1]),
      "image_findings": image,
      "top_finding": {"finding": top, "probability": image[top]},
      "regions": [{"region": region, "box_xyxy": [float(v) for v in scores.boxes[i, r]],
                   "presence": float(scores.presence[i, r]),
                   "findings": {f: float(scores.region_probs[i, r, c]) for c, f in enumerate(findings)}}
                  for r, region in enumerate(interpreter.regions)],
  }


def _write_image(out_dir: str, record: dict, read: _Read, scores: Scores, i: int, findings: Sequence[str]) -> None:
  json_path = os.path.join(out_dir, record["json"])
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(record["content"], f, indent=1)
  scale = read.display.shape[0] / read.shape[0]
  picture = overlay.overlay_image(read.display, scores.boxes[i], scores.region_probs[i], scores.image_probs[i],
                                  findings, scale)
  overlay_path = os.path.join(out_dir, record["overlay"])
  os.makedirs(os.path.dirname(overlay_path), exist_ok=True)
  picture.save(overlay_path, compress_level=1)  # a third of the default level's time, files ~15 % larger


def _say(message: str) -> None:
  from tqdm import tqdm
  tqdm.write(message, file=sys.stderr)  # above the progress bar, not through it


def interpret_folder(interpreter: Interpreter, images: str, out_dir: str, *, batch_size: int = 32,
                     workers: int | None = None, progress: bool = True,
                     devices: Sequence[jax.Device] | None = None, encoder: BatchEncoder | None = None) -> Summary:
  """Interpret every radiograph `images` names (a folder or a glob; `find_images`) into `out_dir`
  (the files are listed in this module's docstring). `progress`: a progress bar with an ETA on
  stderr. A file that cannot be read is printed with its reason and listed; FileNotFoundError if
  `images` names no file at all. `encoder`: a `BatchEncoder` of this interpreter's runner to reuse
  (it is compiled already), instead of one built for `batch_size` and `devices`."""
  from tqdm import tqdm

  start = time.perf_counter()
  out_dir = os.path.abspath(out_dir)
  inputs = find_images(images, exclude=[os.path.join(out_dir, JSON_DIR), os.path.join(out_dir, OVERLAY_DIR)])
  encoder = encoder or BatchEncoder(interpreter.runner, batch_size, devices)
  os.makedirs(out_dir, exist_ok=True)
  rel = lambda path: os.path.relpath(path, out_dir).replace(os.sep, "/")
  findings = list(interpreter.findings)
  records: list[dict] = []
  failures: list[Failure] = []
  writes: collections.deque = collections.deque()
  bar = tqdm(total=len(inputs), unit="image", disable=not progress, file=sys.stderr, dynamic_ncols=True)

  def finish(reads: list[_Read], handle) -> None:
    scores = interpreter.score(encoder.fetch(handle), [r.shape for r in reads])
    for i, read in enumerate(reads):
      name = read.input.name
      record = {"name": name, "file": rel(read.input.path), "json": f"{JSON_DIR}/{name}.json",
                "overlay": f"{OVERLAY_DIR}/{name}.png", "height": read.shape[0], "width": read.shape[1]}
      content = image_json(interpreter, scores, i, file=record["file"], name=name, overlay_path=record["overlay"],
                           shape=read.shape)
      record["image_findings"] = content["image_findings"]
      writes.append(pool.submit(_write_image, out_dir, {**record, "content": content}, read, scores, i, findings))
      records.append(record)
    while len(writes) > 4 * encoder.batch_size:  # bound the pictures waiting to be written
      writes.popleft().result()
    bar.update(len(reads))

  with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
    in_flight = None
    for batch in _read_ahead(pool, inputs, encoder.batch_size, lambda item: _read(item, interpreter)):
      reads = []
      for future in batch:
        result = future.result()
        if isinstance(result, _Read):
          reads.append(result)
        else:
          item, reason = result
          failures.append(Failure(rel(item.path), item.name, reason))
          _say(f"cannot read {item.name}: {reason}")
          bar.update(1)
          bar.set_postfix(failed=len(failures))
      dispatched = (reads, encoder.dispatch(np.stack([r.model_input for r in reads]))) if reads else None
      if in_flight:
        finish(*in_flight)
      in_flight = dispatched
    if in_flight:
      finish(*in_flight)
    while writes:
      writes.popleft().result()
  bar.close()

  _write_tables(out_dir, records, failures, findings)
  name = interpreter.runner.name
  model = rel(name) if os.path.isabs(name) else name
  with open(os.path.join(out_dir, HTML_NAME), "w") as f:
    f.write(interpret_html.render(records, [dataclasses.asdict(x) for x in failures], findings, model=model,
                                  csv_name=CSV_NAME, errors_name=ERRORS_NAME))
  return Summary(out_dir, findings, records, failures, time.perf_counter() - start, encoder.batch_size,
                 encoder.mesh.devices.size)


def _write_tables(out_dir: str, records: Sequence[dict], failures: Sequence[Failure], findings: Sequence[str]) -> None:
  with open(os.path.join(out_dir, CSV_NAME), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "json", "overlay", "width", "height", "top_finding", "top_probability", *findings])
    for r in records:
      probs = r["image_findings"]
      top = max(probs, key=probs.get)
      w.writerow([r["file"], r["json"], r["overlay"], r["width"], r["height"], top, f"{probs[top]:.6g}",
                  *(f"{probs[c]:.6g}" for c in findings)])
  with open(os.path.join(out_dir, ERRORS_NAME), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "reason"])
    for x in failures:
      w.writerow([x.file, x.reason])


def describe(summary: Summary) -> str:
  """The lines the command prints when it is done."""
  n, bad = len(summary.records), len(summary.failures)
  lines = [f"interpreted {n} of {n + bad} files in {summary.seconds:.1f} s ({summary.images_per_s:.1f} images/s, "
           f"batches of {summary.batch_size} on {summary.num_devices} device(s))"]
  if bad:
    lines.append(f"{bad} file(s) could not be read: listed with the reason in "
                 f"{os.path.join(summary.out_dir, ERRORS_NAME)} and {HTML_NAME}")
  lines.append(f"table: {os.path.join(summary.out_dir, CSV_NAME)}")
  lines.append(f"open:  {os.path.join(summary.out_dir, HTML_NAME)}")
  return "\n".join(lines)

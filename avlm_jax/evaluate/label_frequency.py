"""The label-frequency baseline: zero-shot scores that never look at an image or read a text.

Image level, each finding's score is its prevalence among the train split's records; anatomy
level, each (region, finding) score is the fraction of the train records with region labels that
have the finding in that region, so the baseline knows which regions are typical of a finding.
The zero-shot evaluators score it with their own code (`zeroshot_image.label_frequency_result`,
`zeroshot_anatomy.label_frequency_result`: the same AUC, thresholds chosen on the threshold split,
F1 and balanced accuracy), so it is the floor beside `model`, `random_init` and `holistic`.

A constant score ranks nothing: its image-level AUC is exactly 0.5 for every finding, and so is
its anatomy AUC in each (region, finding) cell. Pooled over regions (per finding) or over findings
(per region), typical cells score above atypical ones, and there the prior is above 0.5: the
number a model's region embeddings have to beat. Its F1 is that of calling every image positive
(the threshold a constant allows).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from avlm_jax import anatomy
from avlm_jax.evaluate import zeroshot_anatomy, zeroshot_image
from avlm_jax.evaluate.context import EvalContext
from avlm_jax.evaluate.dataset import EvalSet
from data_pipelines import input_pipeline, schema

SUBJECT = "label_frequency"
EVALUATORS = ("zeroshot_image", "zeroshot_anatomy")


@dataclasses.dataclass(frozen=True)
class LabelCounts:
  """How often each finding label occurs in a split (labels as the records spell them)."""

  split: str
  num_records: int
  image: dict[str, int]               # finding -> records listing it in `findings`
  num_region_records: int             # records that carry `region_findings`
  region: dict[str, np.ndarray]       # finding -> (R,) records with it in each region

  def prevalence(self, names: Sequence[str]) -> np.ndarray:
    """(C,) fraction of records positive for each name; NaN when the split has no records."""
    if self.num_records == 0:
      return np.full(len(names), np.nan)
    return np.array([self.image.get(n, 0) / self.num_records for n in names], np.float64)

  def region_frequency(self, names: Sequence[str]) -> np.ndarray:
    """(R, C) fraction of the records with region labels that have each name in each region."""
    if self.num_region_records == 0:
      return np.full((anatomy.NUM_REGIONS, len(names)), np.nan)
    zero = np.zeros(anatomy.NUM_REGIONS, np.int64)
    return np.stack([self.region.get(n, zero) for n in names], axis=1) / self.num_region_records


def count_labels(data_dir: str, split: str = "train") -> LabelCounts:
  """Label counts over every record of `split` (images are not decoded)."""
  source = input_pipeline.TripleSource(schema.shard_paths(data_dir, split))
  image: collections.Counter = collections.Counter()
  region: dict[str, np.ndarray] = {}
  num_region = 0
  for i in range(len(source)):
    try:
      t = schema.decode(source[i][1])
    except schema.RecordError as e:
      shard, local = source.locate(i)
      raise schema.RecordError(f"{shard}, record {local}: {e}") from e
    image.update(set(t.findings))
    if t.region_findings is not None:
      num_region += 1
      for r, fs in enumerate(t.region_findings):
        for f in set(fs):
          region.setdefault(f, np.zeros(anatomy.NUM_REGIONS, np.int64))[r] += 1
  return LabelCounts(split, len(source), dict(image), num_region, region)


def evaluate(config: ml_collections.ConfigDict, sets: tuple[EvalSet, EvalSet], train_dir: str | None,
             names: Sequence[str], log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """The `label_frequency` subject: the zero-shot evaluators among `names`, each scored on the
  label frequencies of `train_dir`'s train split (skipped, saying why, without one)."""
  wanted = [n for n in names if n in EVALUATORS]
  results: dict[str, Any] = {}
  if not wanted:
    return results
  counts = count_labels(train_dir) if train_dir else None
  ctx = EvalContext(None, sets[0], sets[1], train_dir=train_dir)  # no model: runner is never read
  scorers = {"zeroshot_image": zeroshot_image.label_frequency_result,
             "zeroshot_anatomy": zeroshot_anatomy.label_frequency_result}
  for name in wanted:
    t0 = time.perf_counter()
    if counts is None:
      results[name] = {"skipped": "no train split beside the evaluation data to count label frequencies on"}
    else:
      results[name] = scorers[name](ctx, config.evals[name], config.labels, counts)
    results[name]["seconds"] = time.perf_counter() - t0
    log(f"  {SUBJECT} / {name}: {results[name]['seconds']:.1f}s")
  return results

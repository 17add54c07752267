"""Evaluators inside training: every `config.evals.every_steps` steps (and at the last step) the
evaluators named in `config.evals.in_training` score the current params. Their headline numbers
go into metrics.jsonl as `eval/<evaluator>/<metric>`, the full results into
`<workdir>/eval/step_<N>.json`. With the localisation evaluator, the box prior (each region's mean
training box; it never looks at an image, so it is computed once) is written to
`<workdir>/eval/box_prior.json` and logged beside it as `eval/box_prior/localisation/<metric>`.

Evaluation runs on each process's first device from a gathered copy of the params: right for the
model sizes trained on CPU and single hosts; a pod-scale run should evaluate standalone
(`launch/evaluate.py`) on its checkpoints.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from avlm_jax import fs, sentencepiece_tokenizer
from avlm_jax.evaluate import dataset, localisation, metrics, registry
from avlm_jax.evaluate.runner import evaluate_params
from avlm_jax.tokenizer import TextTokenizer


class PeriodicEvals:

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, data_dir: str):
    self.config = config
    self.every = config.evals.every_steps
    self.names = registry.enabled(config, config.evals.in_training)
    self.data_dir = config.evals.data_dir or data_dir
    self.tokenizer = TextTokenizer(sentencepiece_tokenizer.config_tokenizer_dir(config, data_dir))
    self.out_dir = fs.join(workdir, "eval")
    self._sets = None
    self._box_prior: dict[str, Any] | None = None

  def due(self, step: int, last_step: int) -> bool:
    return bool(self.names) and (step % self.every == 0 or step == last_step)

  def run(self, step: int, params: Any) -> dict[str, float]:
    if self._sets is None:
      self._sets = dataset.threshold_and_eval_sets(self.data_dir, self.config.data.image_size,
                                                   self.config.evals.max_examples)
    host_params = multihost_utils.process_allgather(params, tiled=True)
    results = evaluate_params(self.config, host_params, self.tokenizer, self.data_dir, self.names,
                              sets=self._sets)
    if jax.process_index() == 0:
      fs.makedirs(self.out_dir)
      fs.write_text(fs.join(self.out_dir, f"step_{step}.json"),
                    json.dumps(metrics.to_json({"step": step, **results}), indent=1, allow_nan=False))
    scalars = registry.headline_scalars(results)
    if "localisation" in self.names:
      scalars.update(registry.headline_scalars(self._prior(), prefix="eval/box_prior/"))
    return scalars

  def _prior(self) -> dict[str, Any]:
    if self._box_prior is None:
      train_dir = self.data_dir if dataset.has_split(self.data_dir, "train") else None
      self._box_prior = {"localisation": localisation.box_prior_result(train_dir, self._sets[1])}
      if jax.process_index() == 0:
        fs.write_text(fs.join(self.out_dir, "box_prior.json"),
                      json.dumps(metrics.to_json(self._box_prior), indent=1, allow_nan=False))
    return self._box_prior


def periodic_evals(config: ml_collections.ConfigDict, workdir: str, data_dir: str) -> PeriodicEvals | None:
  return PeriodicEvals(config, workdir, data_dir) if config.evals.every_steps > 0 else None

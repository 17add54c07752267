"""Evaluate a checkpoint and its baselines through the same evaluators; write metrics.json and
report.md (with the pictures) into an output folder.

Subjects: `model` (the checkpoint), `random_init` (the same config freshly initialised; a
pretrained text tower it names is still loaded) and `holistic` (the ablation without anatomy
tokens, trained with the image-level loss only: `configs/tiny.py:holistic`, or any config through
`configs.common.holistic`). The holistic checkpoint is rebuilt from the config saved with it; its
image size and labels must equal the evaluated config's. It has no boxes or region embeddings, so
the anatomy evaluators report it as skipped. `box_prior` (with the localisation evaluator) never
looks at an image: each region's mean box over the data folder's train split, scored on
localisation only (`localisation.box_prior_result`). `label_frequency` (with the zero-shot
evaluators) never looks at an image either: the train split's finding prevalence, and each
finding's frequency per region, scored by the zero-shot evaluators' own code (label_frequency.py).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from avlm_jax.evaluate import dataset, label_frequency, localisation, metrics, registry, report
from avlm_jax.evaluate.context import EvalContext
from avlm_jax import bundle, fs
from avlm_jax.evaluate.model_runner import (ModelRunner, baseline_config, eval_data_dir, random_params,
                                            resolve_checkpoint, resolve_tokenizer, restore_params, workdir_of)
from avlm_jax.tokenizer import TextTokenizer


def evaluate_params(config: ml_collections.ConfigDict, params: Any, tokenizer: TextTokenizer, data_dir: str,
                    names: Sequence[str], *, name: str = "model", picture_dir: str | None = None,
                    sets: tuple[dataset.EvalSet, dataset.EvalSet] | None = None,
                    log: Callable[[str], None] = lambda s: None,
                    arrays_dir: str | None = None) -> dict[str, Any]:
  """Run the evaluators `names` on `params`; `sets` reuses already loaded (threshold, eval) sets.
  `arrays_dir`: also save the per-example arrays the evaluators scored to `<arrays_dir>/<name>.npz`."""
  if sets is None:
    sets = dataset.threshold_and_eval_sets(data_dir, config.data.image_size, config.evals.max_examples)
  runner = ModelRunner(config, params, tokenizer, config.evals.batch_size, name)
  train_dir = data_dir if dataset.has_split(data_dir, "train") else None
  ctx = EvalContext(runner, sets[0], sets[1], train_dir=train_dir, picture_dir=picture_dir)
  results = registry.run_evals(ctx, names, log)
  if arrays_dir and ctx.kept:
    os.makedirs(arrays_dir, exist_ok=True)
    np.savez_compressed(os.path.join(arrays_dir, f"{name}.npz"), ids=np.asarray(sets[1].ids), **ctx.kept)
  return results


def evaluate_checkpoint(checkpoint: str, config: ml_collections.ConfigDict, out_dir: str, *,
                        data_dir: str | None = None, names: Sequence[str] | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Everything `launch/evaluate.py` does; returns what it writes to `<out_dir>/metrics.json`.
  `checkpoint` may be a model bundle (avlm_jax/bundle.py): its params, config and tokenizer."""
  if bundle.is_bundle(checkpoint):
    b = bundle.load(checkpoint, config)
    directory, step, workdir = os.path.abspath(checkpoint), b.step, None
    tokenizer = TextTokenizer(b.tokenizer_dir)
    model_params: Callable[[], Any] = lambda: b.params  # noqa: E731
  else:
    directory, step = resolve_checkpoint(checkpoint)
    workdir = workdir_of(directory)
    tokenizer = resolve_tokenizer(config, workdir)
    model_params = lambda: restore_params(config, fs.join(directory, str(step)), tokenizer.vocab_size)  # noqa: E731
  data_dir = data_dir or eval_data_dir(config, workdir)
  names = registry.enabled(config, names)
  log(f"evaluating {directory}/{step} on {data_dir}: {', '.join(names)}")
  sets = dataset.threshold_and_eval_sets(data_dir, config.data.image_size, config.evals.max_examples)
  # subject -> (its config, a function giving its params)
  subjects: dict[str, tuple[ml_collections.ConfigDict, Callable[[], Any]]] = {"model": (config, model_params)}
  if config.evals.random_baseline:
    subjects["random_init"] = (config, lambda: random_params(config, tokenizer.vocab_size, config.seed + 1))
  if config.evals.holistic_checkpoint:
    holistic = baseline_config(config, config.evals.holistic_checkpoint)
    subjects["holistic"] = (holistic, lambda: restore_params(holistic, config.evals.holistic_checkpoint,
                                                             tokenizer.vocab_size))
  results: dict[str, Any] = {
      "checkpoint": f"{directory}/{step}", "step": step, "data_dir": fs.abspath(data_dir),
      "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "threshold_split": sets[0].name, "eval_split": sets[1].name, "subjects": {}}
  for subject, (subject_config, params_fn) in subjects.items():
    pics = os.path.join(out_dir, "pictures") if subject == "model" else None
    results["subjects"][subject] = evaluate_params(subject_config, params_fn(), tokenizer, data_dir, names,
                                                   name=subject, picture_dir=pics, sets=sets, log=log,
                                                   arrays_dir=os.path.join(out_dir, "arrays"))
  if "localisation" in names:
    train_dir = data_dir if dataset.has_split(data_dir, "train") else None
    results["subjects"]["box_prior"] = {"localisation": localisation.box_prior_result(train_dir, sets[1])}
    log(f"  box_prior / localisation: {results['subjects']['box_prior']['localisation']['seconds']:.1f}s")
  if any(n in label_frequency.EVALUATORS for n in names):  # the zero-shot floor: training label frequencies
    train_dir = data_dir if dataset.has_split(data_dir, "train") else None
    results["subjects"][label_frequency.SUBJECT] = label_frequency.evaluate(config, sets, train_dir, names, log)
  os.makedirs(out_dir, exist_ok=True)
  relative_pictures(results, out_dir)  # the folder can be moved or shared
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(metrics.to_json(results), f, indent=1, allow_nan=False)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report.markdown(results, config, out_dir))
  log(f"wrote {out_dir}/metrics.json and {out_dir}/report.md")
  return results


def relative_pictures(node: Any, out_dir: str) -> None:
  """Every `pictures` entry of a result tree, in place: a path relative to `out_dir`."""
  if isinstance(node, dict):
    for key, value in node.items():
      if key == "pictures" and isinstance(value, dict):
        # Relative paths are relative to the working directory, like out_dir itself.
        node[key] = {k: os.path.relpath(os.path.abspath(v), os.path.abspath(out_dir)) for k, v in value.items()}
      else:
        relative_pictures(value, out_dir)

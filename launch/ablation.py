r"""The paper's ablation (§5.5) on SynthCXR: four rows × seeds, resumable, then one table.

  python -m launch.ablation --config=configs/synth_small.py --root=workdir/ablation
  python -m launch.ablation --config=configs/synth_small.py --root=workdir/ablation --commit   # commit each result
  python -m launch.ablation --table_only                                                       # the table from results/

Rows (configs/common.py `ablation`): `global` (the holistic model: image-level loss only),
`detection` (boxes and presence only), `global_detection` (no region–phrase term) and `full`.
Every run trains `python -m launch.train --config=<config>:ablation=<row>,seed=<s>` on one shared
corpus (built once from seed 0 into `<root>/data`, so every run sees the same test split), then
evaluates it with `python -m launch.evaluate` (the full row of seed 0 also scores the free
baselines: random encoder, box prior, label frequency).

Resumable at three levels: a run whose result is in `--results` is skipped; a run whose training
was cut resumes from its last checkpoint; an evaluated run is not evaluated again. Each finished run
leaves `<results>/<row>_seed<s>.json` (headline numbers) and `.npz` (the per-image scores the
bootstrap needs, a few hundred KB), committed at once with `--commit`, so a later session on
another machine carries on. The table (`<results>/TABLE.md`) gives the mean over seeds and a
bootstrap 95 % confidence interval over test images (`avlm_jax/evaluate/ablation_table.py`), with
the paper's numbers beside.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/synth_small.py", "Config file (without ':args').")
_CONFIG_ARGS = flags.DEFINE_string("config_args", "", "Extra ':args' for every run, e.g. 'steps=1200'.")
_ROOT = flags.DEFINE_string("root", "workdir/ablation", "Workdirs of the runs and the shared corpus.")
_RESULTS = flags.DEFINE_string("results", "results/ablation", "Where the per-run results and the table go.")
_ROWS = flags.DEFINE_list("rows", ["global", "full", "global_detection", "detection"], "Ablation rows to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run.")
_COMMIT = flags.DEFINE_bool("commit", False, "git-commit each run's result files as they land.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Only make the table from the results there are.")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples per table cell (all resamples are "
                                  "scored at once as image counts; 1000 take seconds per run).")


def run_name(row: str, seed: int) -> str:
  return f"{row}_seed{seed}"


def _config_arg(row: str, seed: int) -> str:
  args = ",".join(filter(None, [_CONFIG_ARGS.value, f"ablation={row}", f"seed={seed}"]))
  return f"{_CONFIG.value}:{args}"


def _run(cmd: list[str], log_path: str) -> None:
  """Run a step of the experiment; its output goes to a log, and a failure names the log."""
  print("  $", " ".join(cmd), flush=True)
  with open(log_path, "a") as log:
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
  if rc:
    with open(log_path) as f:
      tail = f.read()[-2000:]
    raise SystemExit(f"error: {' '.join(cmd[:3])} failed (exit {rc}); log {log_path}:\n{tail}")


def _data_overrides(root: str) -> list[str]:
  return [f"--config.data.dir={os.path.join(root, 'data')}", "--config.data.kind=array_record"]


def seed0_config():
  """The ablation's config as seed 0 runs it (its corpus and its labels are every run's)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("ablation_config", _CONFIG.value)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(",".join(filter(None, [_CONFIG_ARGS.value, "seed=0"])))


def prepare_corpus(root: str) -> None:
  """Build the shared corpus once (the config's own data kind, seed 0) into <root>/data."""
  from avlm_jax.train import data

  config = seed0_config()
  config.data.dir = os.path.join(root, "data")
  data.prepare_dataset(config, root)


def run_one(row: str, seed: int, root: str, results: str, with_baselines: bool) -> str:
  name = run_name(row, seed)
  workdir = os.path.join(root, name)
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, "ablation.log")
  cfg = _config_arg(row, seed)
  extra = _data_overrides(root) + [f"--config.{o}" for o in _OVERRIDES.value]
  t0 = time.time()
  _run([sys.executable, "-m", "launch.train", f"--config={cfg}", f"--workdir={workdir}", *extra], log)
  train_s = time.time() - t0
  out = os.path.join(workdir, "eval")
  if not os.path.exists(os.path.join(out, "metrics.json")):
    evals = ["--config.evals.segmentation.enabled=False",
             f"--config.evals.random_baseline={with_baselines}"]
    _run([sys.executable, "-m", "launch.evaluate", f"--config={cfg}", f"--checkpoint={workdir}",
          f"--out={out}", *extra, *evals], log)
  from avlm_jax.evaluate import ablation_table
  return ablation_table.collect_run(out, results, name, row=row, seed=seed,
                                    extra={"train_seconds": round(train_s, 1), "config": cfg,
                                           "overrides": extra})


def _commit(paths: list[str], message: str, tries: int = 5) -> None:
  """Commit just these files. A failure (another git command holds the index) is retried, then
  reported and left: the files stay on disk, and a rerun's table includes them."""
  for attempt in range(tries):
    ok = subprocess.call(["git", "add", *paths]) == 0 and subprocess.call(
        ["git", "commit", "-q", "-m", message, "--", *paths]) in (0, 1)
    if ok:
      return
    time.sleep(2 + 3 * attempt)
  print(f"warning: could not commit {paths}; commit them by hand", flush=True)


def main(argv):
  del argv
  from avlm_jax.evaluate import ablation_table

  root, results = os.path.abspath(_ROOT.value), _RESULTS.value
  os.makedirs(results, exist_ok=True)
  if not _TABLE_ONLY.value:
    prepare_corpus(root)
    for seed in map(int, _SEEDS.value):
      for row in _ROWS.value:
        name = run_name(row, seed)
        if os.path.exists(os.path.join(results, f"{name}.json")):
          print(f"{name}: done, skipped", flush=True)
          continue
        print(f"{name}: training and evaluating", flush=True)
        written = run_one(row, seed, root, results, with_baselines=(row == "full" and seed == 0))
        with open(os.path.join(results, f"{name}.json")) as f:
          print(f"{name}: {json.dumps(json.load(f)['headline'])}", flush=True)
        if _COMMIT.value:
          _commit(written, f"ablation: {name} result")
  table = ablation_table.write_table(results, _RESAMPLES.value, labels=tuple(seed0_config().labels))
  print(table)
  if _COMMIT.value:
    _commit([os.path.join(results, "TABLE.md"), os.path.join(results, "table.json")], "ablation: table")


if __name__ == "__main__":
  app.run(main)

r"""Precompute a frozen text tower's features for every text training can draw from a corpus.

  python -m launch.precompute_text_features --config=configs/synth_small.py --data=workdir/synth_small/data
  python -m launch.precompute_text_features --config=configs/synth_small.py:seed=1 --data=DIR --out=TABLE_DIR

Enumerates every slot text the input pipeline can emit from DIR's train split under the config's
text sampling (sub-sentences, rephrasings, negations, attribute statements, hard negatives, in
the configured style) and the label prompts, encodes them with the tower a fresh run of the config
starts with (config.seed's init, then model.text.init_from), in length buckets split over this
process's devices, and writes a sharded table, by default to DIR/text_features/<tower id>/, where
training finds it (`text_features.table='auto'`, the default). A config that generates its corpus
builds it in DIR first. The table is refused by any run whose tower, tokenizer or token lengths
differ from the manifest's (avlm_jax/train/text_table.py).
"""

import sys

from absl import flags
from ml_collections import config_flags

from avlm_jax.config_check import check_config_keys, run_app
from configs import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:arg] (frozen text tower).",
                                          lock_config=True)
_DATA = flags.DEFINE_string("data", None, "The corpus folder (its train split is enumerated).")
_OUT = flags.DEFINE_string("out", None, "Table folder (default: <data>/text_features/<tower id>).")
_ROWS = flags.DEFINE_integer("rows", 64, "Texts per encoder call, rounded to whole rows per device (64: the "
                             "training cache's chunk, so on one device the table holds bit for bit what "
                             "training would encode).")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 1 << 16, "Texts per table shard.")
flags.mark_flags_as_required(["config", "data"])


def main():
  from avlm_jax.config_check import ConfigValueError
  from avlm_jax.train import text_table
  from data_pipelines.schema import RecordError

  try:
    check_config_keys(_CONFIG.value, common.base_config())
    text_table.precompute(_CONFIG.value, _DATA.value, _OUT.value, rows=_ROWS.value,
                          shard_rows=_SHARD_ROWS.value, say=lambda line: print(line, flush=True))
  except (KeyError, ConfigValueError, FileNotFoundError, FileExistsError, RecordError) as e:
    sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")


if __name__ == "__main__":
  run_app(main, common.base_config())

r"""Train a SentencePiece tokenizer on a triple folder's train-split reports.

  python -m launch.train_tokenizer --data=data/synthcxr --vocab_size=1000
  python -m launch.train_tokenizer --data=data/mimic --vocab_size=8000 --model_type=bpe --out=data/mimic_spm

The folder (default `<data>/tokenizer_sentencepiece_<model_type>_<vocab_size>`, the one a config
with `data.tokenizer='sentencepiece'` and the same size and type finds by itself) holds
`tokenizer.json` + `tokenizer_config.json` (HF fast tokenizer, loaded offline by `TextTokenizer`
and `transformers.AutoTokenizer`), `sentencepiece.model` and `training.json`. Elsewhere (`--out`),
point a config at it with `--config.data.tokenizer_dir=<out>`. The same corpus and flags give
byte-identical files. avlm_jax/sentencepiece_tokenizer.py says what the ids and text normalisation are.
"""

import os

import numpy as np
from absl import app, flags

_DATA = flags.DEFINE_string("data", None, "Triple folder (train-*.array_record shards).")
_VOCAB = flags.DEFINE_integer("vocab_size", 1000, "Most pieces, specials included (unigram stops "
                              "earlier on a small corpus; BPE takes the most the corpus allows).")
_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece model type.")
_OUT = flags.DEFINE_string("out", "", "Output folder ('' -> <data>/tokenizer_sentencepiece_<type>_<size>).")
_KNOWLEDGE = flags.DEFINE_bool("knowledge", True, "Also train on the knowledge base's texts and the region "
                               "names (label prompts and sampled region texts are built from them).")
_MAX_REPORTS = flags.DEFINE_integer("max_reports", 0, "Use the first N train reports (0: all).")
flags.mark_flags_as_required(["data"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from avlm_jax import sentencepiece_tokenizer as spt
  from avlm_jax.tokenizer import TextTokenizer

  texts = spt.corpus_texts(_DATA.value, knowledge=_KNOWLEDGE.value, max_reports=_MAX_REPORTS.value)
  out = _OUT.value or os.path.join(_DATA.value, spt.folder_name(_VOCAB.value, _TYPE.value))
  spt.train(texts, out, vocab_size=_VOCAB.value, model_type=_TYPE.value)
  tok = TextTokenizer(out)
  reports = spt.corpus_texts(_DATA.value, knowledge=False, max_reports=min(_MAX_REPORTS.value or 1000, 1000))
  lengths = [len(ids) - 2 for ids in tok.hf(reports)["input_ids"]]  # less [CLS] and [SEP]
  print(f"wrote {out}: {tok.vocab_size} pieces ({_TYPE.value}) from {len(texts)} texts; "
        f"{np.mean(lengths):.1f} tokens per report (mean of the first {len(reports)} train reports)")
  if _OUT.value:
    print(f"use it with --config.data.tokenizer_dir={out}")
  else:
    print(f"use it with --config.data.tokenizer=sentencepiece --config.data.tokenizer_vocab_size={_VOCAB.value} "
          f"--config.data.tokenizer_model_type={_TYPE.value} --config.data.dir={_DATA.value}")


if __name__ == "__main__":
  app.run(main)

"""A domain tokenizer: SentencePiece (unigram or BPE) trained on a corpus's report texts.

`train` writes a folder that `TextTokenizer` and `transformers.AutoTokenizer` load offline: the HF
fast tokenizer (`tokenizer.json`, `tokenizer_config.json`), the `sentencepiece.model` it was
converted from, and `training.json` (flags, piece and text counts, a digest of the texts). The ids
keep the BERT convention the text tower relies on: [PAD]=0 (masked out of the mean pool), [UNK]=1,
[CLS]=2, [SEP]=3, [MASK]=4, and every text is framed `[CLS] … [SEP]` (CLS pooling reads position
0). Text is NFKC-normalised and case-folded (SentencePiece's `nmt_nfkc_cf` rule, carried into the
HF normalizer as its precompiled character map), so the HF tokenizer encodes like the `.model`.

Deterministic: the same texts and flags give byte-identical files (one trainer thread, a fixed
random seed, unigram seed pieces written in a fixed order).

A config selects it with `data.tokenizer = "sentencepiece"` (`config_tokenizer_dir`): the folder
`<data dir>/tokenizer_sentencepiece_<model type>_<vocab size>/`, trained on first use from the
train split (`ensure`), and found there again by evaluation and interpretation.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from typing import Sequence

import ml_collections

from avlm_jax import fs, paths
from avlm_jax.config_check import ConfigValueError
from avlm_jax.tokenizer import _CHARS, SPECIAL_TOKENS, import_transformers

KINDS = ("corpus", "sentencepiece")
MODEL_TYPES = ("unigram", "bpe")
MODEL_FILE = "sentencepiece.model"
INFO_FILE = "training.json"
_SEED = 0
_MAX_PIECE_LEN = 16  # SentencePiece's default max_sentencepiece_length
_WORD_BOUNDARY = "\u2581"  # '▁', SentencePiece's whitespace mark


def folder_name(vocab_size: int, model_type: str) -> str:
  return f"tokenizer_sentencepiece_{model_type}_{vocab_size}"


def config_tokenizer_dir(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """The tokenizer folder a config trains and evaluates with, for the triple folder `data_dir`:
  data.tokenizer_dir when set, else `<data_dir>/tokenizer` (data.tokenizer='corpus', the corpus'
  WordPiece) or `<data_dir>/<folder_name(...)>` (data.tokenizer='sentencepiece')."""
  kind = config.data.tokenizer
  if kind not in KINDS:
    raise ConfigValueError(f"config.data.tokenizer={kind!r}; expected one of {KINDS}")
  if kind == "sentencepiece":
    if config.model.text.init_from:
      raise ConfigValueError(
          f"config.data.tokenizer='sentencepiece' trains a new vocabulary, but model.text.init_from="
          f"{config.model.text.init_from!r} is a pretrained text tower with its own tokenizer: set "
          "data.tokenizer='corpus' and data.tokenizer_dir to that tokenizer")
    if config.data.tokenizer_model_type not in MODEL_TYPES:
      raise ConfigValueError(f"config.data.tokenizer_model_type={config.data.tokenizer_model_type!r}; "
                             f"expected one of {MODEL_TYPES}")
  if config.data.tokenizer_dir:
    return paths.resolve(config.data.tokenizer_dir)
  if kind == "corpus":
    return fs.join(data_dir, "tokenizer")
  return fs.join(data_dir, folder_name(config.data.tokenizer_vocab_size, config.data.tokenizer_model_type))


def ensure(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """`config_tokenizer_dir`, trained from `data_dir`'s train reports first when the config asks for
  a SentencePiece tokenizer that is not there yet (call on one process only)."""
  out = config_tokenizer_dir(config, data_dir)
  if config.data.tokenizer == "sentencepiece" and not config.data.tokenizer_dir and not fs.isdir(out):
    texts = corpus_texts(data_dir, skip_bad_records=config.data.max_bad_records > 0)
    with fs.staged_dir(out) as local:  # a bucket gets the finished folder
      train(texts, local, vocab_size=config.data.tokenizer_vocab_size,
            model_type=config.data.tokenizer_model_type)
  return out


def corpus_texts(data_dir: str, *, knowledge: bool = True, max_reports: int = 0,
                 skip_bad_records: bool = False) -> list[str]:
  """What a corpus tokenizer is trained on: the reports of `data_dir`'s train split, in shard order
  (the first `max_reports` when > 0), then, with `knowledge`, the knowledge base's texts and the
  region names, which the label prompts and sampled region texts are built from. With
  `skip_bad_records`, records that do not decode are passed over (training, which reads them all,
  lists them and enforces data.max_bad_records); else the first one raises, naming it."""
  from data_pipelines import input_pipeline, schema

  source = input_pipeline.TripleSource(schema.shard_paths(data_dir, "train"))
  n = len(source) if max_reports <= 0 else min(max_reports, len(source))
  texts = []
  for i in range(n):
    _, raw = source[i]
    try:
      texts.append(schema.decode(raw).report)
    except schema.RecordError as e:
      if not skip_bad_records:
        path, j = source.locate(i)
        raise schema.RecordError(f"{path}, record {j}: {e}") from None
  if not any(t.strip() for t in texts):
    raise ValueError(f"{data_dir!r}: the train split holds no report text to train a tokenizer on")
  if knowledge:
    from avlm_jax import anatomy
    from avlm_jax.knowledge.base import load_knowledge_base
    texts += load_knowledge_base().vocabulary_texts() + list(anatomy.REGION_NAMES)
  return texts


def _lines(texts: Sequence[str]) -> list[str]:
  """Non-empty lines: SentencePiece trains on sentences, here each line of a report."""
  return [line for t in texts for line in t.splitlines() if line.strip()]


def _write_unigram_seeds(lines: Sequence[str], path: str) -> None:
  """Every substring of every word (up to the piece length limit), with its corpus count.

  SentencePiece's own seed search keeps only substrings that branch in a suffix array of whole
  sentences: in templated text a word always followed by a space ("right") never branches there
  and could not become a piece. Seeding from words gives the classic candidate set; invalid or
  never-used candidates are dropped by the trainer.
  """
  words = collections.Counter(w for line in lines for w in unicodedata.normalize("NFKC", line).casefold().split())
  counts: collections.Counter = collections.Counter()
  for word, c in words.items():
    word = _WORD_BOUNDARY + word
    for i in range(len(word)):
      for j in range(i + 2, min(len(word), i + _MAX_PIECE_LEN) + 1):
        counts[word[i:j]] += c
  with open(path, "w", encoding="utf-8") as f:
    for piece, c in sorted(counts.items(), key=lambda kv: (-kv[1] * len(kv[0]), kv[0])):
      if piece != _WORD_BOUNDARY:
        f.write(f"{piece}\t{c}\n")


def _train_model(lines: Sequence[str], prefix: str, vocab_size: int, model_type: str) -> None:
  import sentencepiece as spm

  options = dict(
      model_prefix=prefix, model_type=model_type, vocab_size=vocab_size, character_coverage=1.0,
      required_chars=_CHARS,  # the WordPiece tokenizers' fallback alphabet: unseen words still spell out
      normalization_rule_name="nmt_nfkc_cf", num_threads=1, input_sentence_size=0,
      max_sentence_length=1 << 16, pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=SPECIAL_TOKENS[0],
      unk_piece=SPECIAL_TOKENS[1], bos_piece=SPECIAL_TOKENS[2], eos_piece=SPECIAL_TOKENS[3],
      control_symbols=[SPECIAL_TOKENS[4]], minloglevel=2)
  if model_type == "unigram":
    seeds = prefix + ".seeds.tsv"
    _write_unigram_seeds(lines, seeds)
    # vocab_size is an upper bound: a small corpus ends with the pieces it supports.
    options.update(seed_sentencepieces_file=seeds, hard_vocab_limit=False)
  while True:
    spm.set_random_generator_seed(_SEED)
    try:
      spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), **options)
      return
    except RuntimeError as e:
      message = " ".join(str(e).split())
      # BPE has no soft limit: retry at the largest size this corpus allows.
      m = re.search(r"Please set it to a value <= (\d+)", message)
      if model_type == "bpe" and m and int(m.group(1)) < options["vocab_size"]:
        options["vocab_size"] = int(m.group(1))
        continue
      raise ValueError(f"SentencePiece {model_type} training (vocab_size={vocab_size}, {len(lines)} lines) "
                       f"failed: {message}") from None


def _write_model_without_paths(src: str, dst: str) -> None:
  """Copy the trained model minus the trainer's file paths (temporary names, which would make two
  identical trainings differ byte for byte)."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  with open(src, "rb") as f:
    proto.ParseFromString(f.read())
  for field in ("model_prefix", "seed_sentencepieces_file"):
    proto.trainer_spec.ClearField(field)
  del proto.trainer_spec.input[:]
  with open(dst, "wb") as f:
    f.write(proto.SerializeToString(deterministic=True))


def _hf_tokenizer(model_file: str, model_max_length: int):
  """The trained model as an HF fast tokenizer that encodes like `SentencePieceProcessor`."""
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_file, "rb") as f:
    proto.ParseFromString(f.read())
  pieces = [(p.piece, p.score) for p in proto.pieces]
  if [p for p, _ in pieces[:len(SPECIAL_TOKENS)]] != list(SPECIAL_TOKENS):
    raise ValueError(f"{model_file}: the first pieces are {pieces[:len(SPECIAL_TOKENS)]}, expected {SPECIAL_TOKENS}")
  if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
    model = models.Unigram(pieces, unk_id=proto.trainer_spec.unk_id, byte_fallback=False)
  else:
    # SentencePiece BPE merges the adjacent pair whose result scores highest: rank merges that way.
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
    ranked = sorted((-score, i, tok[:k], tok[k:]) for tok, (score, i) in normal.items()
                    for k in range(1, len(tok)) if tok[:k] in normal and tok[k:] in normal)
    model = models.BPE({p: i for i, (p, _) in enumerate(pieces)}, [(a, b) for _, _, a, b in ranked],
                       unk_token=SPECIAL_TOKENS[1], fuse_unk=True)
  tok = Tokenizer(model)
  spec = proto.normalizer_spec
  tok.normalizer = normalizers.Sequence([
      normalizers.Precompiled(spec.precompiled_charsmap),
      # SentencePiece's remove_extra_whitespaces, which counts spaces only.
      normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")])
  # Pieces never span a space (split_by_whitespace), so encoding word by word is encoding the text.
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_WORD_BOUNDARY, prepend_scheme="always", split=True)
  tok.decoder = decoders.Metaspace(replacement=_WORD_BOUNDARY, prepend_scheme="always", split=True)
  ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
      special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
  return import_transformers().PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
      mask_token="[MASK]", model_max_length=model_max_length)


def train(texts: Sequence[str], out_dir: str, *, vocab_size: int, model_type: str = "unigram",
          model_max_length: int = 512) -> str:
  """Train SentencePiece on `texts` and write the tokenizer folder `out_dir` (replaced whole)."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r}; expected one of {MODEL_TYPES}")
  lines = _lines(texts)
  if not lines:
    raise ValueError(f"no text to train a SentencePiece tokenizer for {out_dir!r} on")
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  # Built beside the target and renamed into place: a stopped run never leaves half a tokenizer.
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
  try:
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    _train_model(lines, os.path.join(work, "sentencepiece"), vocab_size, model_type)
    folder = os.path.join(tmp, "tokenizer")
    os.makedirs(folder)
    _write_model_without_paths(os.path.join(work, "sentencepiece.model"), os.path.join(folder, MODEL_FILE))
    fast = _hf_tokenizer(os.path.join(folder, MODEL_FILE), model_max_length)
    fast.save_pretrained(folder)
    import sentencepiece as spm
    info = {"model_type": model_type, "vocab_size": vocab_size, "pieces": len(fast),
            "lines": len(lines), "texts_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            "sentencepiece": spm.__version__, "normalization": "nmt_nfkc_cf"}
    with open(os.path.join(folder, INFO_FILE), "w") as f:
      json.dump(info, f, indent=1, sort_keys=True)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    os.replace(folder, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir

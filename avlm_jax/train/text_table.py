"""Precomputed features of a frozen text tower: a sharded table on disk, beside the data.

`python -m launch.precompute_text_features` enumerates every text the input pipeline can emit for
a corpus and config (`input_pipeline.possible_slot_texts`: sub-sentences, rephrasings, negations,
attribute statements and hard negatives, in the configured style; plus the label prompts), encodes
them in length buckets on the local devices and writes

    <data>/text_features/<tower_id>/manifest.json
    <data>/text_features/<tower_id>/keys-00000-of-0000N.npy      int64, sorted across shards
    <data>/text_features/<tower_id>/features-00000-of-0000N.npy  float32 (rows, width)

A row's key is the pipeline's text identity (`tokenizer.token_hash` of the padded token ids, the
`phrase_ids` of a batch) as one int64. The manifest records what made the features (the tower's
parameter hash, its architecture, the tokenizer's hash and the two token lengths); `tower_id`
hashes them all, so a changed tower or tokenizer gets its own folder, and `FeatureTable.open`
refuses a table whose manifest disagrees with the run, naming the table and the field.

Training (`TextFeatureCache`) reads the keys into memory (8 bytes a text) and the features
memory-mapped, so host memory for the table is at most its file size, paged in as rows are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from avlm_jax import fs
from avlm_jax.config_check import ConfigValueError
from avlm_jax.tokenizer import TextTokenizer, token_hash

FORMAT = "avlm_jax.text_features/1"
FOLDER = "text_features"
MANIFEST = "manifest.json"
# Fields of the manifest a run's tower must match, in the order they are checked.
IDENTITY_FIELDS = ("params_sha256", "tower", "tokenizer_sha256", "max_phrase_len", "max_prompt_len")


class TextFeatureTableError(ConfigValueError):
  """A feature table that cannot serve this run (missing, damaged, or made by another tower or
  tokenizer): one line naming the table, printed as is by the entry points (a ConfigValueError:
  `text_features.table` names a table this run cannot use)."""


def keys_of(tokens: np.ndarray) -> np.ndarray:
  """(..., L) token ids -> (...,) int64: the pipeline's text identity (token_hash) as one number."""
  return ids_to_keys(token_hash(tokens))


def ids_to_keys(ids: np.ndarray) -> np.ndarray:
  """(..., 2) int32 text identities (a batch's `phrase_ids`) -> (...,) int64."""
  ids = np.asarray(ids)
  return (ids[..., 0].astype(np.int64) << 32) | (ids[..., 1].astype(np.int64) & 0xFFFFFFFF)


# --- what made the features ----------------------------------------------------------------------
def params_sha256(params: Any) -> str:
  """SHA-256 over every leaf of `params` (its path, dtype, shape and bytes), in path order."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def tokenizer_sha256(tokenizer: TextTokenizer) -> str:
  """SHA-256 of everything that decides token ids: the fast tokenizer's full serialisation
  (normaliser, pre-tokeniser, vocabulary, post-processor), else its vocabulary."""
  hf = tokenizer.hf
  if getattr(hf, "is_fast", False):
    spec = json.loads(hf.backend_tokenizer.to_str())
    for per_call in ("truncation", "padding"):  # set by each call (TextTokenizer passes its own)
      spec.pop(per_call, None)
    text = json.dumps(spec, sort_keys=True)
  else:
    text = json.dumps(sorted(hf.get_vocab().items()))
  return hashlib.sha256(f"{type(hf).__name__}|{text}".encode()).hexdigest()


def tower_architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What changes a tower's pooled features besides its parameters and its input ids."""
  t = config.model.text
  return {"width": t.width, "depth": t.depth, "num_heads": t.num_heads, "mlp_dim": t.mlp_dim,
          "max_len": t.max_len, "pooling": t.pooling, "dtype": config.model.dtype}


def tower_identity(config: ml_collections.ConfigDict, text_params: Any, tokenizer: TextTokenizer) -> dict[str, Any]:
  """The manifest fields a run's tower must match, plus `tower_id` (a hash of all of them)."""
  ident = {"params_sha256": params_sha256(text_params), "tower": tower_architecture(config),
           "tokenizer_sha256": tokenizer_sha256(tokenizer),
           "max_phrase_len": config.data.max_phrase_len, "max_prompt_len": config.data.max_prompt_len}
  ident["tower_id"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
  return ident


def default_path(data_dir: str, identity: dict[str, Any]) -> str:
  return fs.join(data_dir, FOLDER, identity["tower_id"])


# --- encoding ------------------------------------------------------------------------------------
def bucket_lengths(tokens: np.ndarray) -> np.ndarray:
  """Each row's encode length: the next power of two >= its token count, at least 8, at most L."""
  lengths = (tokens != 0).sum(axis=1)
  return np.minimum(tokens.shape[1], np.maximum(8, 2 ** np.ceil(np.log2(np.maximum(lengths, 1))))).astype(int)


def encode_in_buckets(encode: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, rows: int,
                      width: int) -> np.ndarray:
  """(N, L) token ids -> (N, width) float32 features, `rows` texts per `encode` call, each text cut
  to its length bucket: short texts do not pay for the longest, the encoder compiles once per
  bucket, and (mean pooling ignores padding) a text's features do not depend on its companions.
  With the same `rows` on one device, the table and the training cache give a text the same
  features bit for bit; another chunk size changes XLA's blocking (~1e-6 on MiniLM's features)."""
  out = np.zeros((len(tokens), width), np.float32)
  buckets = bucket_lengths(tokens)
  for length in np.unique(buckets):
    members = np.flatnonzero(buckets == length)
    for i in range(0, len(members), rows):
      chunk = members[i:i + rows]
      padded = np.zeros((rows, length), np.int32)
      padded[:len(chunk)] = tokens[chunk, :length]
      out[chunk] = np.asarray(encode(padded))[:len(chunk)]
  return out


def sharded_encoder(model_text, text_params: Any, devices: list | None = None
                    ) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
  """(`encode(tokens (rows, L)) -> (rows, width)`, device count): jitted, the texts split over a
  one-axis 'data' mesh of `devices` (default: this process's), the params replicated."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = list(devices or jax.local_devices())
  mesh = Mesh(np.array(devices), ("data",))
  params = jax.device_put(text_params, NamedSharding(mesh, P()))
  fn = jax.jit(lambda p, t: model_text.apply({"params": p}, t)["pooled"],
               in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
               out_shardings=NamedSharding(mesh, P()))
  return (lambda tokens: np.asarray(fn(params, tokens))), len(devices)


# --- what the pipeline can emit ------------------------------------------------------------------
def enumerate_texts(config: ml_collections.ConfigDict, data_dir: str) -> tuple[list[str], list[str]]:
  """(every slot text the training pipeline can emit from `data_dir`'s train split, the label
  prompts): the pipeline's own sampler options, so the table covers what training draws."""
  from avlm_jax.train import data as train_data
  from data_pipelines import input_pipeline, schema

  paths = schema.shard_paths(data_dir, "train")
  texts = input_pipeline.possible_slot_texts(paths, train_data.text_sampling_options(config))
  return sorted(texts), train_data.label_prompt_texts(config)


def table_tokens(config: ml_collections.ConfigDict, tokenizer: TextTokenizer, phrases: list[str],
                 prompts: list[str]) -> list[np.ndarray]:
  """The token rows the pipeline and the label prompts give these texts (two lengths)."""
  return [tokenizer(phrases, config.data.max_phrase_len), tokenizer(prompts, config.data.max_prompt_len)]


# --- the table on disk ---------------------------------------------------------------------------
def write_table(out: str, keys: np.ndarray, features: np.ndarray, manifest: dict[str, Any],
                shard_rows: int = 1 << 16) -> dict[str, Any]:
  """Write `features` (N, D) under their int64 `keys` (deduplicated, sorted) into the folder `out`,
  replacing a table already there only once the new one is whole. Returns the manifest."""
  keys, first = np.unique(np.asarray(keys, np.int64), return_index=True)
  features = np.ascontiguousarray(features[first], np.float32)
  n = len(keys)
  num_shards = max(1, -(-n // shard_rows))
  tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  shards = []
  for s in range(num_shards):
    lo, hi = s * shard_rows, min(n, (s + 1) * shard_rows)
    names = {k: f"{k}-{s:05d}-of-{num_shards:05d}.npy" for k in ("keys", "features")}
    np.save(os.path.join(tmp, names["keys"]), keys[lo:hi])
    np.save(os.path.join(tmp, names["features"]), features[lo:hi])
    shards.append({**names, "count": int(hi - lo)})
  manifest = {"format": FORMAT, **manifest, "count": n, "dim": int(features.shape[1]), "dtype": "float32",
              "key": "int64 of avlm_jax.tokenizer.token_hash(padded token ids)", "shards": shards}
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  old = f"{out.rstrip('/')}.old-{os.getpid()}"
  if os.path.exists(out):
    os.replace(out, old)
  os.replace(tmp, out)
  shutil.rmtree(old, ignore_errors=True)
  return manifest


def table_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


class FeatureTable:
  """A table opened for lookups: the keys in memory, the features memory-mapped per shard."""

  def __init__(self, path: str, manifest: dict[str, Any]):
    self.path, self.manifest = path, manifest
    self.dim = int(manifest["dim"])
    keys, self._features, starts = [], [], [0]
    for shard in manifest["shards"]:
      k = np.load(os.path.join(path, shard["keys"]))
      f = np.load(os.path.join(path, shard["features"]), mmap_mode="r")
      if len(k) != shard["count"] or f.shape != (shard["count"], self.dim):
        raise TextFeatureTableError(f"text feature table {path}: shard {shard['features']} holds "
                                    f"{f.shape}, the manifest says ({shard['count']}, {self.dim}); rebuild it")
      keys.append(k)
      self._features.append(f)
      starts.append(starts[-1] + len(k))
    self._keys = np.concatenate(keys) if keys else np.zeros((0,), np.int64)
    self._starts = np.asarray(starts)
    if np.any(np.diff(self._keys) <= 0):
      raise TextFeatureTableError(f"text feature table {path}: keys are not sorted and distinct; rebuild it")

  def __len__(self) -> int:
    return len(self._keys)

  @property
  def nbytes(self) -> int:
    """Host bytes the table can occupy: the in-memory keys plus every feature row paged in."""
    return self._keys.nbytes + len(self._keys) * self.dim * 4

  @classmethod
  def open(cls, path: str, identity: dict[str, Any] | None = None) -> "FeatureTable":
    """Open the table folder `path` (a gs:// table from a local copy: its rows are memory-mapped);
    with `identity` (tower_identity of the run), refuse a table another tower or tokenizer made,
    naming the table and the first field that differs."""
    if fs.is_remote(path):
      table = cls.open(fs.local_copy(path), identity)
      table.path = path
      return table
    mf = os.path.join(path, MANIFEST)
    if not os.path.isfile(mf):
      raise TextFeatureTableError(f"text feature table {path}: no {MANIFEST} there (build one with "
                                  "python -m launch.precompute_text_features)")
    try:
      with open(mf) as f:
        manifest = json.load(f)
    except (OSError, ValueError) as e:
      raise TextFeatureTableError(f"text feature table {mf} cannot be read: {e}") from None
    if manifest.get("format") != FORMAT:
      raise TextFeatureTableError(f"text feature table {path}: format {manifest.get('format')!r}, "
                                  f"this code reads {FORMAT!r}; rebuild it")
    if identity is not None:
      for field in IDENTITY_FIELDS:
        if manifest.get(field) != identity[field]:
          raise TextFeatureTableError(
              f"text feature table {path} was made by another tower or tokenizer: {field} is "
              f"{_short(manifest.get(field))} there, {_short(identity[field])} for this run (rebuild it with "
              "python -m launch.precompute_text_features, or set text_features.table='')")
    return cls(path, manifest)

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 keys (N,) -> (found (N,) bool, features (found.sum(), dim) float32, in key order)."""
    keys = np.asarray(keys, np.int64)
    if not len(self._keys):
      return np.zeros(len(keys), bool), np.zeros((0, self.dim), np.float32)
    pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
    found = self._keys[pos] == keys
    rows = pos[found]
    out = np.empty((len(rows), self.dim), np.float32)
    shard = np.searchsorted(self._starts, rows, side="right") - 1
    for s in np.unique(shard):
      sel = shard == s
      out[sel] = self._features[s][rows[sel] - self._starts[s]]
    return found, out


def _short(value: Any) -> str:
  s = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
  return s[:12] if isinstance(value, str) and len(s) == 64 else s  # a hash: its first 12 digits


def resolve_table(setting: str, data_dir: str, identity: dict[str, Any], say: Callable[[str], None]
                  ) -> FeatureTable | None:
  """The table `text_features.table` names for this run: '' none; 'auto' the one for this tower
  under <data_dir>/text_features/ if it is there (else None, said once); a path: that table,
  which must exist and match."""
  if not setting:
    return None
  if setting == "auto":
    path = default_path(data_dir, identity)
    if not fs.isdir(path):
      say(f"text features: no table for this tower at {path}; encoding texts as they come "
          "(python -m launch.precompute_text_features writes one)")
      return None
  else:
    path = setting
    if not fs.isdir(path):
      raise TextFeatureTableError(f"text feature table {path} (text_features.table) does not exist")
  return FeatureTable.open(path, identity)


# --- building one ----------------------------------------------------------------------------------
def frozen_text_params(config: ml_collections.ConfigDict, tokenizer: TextTokenizer, say: Callable[[str], None]):
  """(model, text params) exactly as a fresh training run of `config` starts with them: the same
  initialisation from config.seed, then the pretrained tower (a frozen tower never changes)."""
  from avlm_jax import sharding
  from avlm_jax.train import data as train_data
  from avlm_jax.train import pretrained
  from avlm_jax.train.compiled_steps import compile_run

  mesh = sharding.make_mesh(config.mesh.to_dict(), None, config.mesh_dcn.to_dict())
  prompts = tokenizer(train_data.label_prompt_texts(config), config.data.max_prompt_len)
  pretrained.check_text_config(config.model.text, tokenizer.vocab_size)
  run = compile_run(config, tokenizer.vocab_size, prompts.shape, mesh, lambda _: None)  # compiles no step
  state = run.plan.initialize(jax.random.key(config.seed))
  params, summaries = pretrained.load_pretrained(state.params, config.model, config.data.image_size)
  for line in summaries:
    say(line)
  return run.model, params["text"]


def precompute(config: ml_collections.ConfigDict, data_dir: str, out: str | None = None,
               rows: int = 64, shard_rows: int = 1 << 16, say: Callable[[str], None] = print) -> dict[str, Any]:
  """Build the feature table of `config`'s frozen text tower for the corpus in `data_dir` (made
  first if the config generates it). Returns the manifest, with `path` and `bytes` added."""
  from avlm_jax.train import data as train_data

  if not config.model.text.frozen:
    raise ConfigValueError("model.text.frozen is False: a trained tower's features change every step, "
                           "so there is nothing to precompute")
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: data.dir points at DIR
  config.data.dir = data_dir
  data_dir, tokenizer = train_data.prepare_dataset(config, data_dir)
  model, text_params = frozen_text_params(config, tokenizer, say)
  return build_table(config, data_dir, tokenizer, model.text, text_params, out, rows, shard_rows, say)


def build_table(config: ml_collections.ConfigDict, data_dir: str, tokenizer: TextTokenizer, model_text,
                text_params: Any, out: str | None = None, rows: int = 64, shard_rows: int = 1 << 16,
                say: Callable[[str], None] = print) -> dict[str, Any]:
  """Enumerate, encode with (`model_text`, `text_params`) and write the table (see `precompute`)."""
  t0 = time.perf_counter()
  phrases, prompt_texts = enumerate_texts(config, data_dir)
  t_enum = time.perf_counter() - t0
  identity = tower_identity(config, text_params, tokenizer)
  tokens = table_tokens(config, tokenizer, phrases, prompt_texts)
  keys = np.concatenate([keys_of(t) for t in tokens])
  encode, n_dev = sharded_encoder(model_text, text_params)
  rows = max(n_dev, rows // n_dev * n_dev)  # whole rows per device
  say(f"text features: {len(phrases)} slot texts and {len(prompt_texts)} label prompts of {data_dir} "
      f"(enumerated in {t_enum:.1f}s); encoding on {n_dev} device(s), {rows} texts per call")
  t0 = time.perf_counter()
  features = np.concatenate([encode_in_buckets(encode, t, rows, config.model.text.width) for t in tokens])
  t_enc = time.perf_counter() - t0
  path = out or default_path(data_dir, identity)
  with fs.staged_dir(path, last=(MANIFEST,)) as local:  # a gs:// table: uploaded when whole
    manifest = write_table(local, keys, features, {
        **identity, "phrase_texts": len(phrases), "prompt_texts": len(prompt_texts),
        "data_dir": fs.abspath(data_dir), "text_sampling": config.data.text_sampling.to_dict(),
        "labels": list(config.labels), "encode_seconds": round(t_enc, 2), "enumerate_seconds": round(t_enum, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, shard_rows)
    manifest.update(path=path, bytes=table_bytes(local))
  say(f"text features: {manifest['count']} rows × {manifest['dim']} ({manifest['bytes'] / 2**20:.1f} MiB, "
      f"{len(manifest['shards'])} shard(s)) encoded in {t_enc:.1f}s -> {path}")
  return manifest

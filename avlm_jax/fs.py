"""One filesystem layer: local paths and `gs://` URLs behind the same few functions.

Local paths go straight to `os` (unchanged behaviour, atomic writes by rename). `gs://` goes to
fsspec's `gcsfs`: the same client that `etils.epath` (and so orbax and Grain) uses for `gs://` when
TensorFlow is absent, so one set of credentials and one configuration serve the whole run. Array
shards are read by `array_record`'s own GCS reader and checkpoint arrays by tensorstore's; the
libraries that only take local files (tokenizers, the ArrayRecord writer) get a local copy
(`local_copy`) or write to a staging folder that is uploaded when complete (`staged_dir`).

Every failure on a `gs://` path is re-raised as one `StorageError` line naming the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Iterator

REMOTE_SCHEMES = ("gs://",)


class StorageError(OSError):
  """A `gs://` read, write or listing failed; the message names the URL and the cause."""


def is_remote(path: str) -> bool:
  return str(path).startswith(REMOTE_SCHEMES)


def emulator_env(endpoint: str) -> dict[str, str]:
  """The environment that points every GCS client the project uses at a local emulator (e.g.
  `gcp-storage-emulator start --port=9023` -> `http://127.0.0.1:9023`): gcsfs, array_record's
  reader and tensorstore (orbax's arrays) each read their own variable."""
  return {
      "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs, google-cloud-storage
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,  # array_record's gs:// reader
      "TENSORSTORE_GCS_HTTP_URL": endpoint,  # orbax's array writes and reads
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
      # gcsfs's default subclass asks the storage-control API (not emulated) about every bucket.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "EPATH_USE_TF": "false",
  }


def _gcs():
  import logging

  import fsspec

  # Its failures reach the user as one StorageError line; its own tracebacks would bury it.
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

  try:
    # Other processes (a killed run, orbax's tensorstore writes) change the bucket behind gcsfs's
    # back: never answer a listing from its cache.
    return fsspec.filesystem("gs", use_listings_cache=False, skip_instance_cache=False)
  except ImportError as e:
    raise StorageError(f"gs:// paths need gcsfs ({e}); pip install gcsfs") from None


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) < 300 else text[:297] + "..."


@contextlib.contextmanager
def _named(url: str, what: str) -> Iterator[None]:
  """Turn whatever the GCS client raises into one StorageError line naming `url`."""
  try:
    yield
  except StorageError:
    raise
  except FileNotFoundError:
    raise StorageError(f"{url}: {what}: no such object or folder") from None
  except Exception as e:  # noqa: BLE001: gcsfs, aiohttp and google-auth raise many kinds
    raise StorageError(f"{url}: {what} failed: {type(e).__name__}: {_one_line(e)}") from None


def join(base: str, *parts: str) -> str:
  if is_remote(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def abspath(path: str) -> str:
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def basename(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def _info(path: str) -> dict | None:
  """gcsfs's description of an object or folder; None when there is none. (gcsfs's own `exists`
  and `isdir` answer False for an unreachable bucket too; here only "not found" is False.)"""
  with _named(path, "looking up"):
    try:
      return _gcs().info(path)
    except FileNotFoundError:
      return None


def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  return _info(path) is not None


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  info = _info(path)
  return info is not None and info.get("type") == "directory"


def listdir(path: str) -> list[str]:
  """Names (not paths) of the entries of a folder."""
  if not is_remote(path):
    return os.listdir(path)
  with _named(path, "listing"):
    own = path[len("gs://"):].rstrip("/")
    return sorted({basename(p) for p in _gcs().ls(path, detail=False) if p.rstrip("/") != own})


def makedirs(path: str) -> None:
  """Create a folder (no-op on GCS, where folders are prefixes)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  with _named(path, "reading"):
    return _gcs().cat_file(path)


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
  """Write a whole file: locally through a temporary file and a rename, so a crash leaves the old
  content whole; on GCS one object upload, which is atomic."""
  if not is_remote(path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
    return
  with _named(path, "writing"):
    _gcs().pipe_file(path, data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  if not is_remote(path):
    os.remove(path)
    return
  with _named(path, "deleting"):
    _gcs().rm(path)


def rename(src: str, dst: str) -> None:
  """Move a file or folder. On GCS a folder moves object by object: server-side copies, then the
  deletes (gcsfs's `mv` tries the newer objects.move API first, which not every GCS server has)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  with _named(src, f"moving to {dst}"):
    client = _gcs()
    client.copy(src, dst, recursive=True)
    client.rm(src, recursive=True)


def upload_dir(local: str, url: str, *, last: tuple[str, ...] = ()) -> None:
  """Copy every file under the local folder `local` to the folder `url`; the top-level files named
  in `last` (a folder's completion marker, e.g. `dataset_info.json`) go after all the others."""
  files = []
  for root, _, names in os.walk(local):
    rel = os.path.relpath(root, local)
    files += [name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}" for name in names]
  files.sort(key=lambda rel: (rel in last, rel))
  with _named(url, f"uploading {local}"):
    fs = _gcs()
    for rel in files:
      fs.put_file(os.path.join(local, *rel.split("/")), join(url, rel))


def local_copy(path: str, cache_root: str | None = None) -> str:
  """A local path holding the file or folder `path`: `path` itself when it is local, else a copy
  downloaded into `cache_root` (default: a per-user temporary folder) once per URL and version of
  its objects, so a folder rewritten at the same URL is fetched again. For libraries that only open
  local files (SentencePiece, Hugging Face tokenizers, memory-mapped tables)."""
  if not is_remote(path):
    return path
  with _named(path, "downloading"):
    client = _gcs()
    info = client.info(path)  # FileNotFoundError: named by _named
    objects = client.find(path, detail=True) if info.get("type") == "directory" else {info["name"]: info}
  version = sorted((name, str(o.get("generation") or o.get("etag") or ""), int(o.get("size") or 0))
                   for name, o in objects.items())
  key = hashlib.sha256(repr((path.rstrip("/"), version)).encode()).hexdigest()[:16]
  cache_root = cache_root or os.path.join(tempfile.gettempdir(), f"avlm_jax_gcs_{os.getuid()}")
  dst = os.path.join(cache_root, f"{key}_{basename(path)}")
  if os.path.exists(dst):
    return dst
  os.makedirs(cache_root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".download_", dir=cache_root)
  try:
    with _named(path, "downloading"):
      if info.get("type") == "directory":
        out = os.path.join(tmp, "d")
        os.makedirs(out)
        prefix = path.rstrip("/")[len("gs://"):] + "/"
        for obj in objects:
          rel = obj[len(prefix):]
          os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
          client.get_file(obj, os.path.join(out, rel))
      else:
        out = os.path.join(tmp, "f")
        client.get_file(path, out)
    try:
      os.replace(out, dst)
    except OSError:  # another process finished the same download first
      if not os.path.exists(dst):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dst


@contextlib.contextmanager
def staged_dir(path: str, *, last: tuple[str, ...] = (), resumable: bool = False) -> Iterator[str]:
  """A local folder to write the folder `path` into: `path` itself when local (the writer creates
  it, as it would without this); for a URL a temporary folder whose files are uploaded to `path`
  (those named in `last` at the end) when the block ends without an error, so a failed build
  leaves nothing half-written in the bucket. `resumable`: the folder is named after the URL and
  kept when the block fails, so a rerun of a resumable writer (the MIMIC converter) goes on."""
  if not is_remote(path):
    yield path
    return
  if resumable:
    key = hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
    tmp = os.path.join(tempfile.gettempdir(), f"avlm_jax_stage_{os.getuid()}", key)
    os.makedirs(tmp, exist_ok=True)
  else:
    tmp = tempfile.mkdtemp(prefix="avlm_stage_")
  ok = False
  try:
    yield tmp
    upload_dir(tmp, path, last=last)
    ok = True
  finally:
    if ok or not resumable:
      shutil.rmtree(tmp, ignore_errors=True)

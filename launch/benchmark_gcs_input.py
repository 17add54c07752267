r"""Input throughput from a bucket beside a local folder: records/s through the training pipeline.

  python -m launch.benchmark_gcs_input                       # tiny's SynthCXR corpus, built once
  python -m launch.benchmark_gcs_input --data=DIR --batches=40 --workers=0,2

Starts a local GCS server (gcp-storage-emulator, the `test` extra) on 127.0.0.1, uploads the
corpus' train split to it, and reads the same records through `launch.train`'s Grain pipeline
(decode, tokenize, region-text sampling, batching) from the folder and from gs://, with each
`data.num_workers`. The emulator is a single-threaded Python server on the same cores, so the
gs:// rows measure the client path and its overheads, not Cloud Storage's bandwidth. Measures;
asserts nothing.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_DATA = flags.DEFINE_string("data", "", "A triple folder with a train split (default: tiny's SynthCXR corpus, built).")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches timed per setting (after 2 warm-up batches).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "data.num_workers settings.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")


def _emulator() -> tuple[subprocess.Popen, str]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                           f"--port={port}", "--default-bucket=bench", "--in-memory", "--quiet"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(600):
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      return proc, f"http://127.0.0.1:{port}"
    except OSError:
      time.sleep(0.1)
  proc.kill()
  raise SystemExit("error: the GCS emulator did not start (pip install gcp-storage-emulator)")


def _records_per_s(config, data_dir: str, tokenizer, num_workers: int) -> float:
  import numpy as np

  from avlm_jax.train import data as train_data

  config.data.num_workers = num_workers
  it = train_data.make_train_iterator(config, data_dir, tokenizer)
  for _ in range(2):  # warm-up: workers start, shards open, first reads
    next(it)
  t = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = next(it)
  dt = time.perf_counter() - t
  assert np.asarray(batch["image"]).shape[0] == config.batch_size
  return _BATCHES.value * config.batch_size / dt


def main(argv):
  del argv
  from avlm_jax import fs
  from avlm_jax.train import data as train_data
  from configs import tiny

  config = tiny.get_config("")
  config.batch_size = _BATCH.value
  work = tempfile.mkdtemp(prefix="bench_gcs_")
  if _DATA.value:
    config.data.kind, config.data.dir = "array_record", _DATA.value
  local_dir, tokenizer = train_data.prepare_dataset(config, work)  # builds tiny's corpus if asked
  config.data.kind, config.data.dir = "array_record", local_dir
  proc, endpoint = _emulator()
  try:
    os.environ.update(fs.emulator_env(endpoint))
    remote = "gs://bench/corpus"
    t = time.time()
    fs.upload_dir(local_dir, remote)
    print(f"uploaded {local_dir} to the emulator in {time.time() - t:.1f}s")
    print("| source | data.num_workers | records/s |")
    print("|---|---|---|")
    for workers in map(int, _WORKERS.value):
      for name, d in (("local folder", local_dir), ("gs:// (emulator)", remote)):
        rate = _records_per_s(config, d, tokenizer, workers)
        print(f"| {name} | {workers} | {rate:.0f} |", flush=True)
  finally:
    proc.terminate()


if __name__ == "__main__":
  app.run(main)

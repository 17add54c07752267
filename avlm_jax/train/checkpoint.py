"""Orbax checkpoints holding, in one step directory, the train state, the Grain iterator state and
the config that produced them; and the compatibility check made before any restore.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from avlm_jax import fs

# Config subtrees that must match for a resume to be the same run (shapes, data order).
RESUME_KEYS = ("model", "data", "labels", "seed", "batch_size")
# Keys under RESUME_KEYS that may change freely between runs (throughput knobs). Not
# `data.num_workers`: Grain's in-process and multi-worker iterators save different states.
RESUME_FREE = ("data.num_threads", "data.prefetch",
               "data.max_bad_records",  # raising the limit after a stop must let the run go on
               "model.attention")  # how attention runs, not what it computes: same params
# Keys added after checkpoints were already written, with the value older checkpoints implied.
ADDED_KEYS = {"model.image.anatomy_tokens": True, "model.image.pool": "cls",
              "model.separate_text_projections": False, "data.tokenizer": "corpus",
              "data.tokenizer_vocab_size": 1000, "data.tokenizer_model_type": "unigram",
              "model.attention": "xla", "data.synthcxr.patients": "ct"}


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoint was written by a config this run cannot continue from."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (disk full, permissions); earlier checkpoints are intact."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved: dict, current: dict) -> list[str]:
  """Human-readable differences between two JSON-normal config dicts on the resume-relevant keys."""
  a = flatten({k: saved.get(k) for k in RESUME_KEYS})
  b = flatten({k: current.get(k) for k in RESUME_KEYS})
  diffs = []
  for key in sorted(set(a) | set(b)):
    if any(key == f or key.startswith(f + ".") for f in RESUME_FREE):
      continue
    va, vb = a.get(key, ADDED_KEYS.get(key, "<absent>")), b.get(key, "<absent>")
    if va != vb:
      diffs.append(f"{key}: {va!r} in the checkpoint, {vb!r} now")
  return diffs


def _path(path) -> str:
  """`opt_state.1.0.mu.image.block_0...`: one spelling for dataclass, dict and tuple keys alike."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(parts)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items `state`, `data_iter` and `config`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = fs.abspath(directory)  # a folder or a gs:// URL (orbax writes both)
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, config: dict, *, force: bool = False) -> bool:
    try:
      return self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data_iter=grain.checkpoint.CheckpointSave(data_iter),
          config=ocp.args.JsonSave(config)), force=force)
    except (OSError, ValueError, RuntimeError) as e:  # the write or a failed earlier one
      raise self._save_error(e) from None

  def saved_config(self, step: int) -> dict:
    """The config (JSON) saved with step `step`."""
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def check_config(self, step: int, config: dict) -> None:
    """Raise IncompatibleCheckpointError naming the config keys that differ (cheap: run it before
    building anything)."""
    diffs = config_differences(self.saved_config(step), config)
    if diffs:
      raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} was written by a different config; it cannot be resumed "
          "with this one:\n  " + "\n  ".join(diffs)
          + "\nUse a new --workdir, or run with the config it was made with.")

  def check_compatible(self, step: int, abstract_state: Any, config: dict) -> None:
    """Raise IncompatibleCheckpointError naming the config keys or parameters that differ."""
    where = f"checkpoint {self.directory}/{step}"
    self.check_config(step, config)
    meta = self.manager.item_metadata(step)["state"]
    saved_shapes = {_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
    want_shapes = {_path(p): tuple(s.shape)
                   for p, s in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    problems = [f"{k}: missing in the checkpoint" for k in sorted(set(want_shapes) - set(saved_shapes))]
    problems += [f"{k}: not in this model" for k in sorted(set(saved_shapes) - set(want_shapes))]
    problems += [f"{k}: shape {saved_shapes[k]} in the checkpoint, {want_shapes[k]} now"
                 for k in sorted(set(saved_shapes) & set(want_shapes)) if saved_shapes[k] != want_shapes[k]]
    if problems:
      raise IncompatibleCheckpointError(
          f"{where} does not fit this model's train state:\n  " + "\n  ".join(problems[:20])
          + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""))

  def restore(self, step: int, abstract_state: Any, data_iter: Any, config: dict) -> Any:
    """Check compatibility, then restore the state (resharded to `abstract_state`) and the iterator."""
    self.check_compatible(step, abstract_state, config)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]

  def check_for_errors(self) -> None:
    """Raise CheckpointSaveError (one line) if a finished background save failed. Orbax writes each
    step to a temporary directory and renames it when complete, so a failed save leaves every
    earlier step as it was."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001: whatever the writer raised, named in one line
      raise self._save_error(e) from None

  def newest_readable_config(self, config: dict, say) -> int:
    """The newest step whose saved config can be read (0: none), checked against `config` (cheap: run
    it before building anything). A step that cannot be read is named and set aside."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        self.check_config(step, config)
        return step
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # noqa: BLE001: a damaged step, whatever the reader raises
        self.set_aside(step, e, say)
    return 0

  def restore_newest(self, abstract_state: Any, data_iter: Any, config: dict, say) -> tuple[int, Any]:
    """(step, state) of the newest step that restores; (0, None) when none does. A step that
    cannot be read (truncated by a failing disk, a half-copied folder) is named and set aside."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self.restore(step, abstract_state, data_iter, config)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # noqa: BLE001
        self.set_aside(step, e, say)
    return 0, None

  def set_aside(self, step: int, error: BaseException, say) -> None:
    """Rename an unreadable step folder to `<step>.unreadable` (nothing is deleted), so training
    can save that step again."""
    src = fs.join(self.directory, str(step))
    dst = f"{src}.unreadable"
    n = 1
    while fs.exists(dst):
      n += 1
      dst = f"{src}.unreadable{n}"
    if jax.process_index() == 0:  # one process renames; the others wait for it
      fs.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.reload()
    say(f"warning: checkpoint {src} cannot be read ({_one_line(error)}); moved to {dst}, falling back "
        "to the step before it")

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(e) from None

  def _save_error(self, e: BaseException) -> CheckpointSaveError:
    return CheckpointSaveError(f"saving a checkpoint to {self.directory} failed: {_one_line(e)}; the "
                               f"earlier checkpoints there are intact (latest complete: step "
                               f"{self.manager.latest_step()})")

  def close(self) -> None:
    self.manager.close()


def _one_line(e: BaseException) -> str:
  """The innermost cause of an exception chain, as `Type: message` on one line."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split()) or type(e).__name__
  return f"{type(e).__name__}: {text}"[:400]

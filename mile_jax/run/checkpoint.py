"""Orbax checkpointing of the train state: save, keep the newest, restore onto any mesh.

A checkpoint `<dir>/<step>/` holds three items:
- `state`: the TrainState (params, optimizer state, step);
- `config`: the resolved config as JSON;
- `meta`: what else resuming and evaluation need: the data position (the
  global batch at step s is a pure function of the seed and s, so the data
  iterator's state is the step), and the tokenizer (its SentencePiece model,
  base64, and its SHA-256).

Only finished steps are listed (`checkpoint_steps`): on a filesystem Orbax
renames a complete step into place, on an object store it writes
`commit_success.txt` last, so a process killed while saving leaves no step
that is read. A step that is listed but shown to be damaged when read (see
`Checkpointer.damage_reason`; on an object store a missing object is read
again before it is believed) is marked `<dir>/<step>.unreadable`, nothing
copied or moved, and the previous one restored; any other failure to read
it (out of memory, a timeout of the object store) is raised and nothing is marked.

A failed save raises CheckpointError naming the step, the reason and the last
complete checkpoint: Orbax deletes old steps only once a new one is complete,
so the steps saved before are intact.

Orbax reports one failed read or write many times over from its background
threads: tracebacks of the same error, and "Event loop is closed" from reads
or writes abandoned by the failure. The CheckpointError or the fallback
warning says what failed, so those echoes are dropped (`checkpoint_errors.quiet_orbax_echoes`).
"""

import base64
import hashlib
import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mile_jax import config_lib
from mile_jax.core import model as model_lib
from mile_jax.run import checkpoint_errors
from mile_jax.run import checkpoint_steps
from mile_jax.run import workdir as workdir_lib

# Seconds to wait before each new read of a step whose objects an object store reported missing.
OBJECT_STORE_RETRY_DELAYS = (1.0, 4.0)
# What restore_latest's processes report of one step.
_RESTORED, _DAMAGED, _FAILED = 0, 1, 2


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved, or checkpoints exist and none can be restored."""


class Checkpointer:
  """Saves the train state every `every_steps` and restores the latest readable one.

  Restoring takes an abstract state whose leaves carry the target shardings,
  so a checkpoint restores onto a different mesh or number of devices.
  """

  def __init__(self, directory: str, *, every_steps: int, max_to_keep: int, async_save: bool = True):
    self.directory = workdir_lib.resolve(directory)
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._pending = None  # The step whose save may still be running in the background.
    checkpoint_errors.quiet_orbax_echoes()

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """The finished steps, ascending, less those marked unreadable."""
    marked = checkpoint_steps.unreadable_steps(self.directory)
    return sorted(s for s in self._manager.all_steps() if s not in marked)

  def step_path(self, step: int) -> str:
    return workdir_lib.join(self.directory, str(step))

  def should_save(self, step: int, final: bool = False) -> bool:
    return final or step % self.every_steps == 0

  def save(self, step: int, state: Any, config_json: dict | None = None, meta: dict | None = None) -> None:
    """Starts saving `state` at `step` (asynchronously where enabled) once the
    previous save is complete.

    `state` may be donated to the next step meanwhile: a buffer Orbax still
    reads is copied rather than reused. Orbax deletes the oldest steps beyond
    `max_to_keep` only once this one is complete, so the last good checkpoint
    survives a failed save.

    Raises:
      CheckpointError: this save or the previous one failed.
    """
    self._finish_pending()
    superseded = sorted(s for s in checkpoint_steps.unreadable_steps(self.directory) if s <= step)
    if superseded:
      self._remove_unreadable(superseded)
    items = {"state": ocp.args.StandardSave(state)}
    if config_json is not None:
      items["config"] = ocp.args.JsonSave(config_json)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._pending = step

  def _finish_pending(self) -> None:
    """Waits for the save in progress; raises CheckpointError if it failed."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, error: BaseException) -> CheckpointError:
    try:
      self._manager.reload()  # Forgets the failed step, which Orbax listed when the save began.
      latest = self._manager.latest_step()
      last = (f"the last complete checkpoint is {self.step_path(latest)}" if latest is not None
              else "no checkpoint is complete")
    except Exception as e:  # pylint: disable=broad-except
      last = f"{self.directory} cannot be listed ({checkpoint_errors.describe_error(e)})"
    return CheckpointError(f"could not save step {step} to {self.step_path(step)} ({checkpoint_errors.describe_error(error)}); {last}")

  def _remove_unreadable(self, steps: list[int]) -> None:
    """Deletes `steps`, marked unreadable, before this run saves that step or a later one: kept
    beside the good ones, Orbax would count them among the `max_to_keep` newest."""
    if jax.process_index() == 0:
      for step in steps:
        checkpoint_steps.remove_step(self.directory, step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mile_jax_checkpoint_remove_unreadable")
    self._manager.reload()

  def _restore_retrying(self, step: int, abstract_state: Any) -> Any:
    """`restore`, read again after a pause when an object store reports an object
    missing (a listing that lags, a read racing a write) before that is believed."""
    delays = OBJECT_STORE_RETRY_DELAYS if workdir_lib.is_remote(self.directory) else ()
    for delay in delays:
      try:
        return self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        if not checkpoint_errors.is_missing(e):
          raise
        logging.warning("Reading checkpoint %s again in %.0f s (%s)", self.step_path(step), delay,
                        checkpoint_errors.describe_error(e))
        time.sleep(delay)
    return self.restore(step, abstract_state)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state at `step` with the shardings of `abstract_state`'s leaves.

    Every process reads its own shards with no barrier among processes, so
    that a failure on one leaves no other waiting (see `restore_latest`).
    """
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    handler = ocp.StandardCheckpointHandler(multiprocessing_options=alone)
    saved_layout = self._saved_layout(step, abstract_state)
    with ocp.Checkpointer(handler, multiprocessing_options=alone) as reader:
      state = reader.restore(workdir_lib.join(self.step_path(step), "state"),
                             args=ocp.args.StandardRestore(saved_layout))
    logging.info("Restored checkpoint %s", self.step_path(step))
    return self._to_layout(state, abstract_state, step)

  def _saved_layout(self, step: int, abstract_tree: Any, saved_shapes: dict | None = None) -> Any:
    """`abstract_tree` (a state, or {"params": ...}) in the layer layout the checkpoint at
    `step` was saved in (`model.scan_layers`), with the shardings converted alike.
    `saved_shapes`: the step's `state_shapes`, when the caller has read them already."""
    try:
      shapes = self.state_shapes(step) if saved_shapes is None else saved_shapes
    except Exception:  # pylint: disable=broad-except  # An unreadable step fails in the restore itself.
      return abstract_tree
    names = [k for k in shapes if k.startswith("params/")]
    if not names:
      return abstract_tree
    scanned = any(k.startswith(f"params/{model_lib.SCANNED}/") for k in names)
    return model_lib.with_layout(abstract_tree, scanned)

  @staticmethod
  def _to_layout(restored: Any, abstract_tree: Any, step: int) -> Any:
    """`restored` in `abstract_tree`'s layer layout and shardings; logs a conversion."""
    converted = model_lib.with_layout(restored, model_lib.is_scanned(_params_of(abstract_tree)))
    if converted is restored:
      return restored
    logging.info("Converted checkpoint step %d to %s layers", step,
                 "scanned" if model_lib.is_scanned(_params_of(abstract_tree)) else "unrolled")
    return jax.device_put(converted, jax.tree.map(lambda a: a.sharding, abstract_tree))

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only the state's `params` subtree at `step`, with the shardings
    of `abstract_params`'s leaves (ShapeDtypeStructs, see `abstract_with_shardings`).

    The optimizer state is never read (an Orbax partial restore of the `state`
    item), so memory peaks at the parameters' size, not three times it as for
    AdamW's full state.

    Raises:
      ConfigError: naming the first parameter whose name or shape differs from
        `abstract_params`, before reading any array (a partial restore would
        silently leave a parameter the checkpoint lacks unrestored).
      CheckpointError: the state's metadata lists no parameters.
    """
    shapes = self.state_shapes(step)
    saved = {k: v for k, v in shapes.items() if k.startswith("params/")}
    if not saved:
      raise CheckpointError(f"checkpoint {self.step_path(step)}: no parameters in the metadata of its state "
                            f"({workdir_lib.join(self.step_path(step), 'state')})")
    wanted_tree = self._saved_layout(step, {"params": abstract_params}, shapes)
    wanted = tree_shapes(wanted_tree)
    if saved != wanted:
      raise config_lib.ConfigError(f"checkpoint {self.step_path(step)} holds other parameters than this model "
                                   f"({_first_difference(saved, wanted)})")
    restore_args = ocp.checkpoint_utils.construct_restore_args(wanted_tree["params"])
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(workdir_lib.join(self.step_path(step), "state"), args=ocp.args.PyTreeRestore(
          item=wanted_tree, restore_args={"params": restore_args}, partial_restore=True))
    logging.info("Restored the parameters of checkpoint %s", self.step_path(step))
    return self._to_layout(restored, {"params": abstract_params}, step)["params"]

  def restore_latest(self, abstract_state: Any, warn=logging.warning) -> tuple[int, Any] | None:
    """(step, state) of the newest readable checkpoint, or None if there is none.

    Every process tries the same steps, process 0's, newest first, and all
    act on what all found: a step restored by every process is resumed from;
    one shown damaged on any process (`damage_reason`) is reported through
    `warn`, naming it and the step restored instead, and marked unreadable.

    Raises:
      CheckpointError: a step failed to restore on some process without being
        shown damaged (nothing is moved), or steps exist but all are damaged.
    """
    damaged = []  # (step, why)
    for step in self._steps_of_process_0():
      state, failure, why = None, None, None
      try:
        state = self._restore_retrying(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        failure, why = e, self.damage_reason(step, e, abstract_state)
      outcome = _RESTORED if failure is None else _FAILED if why is None else _DAMAGED
      outcomes = _from_every_process(outcome)
      if (outcomes == _FAILED).any():
        reason = (checkpoint_errors.describe_error(failure) if outcome == _FAILED
                  else f"on process {int(np.argmax(outcomes == _FAILED))}: see its output")
        raise CheckpointError(
            f"could not read checkpoint {self.step_path(step)} ({reason}); nothing shows that it is damaged, "
            f"so it is left as it is: run again once that is resolved, or mark it unreadable (create "
            f"{checkpoint_steps.mark_path(self.directory, step)}) to resume from the one before") from failure
      if (outcomes == _DAMAGED).any():
        damaged.append((step, why or f"unreadable on process {int(np.argmax(outcomes == _DAMAGED))}"))
        continue
      if damaged:
        bad = ", ".join(f"{self.step_path(s)} ({why})" for s, why in damaged)
        warn(f"Checkpoint {bad} is unreadable; restored the previous one, {self.step_path(step)}, "
             f"instead. The unreadable one is kept, marked by {checkpoint_steps.mark_path(self.directory, damaged[0][0])}, "
             f"until this run saves that step or a later one")
        self._mark_unreadable(damaged)
      return step, state
    if damaged:
      detail = "; ".join(f"step {s}: {why}" for s, why in damaged)
      raise CheckpointError(f"no readable checkpoint in {self.directory} ({detail}). Move that directory "
                            "away (or use another --workdir) to start afresh")
    return None

  def damage_reason(self, step: int, error: BaseException, abstract_state: Any) -> str | None:
    """Why checkpoint `step`, whose restore raised `error`, is damaged; None
    when nothing shows that it is (memory, a timeout, the network: another
    try may read it).

    Shown damaged: the state's metadata cannot be read or lists other arrays
    than `abstract_state` (another model's checkpoint was refused before, by
    `check_compatible`), or the error says a file is missing, cut short or
    garbled.
    """
    if checkpoint_errors.is_transient(error):
      return None
    try:
      saved = self.state_shapes(step)
    except Exception as e:  # pylint: disable=broad-except
      return f"its metadata: {checkpoint_errors.describe_error(e)}" if checkpoint_errors.shows_damage(e) else None
    wanted = tree_shapes(abstract_state)
    if saved != wanted:
      return f"its metadata does not match the state ({len(saved)} arrays listed, {len(wanted)} expected)"
    return checkpoint_errors.describe_error(error) if checkpoint_errors.shows_damage(error) else None

  def _steps_of_process_0(self) -> list[int]:
    """Process 0's steps, newest first, on every process."""
    steps = self.all_steps()[::-1]
    if jax.process_count() == 1:
      return steps
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    if count == 0:
      return []
    mine = np.zeros(count, np.int32)
    mine[:min(count, len(steps))] = steps[:count]
    return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]

  def _mark_unreadable(self, damaged: list[tuple[int, str]]) -> None:
    """Marks unreadable steps (`checkpoint_steps.mark_unreadable`) so that no reader lists them."""
    if jax.process_index() == 0:
      for step, why in damaged:
        checkpoint_steps.mark_unreadable(self.directory, step, why)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mile_jax_checkpoint_mark_unreadable")

  def wait(self) -> None:
    """Blocks until the save in progress (if any) is complete.

    Raises:
      CheckpointError: that save failed.
    """
    self._finish_pending()

  def close(self) -> None:
    self._finish_pending()
    self._manager.close()

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def state_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{'params/…/kernel': shape} of the state saved at `step`, from its
    metadata only; empty when the step has no `state` item."""
    metadata = self._manager.item_metadata(step)
    try:
      tree = metadata["state"]
    except KeyError:
      return {}
    return tree_shapes(getattr(tree, "tree", tree))

  def check_compatible(self, abstract_state: Any, config_json: dict) -> None:
    """Raises ConfigError if the newest checkpoint's arrays differ in shape from `abstract_state`.

    The message names the workdir's checkpoint and the settings whose values
    differ from the ones it was saved with. A checkpoint whose metadata cannot
    be read is left to `restore_latest`.
    """
    step = self.latest_step()
    if step is None:
      return
    try:
      saved = self.state_shapes(step)
    except Exception:  # pylint: disable=broad-except
      return
    if not saved:
      return
    wanted = tree_shapes(self._saved_layout(step, abstract_state, saved))
    if saved == wanted:
      return
    diffs = []
    try:
      diffs = config_differences(self.restore_config(step), config_json, ("model", "optim"))
    except Exception:  # pylint: disable=broad-except
      pass
    where = self.step_path(step)
    if diffs:
      settings = "; ".join(f"{k}={theirs!r} there, {ours!r} in this config" for k, theirs, ours in diffs)
      raise config_lib.ConfigError(
          f"{diffs[0][0]}: checkpoint {where} was saved by a different model ({settings}); set the same "
          f"values to resume, or use a new --workdir")
    mismatched = sorted(set(saved.items()) ^ set(wanted.items()))
    raise config_lib.ConfigError(
        f"model: checkpoint {where} holds arrays of other shapes than this config makes "
        f"(first difference: {mismatched[0][0]}); use the config it was saved with, or a new --workdir")


def config_differences(saved: dict, current: dict, sections: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
  """[(dotted setting, saved value, current value)] for the settings of `sections` that differ."""
  out = []
  for section in sections:
    theirs, ours = saved.get(section, {}), current.get(section, {})
    for key in sorted(set(theirs) | set(ours)):
      if theirs.get(key) != ours.get(key):
        out.append((f"{section}.{key}", theirs.get(key), ours.get(key)))
  return out


def _first_difference(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str:
  """The first array (by name) that differs between two {name: shape} maps, in words."""
  name = min(set(saved.items()) ^ set(wanted.items()))[0]
  if name not in saved:
    return f"{name} {wanted[name]} is not in the checkpoint"
  if name not in wanted:
    return f"{name} {saved[name]} is in the checkpoint but not in this model"
  return f"{name} has shape {saved[name]} there, {wanted[name]} in this model"


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/…/kernel': shape} of the leaves of `tree` that have a shape
  (arrays, ShapeDtypeStructs, Orbax's array metadata)."""
  return {_path_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(leaf, "shape")}


def _path_name(path) -> str:
  parts = []
  for entry in path:
    name = getattr(entry, "key", None)
    if name is None:
      name = getattr(entry, "name", None)
    if name is None:
      name = getattr(entry, "idx", entry)
    parts.append(str(name))
  return "/".join(parts)


def _from_every_process(value: int) -> np.ndarray:
  """int32 [process_count]: `value` of every process, the same array on all."""
  if jax.process_count() == 1:
    return np.array([value], np.int32)
  return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


def tokenizer_meta(serialized_model: bytes) -> dict:
  """The `meta["tokenizer"]` entry: the SentencePiece model and its SHA-256."""
  return {"sha256": hashlib.sha256(serialized_model).hexdigest(),
          "model_base64": base64.b64encode(serialized_model).decode("ascii")}


def tokenizer_bytes(meta: dict) -> bytes:
  """The SentencePiece model saved in a checkpoint's `meta` (see `tokenizer_meta`)."""
  return base64.b64decode(meta["tokenizer"]["model_base64"])


def _params_of(tree: Any) -> Any:
  """The parameter tree of a train state or of {"params": ...}."""
  return tree["params"] if isinstance(tree, dict) else tree.params


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry the target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)

"""Orbax checkpointing of the train state: save, keep the newest, restore onto any mesh.

A checkpoint `<dir>/<step>/` holds three items:
- `state`: the TrainState (params, optimizer state, step);
- `config`: the resolved config as JSON;
- `meta`: what else resuming and evaluation need: the data position (the
  global batch at step s is a pure function of the seed and s, so the data
  iterator's state is the step), and the tokenizer (its SentencePiece model,
  base64, and its SHA-256).

Orbax writes a step into a temporary directory and renames it when complete,
so a process killed while saving leaves no half checkpoint among the steps.
A step that is listed but cannot be read is moved aside to
`<dir>/<step>.unreadable` (never deleted) and the previous one restored.
"""

import base64
import hashlib
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mile_jax import config_lib
from mile_jax import workdir as workdir_lib

UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(RuntimeError):
  """Checkpoints exist but none can be restored."""


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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return workdir_lib.join(self.directory, str(step))

  def should_save(self, step: int, final: bool = False) -> bool:
    return final or step % self.every_steps == 0

  def save(self, step: int, state: Any, config_json: dict | None = None, meta: dict | None = None) -> None:
    """Starts saving `state` at `step` (asynchronously where enabled).

    Orbax deletes the oldest steps beyond `max_to_keep` only once this one is
    complete, so the last good checkpoint survives a failed save.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if config_json is not None:
      items["config"] = ocp.args.JsonSave(config_json)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state at `step` with the shardings of `abstract_state`'s leaves."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    logging.info("Restored checkpoint %s", self.step_path(step))
    return restored["state"]

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
    saved = {k: v for k, v in self.state_shapes(step).items() if k.startswith("params/")}
    if not saved:
      raise CheckpointError(f"checkpoint {self.step_path(step)}: no parameters in the metadata of its state "
                            f"({workdir_lib.join(self.step_path(step), 'state')})")
    wanted = {f"params/{_path_name(path)}": tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}
    if saved != wanted:
      raise config_lib.ConfigError(f"checkpoint {self.step_path(step)} holds other parameters than this model "
                                   f"({_first_difference(saved, wanted)})")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(workdir_lib.join(self.step_path(step), "state"), args=ocp.args.PyTreeRestore(
          item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
    logging.info("Restored the parameters of checkpoint %s", self.step_path(step))
    return restored["params"]

  def restore_latest(self, abstract_state: Any, warn=logging.warning) -> tuple[int, Any] | None:
    """(step, state) of the newest readable checkpoint, or None if there is none.

    An unreadable step is reported through `warn`, naming it and the step
    restored instead, and moved aside. Raises CheckpointError if steps exist
    but none can be read.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and TensorStore raise ValueError, KeyError, FileNotFoundError... for damaged files.
        failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
        continue
      if failures:
        bad = ", ".join(f"{self.step_path(s)} ({why})" for s, why in failures)
        warn(f"Checkpoint {bad} is unreadable; restored the previous one, {self.step_path(step)}, "
             f"instead. The unreadable one is kept as {self.step_path(failures[0][0])}{UNREADABLE_SUFFIX}")
        self._move_aside([s for s, _ in failures])
      return step, state
    if failures:
      detail = "; ".join(f"step {s}: {why}" for s, why in failures)
      raise CheckpointError(f"no readable checkpoint in {self.directory} ({detail}). Move that directory "
                         "away to start afresh")
    return None

  def _move_aside(self, steps: list[int]) -> None:
    """Renames unreadable steps so that Orbax neither lists nor overwrites nor deletes them."""
    if jax.process_index() == 0:
      for step in steps:
        target = self.step_path(step) + UNREADABLE_SUFFIX
        suffix = 1
        while workdir_lib.path(target).exists():
          target, suffix = f"{self.step_path(step)}{UNREADABLE_SUFFIX}{suffix}", suffix + 1
        workdir_lib.path(self.step_path(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mile_jax_checkpoint_move_aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until the save in progress (if any) is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def state_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{'params/…/kernel': shape} of the state saved at `step`, from its metadata only."""
    tree = self._manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    return {_path_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(leaf, "shape")}

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
    wanted = {_path_name(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
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


def tokenizer_meta(serialized_model: bytes) -> dict:
  """The `meta["tokenizer"]` entry: the SentencePiece model and its SHA-256."""
  return {"sha256": hashlib.sha256(serialized_model).hexdigest(),
          "model_base64": base64.b64encode(serialized_model).decode("ascii")}


def tokenizer_bytes(meta: dict) -> bytes:
  """The SentencePiece model saved in a checkpoint's `meta` (see `tokenizer_meta`)."""
  return base64.b64decode(meta["tokenizer"]["model_base64"])


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry the target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)

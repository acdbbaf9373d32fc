"""Orbax checkpointing of the train state: save, keep the newest, restore onto any mesh."""

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves the train state every `every_steps` and restores the latest.

  Each checkpoint holds the state (params, optimizer state, step) and the
  resolved config as JSON. Restoring takes an abstract state whose leaves
  carry the target shardings, so a checkpoint restores onto a different mesh.
  """

  def __init__(self, directory: str, *, every_steps: int, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int, final: bool = False) -> bool:
    return final or step % self.every_steps == 0

  def save(self, step: int, state: Any, config_json: dict | None = None) -> None:
    """Starts saving `state` at `step` (asynchronously where enabled)."""
    items = {"state": ocp.args.StandardSave(state)}
    if config_json is not None:
      items["config"] = ocp.args.JsonSave(config_json)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state at `step` with the shardings of `abstract_state`'s leaves."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    logging.info("Restored checkpoint %s/%d", self.directory, step)
    return restored["state"]

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry the target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)

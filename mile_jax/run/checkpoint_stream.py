"""One checkpoint step written a group of arrays at a time, for a state that need not exist whole.

`Checkpointer.save` takes the whole state, and Orbax copies it all before
writing. A state made from files (`mile_jax.hf import`: the parameters read
from safetensors, a fresh optimizer state) never has to be whole:
`write_step` asks for each group of arrays only when it is written,
and lets it go once written, so memory holds one group, about the largest
array, not the model.

It uses Orbax's partial save (a session of saves each adding arrays to one
item, then `finalize`), and the step it leaves is the one `Checkpointer.save`
writes: the same tree metadata (a tuple's items keep their keys as items of
a sequence), the same array format (Zarr v2 in OCDBT, one database per group
written), and the `config` and `meta` items. The step is assembled beside
the checkpoints (`<dir>.staging/<step>`) and renamed into place only when
complete. Partial saves rename each group into the session, so the
checkpoints must be on a filesystem: on an object store, where a rename is a
copy and Orbax writes in place, `mile_jax.hf import` saves the whole state
as training does.
"""

from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.tree_util import SequenceKey
from orbax.checkpoint.experimental import v1 as ocp_v1

from mile_jax.run import host_memory
from mile_jax.run import workdir as workdir_lib

STAGING_SUFFIX = ".staging"


@jax.tree_util.register_pytree_with_keys_class
class _SequenceItems:
  """Some items of a sequence (a tuple, a list), keyed by their indices: a partial save of item 2
  must not write items 0 and 1, yet record the key as a sequence index, as a whole tuple's would be."""

  def __init__(self, items: dict[int, Any]):
    self.items = dict(items)

  def tree_flatten_with_keys(self):
    indices = sorted(self.items)
    return [(SequenceKey(i), self.items[i]) for i in indices], tuple(indices)

  def tree_flatten(self):
    indices = sorted(self.items)
    return [self.items[i] for i in indices], tuple(indices)

  @classmethod
  def tree_unflatten(cls, indices, children):
    return cls(dict(zip(indices, children)))


class _Node(dict):
  """A container being built: keys are (is a sequence index, index or name)."""


def _key(entry) -> tuple[bool, Any]:
  if isinstance(entry, SequenceKey):
    return True, entry.idx
  for field in ("key", "name"):  # DictKey, FlattenedIndexKey; GetAttrKey (dataclasses, named tuples).
    if hasattr(entry, field):
      return False, str(getattr(entry, field))
  raise TypeError(f"unsupported pytree key {entry!r}")


def _subtree(entries: list[tuple[tuple, Any]]) -> dict:
  """The tree holding only `entries` [(key path, value)], its containers dicts and `_SequenceItems`."""
  root = _Node()
  for path, value in entries:
    node = root
    for entry in path[:-1]:
      node = node.setdefault(_key(entry), _Node())
    node[_key(path[-1])] = value

  def build(node):
    if not isinstance(node, _Node):
      return node
    if all(is_index for is_index, _ in node):
      return _SequenceItems({index: build(child) for (_, index), child in node.items()})
    return {name: build(child) for (_, name), child in node.items()}
  return build(root)


def _is_empty(x) -> bool:
  """An empty node (None, optax's EmptyState): no arrays, yet a key of the saved tree."""
  return not jax.tree.leaves(x)


def groups(abstract_state: Any, max_group_bytes: int) -> list[list[tuple[tuple, Any]]]:
  """The state's arrays [(key path, abstract leaf)] in groups of at most `max_group_bytes`
  (an array larger than that alone), in tree order; its empty nodes with the last group."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=_is_empty)[0]
  out, current, size = [], [], 0
  for path, leaf in flat:
    if _is_empty(leaf):
      continue
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if current and size + nbytes > max_group_bytes:
      out.append(current)
      current, size = [], 0
    current.append((path, leaf))
    size += nbytes
  empty = [(path, leaf) for path, leaf in flat if _is_empty(leaf)]
  if current or empty or not out:
    out.append(current + empty)
  else:
    out[-1].extend(empty)
  return out


def staging_path(directory: str, step: int) -> str:
  return workdir_lib.join(f"{str(directory).rstrip('/')}{STAGING_SUFFIX}", str(step))


def write_step(directory: str, step: int, abstract_state: Any,
               make_arrays: Callable[[list[tuple[tuple, Any]]], list[jax.Array]],
               config_json: dict, meta: dict, max_group_bytes: int) -> str:
  """Writes checkpoint `step` of `directory` (a `Checkpointer`'s) holding `abstract_state`'s
  empty nodes and arrays, each group of arrays ([(key path, abstract leaf)], see `groups`)
  being `make_arrays(group)` (jax.Arrays of those shapes and dtypes, sharded as the state
  is), with its `config` and `meta` items. Returns the step's path. Every process calls it,
  as `Checkpointer.save`.

  Raises:
    ValueError: `directory` is on an object store.
    FileExistsError: the step exists.
  """
  if workdir_lib.is_remote(directory):
    raise ValueError(f"{directory}: a step is written a group at a time on a filesystem only (Orbax's partial "
                     "saves rename each group into place)")
  final = workdir_lib.path(directory, str(step))
  if final.exists():
    raise FileExistsError(f"checkpoint {final} exists")
  staged = staging_path(directory, step)
  if jax.process_index() == 0:  # What an interrupted import left: its saves would be merged in.
    for leftover in (epath.Path(staged), epath.Path(f"{staged}.partial_save")):
      if leftover.exists():
        leftover.rmtree()
  _sync("staging_cleared")
  context = ocp_v1.Context()
  context.array.saving.use_zarr3 = False  # As `Checkpointer.save` (StandardCheckpointHandler) writes.
  with context:
    for group in groups(abstract_state, max_group_bytes):
      wanted = [(path, leaf) for path, leaf in group if not _is_empty(leaf)]
      values = list(zip([path for path, _ in wanted], make_arrays(wanted))) if wanted else []
      values += [(path, leaf) for path, leaf in group if _is_empty(leaf)]
      ocp_v1.partial.save(staged, _subtree(values))
      del values
      host_memory.release_freed_memory()  # What writing the group left, before the next is made.
    ocp_v1.partial.finalize(staged)
  for name, value in (("config", config_json), ("meta", meta)):
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as writer:
      writer.save(epath.Path(staged) / name, args=ocp.args.JsonSave(value))
  if jax.process_index() == 0:
    _publish(epath.Path(staged), final)
  _sync("published")
  return str(final)


def _publish(staged: epath.Path, final: epath.Path) -> None:
  """Renames the complete step `staged` to `final`, and removes the staging directory once empty."""
  staged.rename(final)
  if not any(staged.parent.iterdir()):
    staged.parent.rmdir()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"mile_jax_checkpoint_stream_{name}")

"""Single arrays of a saved Orbax item, read with TensorStore, one at a time.

Orbax's `StandardCheckpointHandler` saves a tree of arrays as one directory
(`<step>/state/`): `_METADATA` lists the tree's leaves, and each array is a
Zarr array (v2, or v3 when saved with `use_zarr3`) named by its path joined
with dots (`params.layer_0.mlp.up.kernel`), its chunks being the shards
the processes wrote. With OCDBT (Orbax's default) the arrays live in one
key-value database: each process writes its own (`ocdbt.process_<i>/`) and
the item's root manifest joins them, so opening the root sees every array
whole, whichever process wrote which chunk. Without OCDBT each array is a
directory of its own.

Opening an array reads only its metadata; `read` reads that one array onto
the host, in slabs of whole chunks, so that beside the array only one slab's
chunks are held, compressed and decoded, not the whole array's. Directories
may be local paths or TensorStore URLs (gs://, s3://).
"""

import json
from typing import Any

import numpy as np
import tensorstore as ts
from etils import epath

METADATA_FILE = "_METADATA"
# The most read into the host array at once (rounded up to whole chunks).
SLAB_BYTES = 4 << 20


class SavedArrayError(ValueError):
  """An item directory that is not an Orbax tree of arrays, or an array it lacks; names the path."""


def _kvstore(directory: str) -> Any:
  directory = str(directory).rstrip("/") + "/"
  return directory if "://" in directory else {"driver": "file", "path": directory}


class SavedArrays:
  """The arrays of one saved item directory (e.g. `<workdir>/checkpoints/<step>/state`).

  Keys are tuples of the tree path (`("params", "embed", "embedding")`). The
  TensorStore context keeps no cache, so an array read is held only by its
  caller.
  """

  def __init__(self, directory: str):
    self.directory = str(directory).rstrip("/")
    path = epath.Path(self.directory) / METADATA_FILE
    try:
      metadata = json.loads(path.read_text())
      tree = metadata["tree_metadata"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise SavedArrayError(f"{path}: not the metadata of an Orbax tree of arrays "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    self.keys = [tuple(k["key"] for k in entry["key_metadata"]) for entry in tree.values()]
    self._zarr = "zarr3" if metadata.get("use_zarr3") else "zarr"
    self._ocdbt = bool(metadata.get("use_ocdbt", True))
    self._context_spec = {"cache_pool": {"total_bytes_limit": 0}}  # A new context per array: nothing kept.

  def _spec(self, key: tuple[str, ...]) -> dict:
    name = ".".join(str(k) for k in key)
    if self._ocdbt:
      kvstore = {"driver": "ocdbt", "base": _kvstore(self.directory), "path": name + "/"}
    else:
      kvstore = _kvstore(f"{self.directory}/{name}")
    return {"driver": self._zarr, "kvstore": kvstore}

  def open(self, key: tuple[str, ...]) -> ts.TensorStore:
    """The saved array at `key`, opened (its metadata read, no data).

    Raises:
      SavedArrayError: `key` is not in the item, or its array cannot be opened.
    """
    if tuple(key) not in self.keys:
      raise SavedArrayError(f"{self.directory}: no array {'/'.join(key)} in {METADATA_FILE}")
    try:
      return ts.open(self._spec(key), open=True, read=True, context=ts.Context(self._context_spec)).result()
    except ValueError as e:
      raise SavedArrayError(f"{self.directory}: array {'/'.join(key)} cannot be opened "
                            f"({str(e).splitlines()[0][:300]})") from None

  def shape(self, key: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(self.open(key).shape)

  def read(self, key: tuple[str, ...]) -> np.ndarray:
    """The whole array at `key` as a NumPy array of its saved dtype (float32 for parameters)."""
    array = self.open(key)
    out = np.empty(array.shape, array.dtype.numpy_dtype)
    for box in slabs(tuple(array.shape), tuple(array.chunk_layout.read_chunk.shape or array.shape),
                     out.itemsize, SLAB_BYTES):
      out[box] = array[box].read().result()
    return out


def slabs(shape: tuple[int, ...], chunk: tuple[int, ...], itemsize: int, slab_bytes: int) -> list[tuple[slice, ...]]:
  """Boxes that tile `shape` along its first axis cut into chunks, each a whole number of chunks
  thick and of at most `slab_bytes` where one chunk's thickness allows (one box when nothing is cut).
  """
  axis = next((i for i, (n, c) in enumerate(zip(shape, chunk)) if c and c < n), None)
  if axis is None:
    return [tuple(slice(None) for _ in shape)]
  per_unit = itemsize * int(np.prod(shape, dtype=np.int64)) // shape[axis]
  thick = chunk[axis] * max(1, slab_bytes // max(1, per_unit * chunk[axis]))
  head = tuple(slice(None) for _ in range(axis))
  return [head + (slice(start, min(start + thick, shape[axis])),) for start in range(0, shape[axis], thick)]

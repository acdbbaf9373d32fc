"""Log-likelihood calls in a multi-process run: who scores what, and how the results meet.

Every process holds the same requests and computes the same plan (the
planning is deterministic host work), then scores a share of it:

* on a mesh that spans processes (training's), every batch is one global
  array: each process lays out and feeds only the rows of its own devices
  (`local_rows`) and reads back the scores of those rows;
* on a mesh of each process's own devices (eval.py), process p scores the
  batches p, p + P, p + 2P, ... of the P processes alone.

Then every process has the per-request sums of the requests it scored, and
`combine` gives each request the value of the first process that scored it
(rows a tensor-parallel axis copies across processes are scored on each),
bit for bit: the float64 sums travel as their int32 halves. Generation on
process-local meshes is shared out by batches the same way, and
`gather_sequences` gives every process every prompt's tokens.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils

from mile_jax.core import sharding


def mesh_processes(mesh: jax.sharding.Mesh) -> list[int]:
  """The indices of the processes whose devices make up `mesh`, in order."""
  return sorted({int(d.process_index) for d in mesh.devices.flat})


def local_rows(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
  """[lo, hi): the rows of a (batch_size, ...) batch that this process's
  devices hold under `sharding.batch_sharding(mesh)`.

  Raises:
    ValueError: when they are not one contiguous run (a mesh whose device
      order interleaves processes along the data-parallel axes).
  """
  indices = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in indices.values()})
  lo, hi = spans[0][0], spans[0][1]
  for start, stop in spans[1:]:
    if start > hi:
      raise ValueError(f"process {jax.process_index()} holds rows {spans} of the scoring batch, not one run: "
                       "order the mesh's devices by process")
    hi = max(hi, stop)
  return lo, hi


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh, batch_size: int,
                 groups: int) -> dict[str, jax.Array]:
  """Global arrays from this process's rows: (b, W) entries of `batch_size`
  rows and (g, S) entries of `groups` row groups, split as `batch_sharding`."""
  spec = sharding.batch_sharding(mesh)
  out = {}
  for key, value in local.items():
    total = groups if key in ("sources", "targets") else batch_size
    out[key] = jax.make_array_from_process_local_data(spec, value, (total,) + value.shape[1:])
  return out


def local_part(array: jax.Array) -> np.ndarray:
  """This process's rows of a global array split along its first axis, in order."""
  shards = {}
  for shard in array.addressable_shards:
    start = shard.index[0].start or 0
    if start not in shards:
      shards[start] = np.asarray(shard.data)
  return np.concatenate([shards[k] for k in sorted(shards)], axis=0)


def combine(sums: np.ndarray, greedy: np.ndarray, scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Every process's (sums float64, greedy bool) per request, each request
  from the first process whose `scored` (bool) is set for it.

  A collective: every process of the run calls it with arrays of one length.
  """
  bits = np.ascontiguousarray(sums, dtype=np.float64).view(np.int32)  # (2N,): exact through int32
  packed = np.concatenate([bits, greedy.astype(np.int32), scored.astype(np.int32)])
  every = np.asarray(multihost_utils.process_allgather(packed))  # (P, 4N)
  n = len(sums)
  first = np.argmax(every[:, 3 * n:] != 0, axis=0)  # (N,): the first process that scored each (0 if none)
  requests = np.arange(n)
  halves = every[:, :2 * n].reshape(len(every), n, 2)[first, requests]  # (N, 2) int32
  return np.ascontiguousarray(halves).view(np.float64).reshape(n), every[first, 2 * n + requests] != 0


def gather_sequences(sequences: list[list[int] | None], width: int) -> list[list[int]]:
  """Every process's token sequences (each at most `width` long), one per request, each from the
  process that made it (this process passes None for the requests it did not make).

  A collective: every process of the run calls it with lists of one length.
  """
  n = len(sequences)
  packed = np.full((n, width + 1), -1, np.int32)  # [length, tokens..., -1 padding]
  for i, tokens in enumerate(sequences):
    if tokens is not None:
      packed[i, 0] = len(tokens)
      packed[i, 1:1 + len(tokens)] = tokens
  every = np.asarray(multihost_utils.process_allgather(packed)).reshape(-1, n, width + 1)  # (P, N, width + 1)
  rows = every[np.argmax(every[:, :, 0] >= 0, axis=0), np.arange(n)]
  return [row[1:1 + max(int(row[0]), 0)].tolist() for row in rows]

"""Device mesh, logical-axis rules and placement of params and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data
parallelism with parameters and optimizer state sharded) and `tensor`
(parameters and activations split along heads, feed-forward and vocabulary).
Logical axis names on parameters and activations map to mesh axes through a
rules table from the config (`config.mesh.rules`).
"""

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills in the one -1 entry of `shape` so that its product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape must hold positive sizes and at most one -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape {shape} does not divide the {num_devices} available devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape {shape} needs {math.prod(shape)} devices but {num_devices} are "
                     f"available; set mesh.shape so that its product is {num_devices} (one -1 is allowed)")
  return shape


def select_devices(num_devices: int = 0) -> list[Any]:
  """All devices, or the first `num_devices` of them (`config.mesh.num_devices`)."""
  devices = jax.devices()
  if not num_devices:
    return devices
  if jax.process_count() > 1:
    raise ValueError("mesh.num_devices must be 0 when training spans several processes")
  if num_devices > len(devices):
    raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices are available")
  return devices[:num_devices]


def check_tensor_axis_within_processes(device_grid: np.ndarray) -> None:
  """Raises ValueError when a tensor-parallel group spans several processes.

  Tensor parallelism exchanges activations in every layer, which only the
  links inside one host (NVLink, a TPU host's chips) sustain; across hosts it
  would run over the data-centre network. `device_grid` is a mesh's
  (data, fsdp, tensor) array of devices.
  """
  tensor = device_grid.shape[-1]
  for group in device_grid.reshape(-1, tensor):
    processes = sorted({int(d.process_index) for d in group})
    if len(processes) > 1:
      per_process = sum(1 for d in device_grid.flat if d.process_index == processes[0])
      raise ValueError(
          f"mesh.shape: the tensor axis ({tensor} devices) spans processes {processes}; make the tensor size "
          f"a divisor of the {per_process} devices each process has, and move the rest to data or fsdp")


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  resolved = resolve_mesh_shape(shape, len(devices))
  mesh = jax.make_mesh(resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
  check_tensor_axis_within_processes(mesh.devices)
  return mesh


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Any):
  """Enters the mesh and the logical-axis rules for tracing the model."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_tuple(rules)):
    yield


def rules_tuple(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Normalises a rules table from a config (lists become tuples)."""
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    out.append((logical, mesh_axes))
  return tuple(out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Any) -> Any:
  """NamedShardings for a tree whose leaves carry logical axis names.

  Leaves without names (e.g. the step counter) are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split along their first dimension over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's rows of the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}

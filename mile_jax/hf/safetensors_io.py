"""Reading and writing the safetensors format, single files and sharded directories.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON (`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`, offsets relative to the end of the header), then the tensors' bytes,
little-endian, row-major, back to back. A sharded checkpoint adds
`model.safetensors.index.json`: `{"metadata": {"total_size"}, "weight_map":
{name: file}}`.

Reading maps the files into memory and returns NumPy views, so a tensor's
bytes are read only when (and where) it is sliced; bfloat16 comes back as
`ml_dtypes.bfloat16`, which the `safetensors` package's NumPy API cannot
represent. Byte order is the host's, little-endian on every platform JAX
supports. This module needs only NumPy, so that training can start from a
Hugging Face checkpoint without torch, transformers or safetensors installed.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A file that is not valid safetensors, or a directory without weights; names the file."""


def _read_header(path: str) -> tuple[dict, int]:
  """(header without `__metadata__`, byte offset where the data starts)."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", head)
    if length > os.path.getsize(path) - 8:
      raise SafetensorsError(f"{path}: not a safetensors file (header length {length} exceeds the file)")
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
  header.pop("__metadata__", None)
  return header, 8 + length


def read_file(path: str) -> dict[str, np.ndarray]:
  """{name: read-only array view} of one safetensors file (memory-mapped, nothing read yet)."""
  header, start = _read_header(path)
  size = os.path.getsize(path) - start
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size,)) if size else np.zeros(0, np.uint8)
  out = {}
  for name, entry in header.items():
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
      raise SafetensorsError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is not supported "
                             f"(supported: {', '.join(_DTYPES)})")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > size:
      raise SafetensorsError(f"{path}: tensor {name} has offsets {begin}..{end} that do not fit its shape "
                             f"{shape} and dtype {entry['dtype']}")
    out[name] = data[begin:end].view(dtype).reshape(shape)
  return out


def weight_files(directory: str) -> list[str]:
  """The safetensors files of a directory: its index's shards, else `model.safetensors`."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    except ValueError as e:
      raise SafetensorsError(f"{index}: not JSON ({e})") from None
    if not isinstance(weight_map, dict):
      raise SafetensorsError(f"{index}: no weight_map")
    files = sorted(set(weight_map.values()))
    for file in files:
      if not os.path.isfile(os.path.join(directory, file)):
        raise SafetensorsError(f"{index} names {file}, which is not in {directory}")
    return [os.path.join(directory, file) for file in files]
  if os.path.isfile(os.path.join(directory, SINGLE_FILE)):
    return [os.path.join(directory, SINGLE_FILE)]
  other = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth")))
  hint = (f" (it has {other[0]}: load it with transformers and save_pretrained() it, which writes safetensors)"
          if other else "")
  raise SafetensorsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def tensor_names(directory: str) -> set[str]:
  """The names of a directory's tensors, from the files' headers alone."""
  return {name for path in weight_files(directory) for name in _read_header(path)[0]}


def read_dir(directory: str) -> dict[str, np.ndarray]:
  """{name: array view} of a directory's `model.safetensors` or of the shards its index names."""
  out = {}
  for path in weight_files(directory):
    out.update(read_file(path))
  return out


def _write_file(path: str, tensors: dict[str, np.ndarray]) -> None:
  header, offset = {}, 0
  for name, array in tensors.items():
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  header["__metadata__"] = {"format": "pt"}  # transformers refuses files without a known format.
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-(8 + len(blob)) % 8)  # Data aligned to 8 bytes, as the reference writer does.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())
  os.replace(tmp, path)


def write_dir(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
  """Writes `tensors` as `model.safetensors`, or, above `max_shard_bytes`, as
  `model-0000k-of-0000n.safetensors` shards in order plus the index. Returns the files written.

  Arrays must be float64/32/16, bfloat16 (ml_dtypes) or int32/64. A tensor larger
  than the limit gets a shard of its own.
  """
  for name, array in tensors.items():
    if array.dtype not in _NAMES:
      raise SafetensorsError(f"{name}: dtype {array.dtype} cannot be written")
  shards, current, size = [], {}, 0
  for name, array in tensors.items():
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  os.makedirs(directory, exist_ok=True)
  if len(shards) == 1:
    _write_file(os.path.join(directory, SINGLE_FILE), shards[0])
    return [SINGLE_FILE]
  files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for file, shard in zip(files, shards):
    _write_file(os.path.join(directory, file), shard)
  index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
           "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
  with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return files + [INDEX_FILE]

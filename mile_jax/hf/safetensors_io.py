"""Reading and writing the safetensors format, single files and sharded directories.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON (`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`, offsets relative to the end of the header), then the tensors' bytes,
little-endian, row-major, back to back. A sharded checkpoint adds
`model.safetensors.index.json`: `{"metadata": {"total_size"}, "weight_map":
{name: file}}`.

Reading returns `LazyTensor`s, which map a file into memory only while a
slice of the tensor is in use, so a tensor's bytes are read only when (and
where) it is sliced, and the pages read leave the process with the slice;
writing streams each tensor's bytes in blocks (`FileWriter`), so neither
side holds more than the tensor in use. bfloat16 comes back as
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


class LazyTensor:
  """One tensor of a safetensors file, mapped into memory only while a slice of it is used.

  `shape` and `dtype` are the stored tensor's after `transform` (NumPy view operations:
  transposes, reshapes). `x[index]` maps the file, applies `transform` and returns the
  slice: a view of the mapping for basic indexing, which stays mapped only as long as that
  view lives. So a reader that copies each slice away holds at most the pages of the slice
  it is copying, however many tensors it reads (a mapping kept open would count every page
  read so far in the process's resident memory).
  """

  def __init__(self, path: str, offset: int, dtype: np.dtype, shape: tuple[int, ...], transform=None):
    self.path, self.offset, self.stored_dtype, self.stored_shape = path, offset, dtype, shape
    self.transform = transform or (lambda x: x)
    # The shape after `transform`, from a stand-in with zero strides: nothing is allocated.
    self.shape = tuple(self.transform(np.broadcast_to(np.zeros((), dtype), shape)).shape)
    self.dtype = dtype
    self.ndim = len(self.shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  def apply(self, transform) -> "LazyTensor":
    """This tensor seen through `transform` (after the current one), still unread."""
    inner = self.transform
    return LazyTensor(self.path, self.offset, self.stored_dtype, self.stored_shape, lambda x: transform(inner(x)))

  def __getitem__(self, index):
    if int(np.prod(self.stored_shape, dtype=np.int64)) == 0:
      return self.transform(np.zeros(self.stored_shape, self.stored_dtype))[index]
    mapped = np.memmap(self.path, dtype=self.stored_dtype, mode="r", offset=self.offset, shape=self.stored_shape)
    return self.transform(mapped)[index]

  def __array__(self, dtype=None, copy=None):
    del copy
    out = np.array(self[...], dtype=dtype)
    return out


def read_file(path: str) -> dict[str, LazyTensor]:
  """{name: LazyTensor} of one safetensors file, from its header alone (no tensor read yet)."""
  header, start = _read_header(path)
  size = os.path.getsize(path) - start
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
    out[name] = LazyTensor(path, start + begin, dtype, shape)
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


def read_dir(directory: str) -> dict[str, LazyTensor]:
  """{name: LazyTensor} of a directory's `model.safetensors` or of the shards its index names."""
  out = {}
  for path in weight_files(directory):
    out.update(read_file(path))
  return out


def check_dtype(name: str, dtype) -> None:
  if np.dtype(dtype) not in _NAMES:
    raise SafetensorsError(f"{name}: dtype {np.dtype(dtype)} cannot be written")


def shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[tuple[str, list[str]]]:
  """[(file name, tensor names)] for tensors of (name, bytes) in file order: one
  `model.safetensors`, or, above `max_shard_bytes`, `model-0000k-of-0000n.safetensors`
  shards filled in order (a tensor larger than the limit gets a shard of its own)."""
  shards, current, size = [], [], 0
  for name, nbytes in sizes:
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  shards.append(current)
  if len(shards) == 1:
    return [(SINGLE_FILE, shards[0])]
  return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards)]


class FileWriter:
  """Writes one safetensors file whose tensors are declared first and streamed after.

  `entries` are (name, dtype, shape) in file order; the header is written at once,
  then `write(name, blocks)` appends each tensor's bytes from blocks (arrays of the
  declared dtype whose concatenated row-major bytes are the tensor's). The file is
  written as `<path>.tmp` and renamed by `close()` once every tensor is complete.
  """

  def __init__(self, path: str, entries: list[tuple[str, np.dtype, tuple[int, ...]]]):
    header, offset = {}, 0
    self.sizes = {}
    for name, dtype, shape in entries:
      check_dtype(name, dtype)
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      self.sizes[name] = nbytes
      offset += nbytes
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without a known format.
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % 8)  # Data aligned to 8 bytes, as the reference writer does.
    self.path, self._order, self._dtypes = path, [e[0] for e in entries], {e[0]: np.dtype(e[1]) for e in entries}
    self._file = open(path + ".tmp", "wb")  # pylint: disable=consider-using-with
    self._file.write(struct.pack("<Q", len(blob)))
    self._file.write(blob)
    self._done = 0

  def write(self, name: str, blocks) -> None:
    """Appends tensor `name` (the next one declared) from `blocks`."""
    if self._done >= len(self._order) or self._order[self._done] != name:
      raise ValueError(f"{self.path}: {name} written out of the declared order {self._order}")
    written = 0
    for block in blocks:
      if block.dtype != self._dtypes[name]:
        raise ValueError(f"{self.path}: {name} block of dtype {block.dtype}, declared {self._dtypes[name]}")
      block = np.ascontiguousarray(block)
      self._file.write(block.reshape(-1).view(np.uint8).data)
      written += block.nbytes
    if written != self.sizes[name]:
      raise ValueError(f"{self.path}: {name} got {written} bytes, declared {self.sizes[name]}")
    self._done += 1

  def close(self) -> None:
    self._file.close()
    if self._done != len(self._order):
      raise ValueError(f"{self.path}: closed after {self._done} of {len(self._order)} tensors")
    os.replace(self.path + ".tmp", self.path)

  def abort(self) -> None:
    self._file.close()
    if os.path.exists(self.path + ".tmp"):
      os.remove(self.path + ".tmp")


def write_index(directory: str, plan: list[tuple[str, list[str]]], sizes: dict[str, int]) -> None:
  """`model.safetensors.index.json` of a sharded `plan` (see `shard_plan`); `sizes` in bytes."""
  index = {"metadata": {"total_size": sum(sizes.values())},
           "weight_map": {name: file for file, names in plan for name in names}}
  with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)


def write_dir(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
  """Writes `tensors` (held in memory) in the files of `shard_plan`, plus the index
  when there are shards. Returns the files written.

  Arrays must be float64/32/16, bfloat16 (ml_dtypes) or int32/64.
  """
  for name, array in tensors.items():
    check_dtype(name, array.dtype)
  plan = shard_plan([(name, array.nbytes) for name, array in tensors.items()], max_shard_bytes)
  os.makedirs(directory, exist_ok=True)
  for file, names in plan:
    writer = FileWriter(os.path.join(directory, file), [(n, tensors[n].dtype, tensors[n].shape) for n in names])
    for name in names:
      writer.write(name, [tensors[name]])
    writer.close()
  if len(plan) == 1:
    return [SINGLE_FILE]
  write_index(directory, plan, {name: array.nbytes for name, array in tensors.items()})
  return [file for file, _ in plan] + [INDEX_FILE]

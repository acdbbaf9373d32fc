"""Writes a checkpoint's parameters as transformers safetensors, one saved array at a time.

The parameters are read from the checkpoint's files directly
(`saved_arrays`), never restored as a tree onto devices: each saved array is
read onto the host (in slabs of whole chunks, `saved_arrays.SLAB_BYTES`),
the transformers tensors made from it (one, or one per layer of a scanned
`layers` array) are written as views of it in blocks of rows converted to
the output dtype, and it is dropped before the next is read. So the host
holds one saved array and one slab or block at a time: at most the largest
saved array (a scanned checkpoint's stacked feed-forward kernel, an unrolled
one's embedding or output layer) plus a few MiB. The tokenizer is converted
after the weights, so what that leaves allocated does not add to their peak.

The tensors go to the files in the order they are read (`layout.export_order`);
the shard files, their headers and the index are planned from the arrays'
shapes before any data is read, so each file is written front to back once.

On several processes process 0 reads and writes everything; the others wait
for it and raise if it failed, so the directory is written once, complete
when `export` returns on any process, and the same as a single process writes.
"""

import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from mile_jax.core import model as model_lib
from mile_jax.evaluation import restore as restore_lib
from mile_jax.hf import layout as hf_layout
from mile_jax.hf import safetensors_io
from mile_jax.hf.layout import HFError
from mile_jax.hf.saved_arrays import SavedArrayError, SavedArrays
from mile_jax.run import host_memory
from mile_jax.run import workdir as workdir_lib

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# The rows converted and written at once: a few MiB keeps the copies small and the writes large.
BLOCK_BYTES = 4 << 20
PARAMS = "params"


def _shape_only(shape: tuple[int, ...]) -> np.ndarray:
  """A float32 stand-in of `shape` with zero strides, for view shapes without allocating."""
  return np.broadcast_to(np.zeros((), np.float32), shape)


def weight_plan(saved: SavedArrays, model_config: Any, where: str) -> tuple[list, dict[str, tuple[int, ...]]]:
  """(`layout.export_order` for the saved layer layout, {transformers name: shape}).

  Raises:
    HFError: the checkpoint holds other parameters than `model_config` makes, naming the first.
  """
  cfg = model_lib.DecoderConfig.from_config(model_config)
  saved_params = {k[1:] for k in saved.keys if k and k[0] == PARAMS}
  scanned = any(k[0] == model_lib.SCANNED for k in saved_params)
  abstract = model_lib.with_layout(nn.unbox(model_lib.abstract_params(cfg)), scanned)
  wanted = {tuple(getattr(p, "key", p) for p in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  if saved_params != set(wanted):
    name = "/".join(min(saved_params ^ set(wanted)))
    side = "missing from" if name in {"/".join(k) for k in wanted} else "in the checkpoint but not in"
    raise HFError(f"{where}: checkpoint {saved.directory} holds other parameters than its model settings make "
                  f"(params/{name} is {side} the model); use the config.json of the run that saved it")
  order = hf_layout.export_order(cfg.n_layers, scanned)
  shapes = {}
  for key, tensors in order:
    shape = saved.shape((PARAMS, *key))
    if shape != wanted[key]:
      raise HFError(f"{where}: checkpoint {saved.directory} has params/{'/'.join(key)} of shape {shape}, the "
                    f"model settings make {wanted[key]}; use the config.json of the run that saved it")
    for name, path, layer in tensors:
      shapes[name] = tuple(hf_layout.hf_view(path, _shape_only(shape if layer is None else shape[1:])).shape)
  return order, shapes


def _blocks(view: np.ndarray, dtype, block_bytes: int):
  """`view` in blocks of rows, each C-contiguous in `dtype` (float32 -> bfloat16 rounds to nearest even)."""
  if view.ndim < 2:
    yield view.astype(dtype, order="C")
    return
  rows = max(1, block_bytes // max(1, view[0].size * view.itemsize))
  for start in range(0, view.shape[0], rows):
    yield view[start:start + rows].astype(dtype, order="C")


def write_weights(saved: SavedArrays, model_config: Any, directory: str, dtype: str, max_shard_bytes: int,
                  where: str, block_bytes: int | None = None) -> list[str]:
  """Writes the parameters of `saved` as transformers safetensors in `directory`
  (`model.safetensors`, or shards of at most `max_shard_bytes` plus the index).
  Returns the files written.

  Raises:
    HFError: the parameters do not match `model_config`, or an array cannot be read.
  """
  np_dtype, block_bytes = np.dtype(DTYPES[dtype]), block_bytes or BLOCK_BYTES
  order, shapes = weight_plan(saved, model_config, where)
  sizes = {name: int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize for name, shape in shapes.items()}
  plan = safetensors_io.shard_plan(list(sizes.items()), max_shard_bytes)
  file_of = {name: i for i, (_, names) in enumerate(plan) for name in names}
  writer, current = None, -1
  host_memory.release_freed_memory()
  try:
    for key, tensors in order:
      try:
        array = saved.read((PARAMS, *key))  # The one saved array held at a time.
      except (SavedArrayError, ValueError) as e:
        raise HFError(f"checkpoint {saved.directory}: params/{'/'.join(key)} cannot be read ({e})") from None
      for name, path, layer in tensors:
        if file_of[name] != current:
          if writer is not None:
            writer.close()
          current = file_of[name]
          file, names = plan[current]
          writer = safetensors_io.FileWriter(os.path.join(directory, file),
                                             [(n, np_dtype, shapes[n]) for n in names])
        view = hf_layout.hf_view(path, array if layer is None else array[layer])
        writer.write(name, _blocks(view, np_dtype, block_bytes))
      del array, view  # The view too: it keeps the array alive.
      host_memory.release_freed_memory()
    writer.close()
    writer = None
  finally:
    if writer is not None:
      writer.abort()
  if len(plan) == 1:
    return [plan[0][0]]
  safetensors_io.write_index(directory, plan, sizes)
  return [file for file, _ in plan] + [safetensors_io.INDEX_FILE]


def check_out(out: str) -> None:
  """Raises HFError unless `out` is a new or empty directory that can be created and written."""
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise HFError(f"--out: {out} exists and is not an empty directory; choose a new one")
  parent = os.path.dirname(out)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise HFError(f"--out: {out} cannot be created ({parent} is not a writable directory)")


def _export_here(workdir: str, out: str, step: int | None, dtype: str, max_shard_bytes: int) -> list[str]:
  from mile_jax.hf import tokenizer as hf_tokenizer  # pylint: disable=import-outside-toplevel  # needs `tokenizers`
  check_out(out)
  workdir, checkpoint_dir, step = restore_lib.locate(workdir, step)
  config, _ = restore_lib.load_config(workdir)
  model = config.model
  tok = restore_lib.load_run_tokenizer(workdir_lib.join(workdir, "tokenizer.model"), model.vocab_size)
  try:
    saved = SavedArrays(workdir_lib.join(checkpoint_dir, str(step), "state"))
  except SavedArrayError as e:
    raise HFError(f"--step: {e}; pass another --step") from None
  doc_start = tok.bos_id if config.data.get("add_bos", False) else tok.eos_id
  tmp = f"{out}.tmp-export"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    write_weights(saved, model, tmp, dtype, max_shard_bytes, where=workdir_lib.join(workdir, "config.json"))
    # After the weights: what the conversion leaves allocated does not add to the arrays' peak.
    hf_tokenizer.write(tmp, tok.serialized_model(), doc_start_id=doc_start, model_max_length=model.max_seq_len)
    ids = {"bos_id": doc_start, "eos_id": tok.eos_id, "pad_id": tok.pad_id if tok.pad_id >= 0 else None}
    hf = hf_layout.hf_config(model, dtype=dtype, **ids)
    generation = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
    for name, content in (("config.json", hf), ("generation_config.json", generation)):
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(tmp, out)
  except OSError as e:  # A full disk, or permissions that os.access did not foresee.
    shutil.rmtree(tmp, ignore_errors=True)
    raise HFError(f"--out: cannot write {out}: {e.strerror or e}") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return sorted(os.listdir(out))


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32",
           max_shard_bytes: int = 5 << 30) -> list[str]:
  """Writes the checkpoint at `step` (default latest) of the run at `workdir` as a
  transformers LLaMA directory `out` (new or empty), streaming the parameters.
  Returns the files this process wrote: all on process 0, none on the others.

  Raises:
    HFError, EvalError: naming the flag, file or directory to fix (on process 0;
      the other processes raise HFError pointing at its output).
  """
  if dtype not in DTYPES:
    raise HFError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
  if max_shard_bytes <= 0:
    raise HFError(f"--max_shard_mb: must be a positive number of MiB, got {max_shard_bytes / (1 << 20):g}")
  out = os.path.abspath(out)
  files, error = [], None
  if jax.process_index() == 0:
    try:
      files = _export_here(workdir, out, step, dtype, max_shard_bytes)
    except Exception as e:  # pylint: disable=broad-except  # Raised after the others learn of it.
      error = e
  if jax.process_count() > 1:  # Also the barrier: no process returns before process 0 is done.
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      raise HFError(f"--out: process 0 could not export {out}; its output says why")
  if error is not None:
    raise error
  return files

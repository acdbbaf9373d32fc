"""Tokenize a corpus once into a token store (``store.py``), in parallel, locally or on ``gs://``.

    python -m mile_jax.data.prepare --source='files:/data/web/*.jsonl.gz' \\
        --tokenizer=/data/sp32k.model --output=gs://bucket/stores/web [--workers=16]

Four stages, each a set of independent units of work, so that any runner
gives the same bytes:

0. count (only for a file cut into byte ranges): the newlines of each range
   but the file's last, written to ``.parts/<shard>/newlines.json``, from
   which the ranges after it number their lines.
1. encode: each shard of the input (``shards.py``) is read, routed to its
   split, encoded straight into a NumPy array with BOS/EOS in place, and
   written under ``.parts/<shard>/`` with its document lengths and id counts;
   its ``done.json``, written last, marks it finished, and a rerun skips it.
2. assemble: the split's ``tokens`` and ``ends`` arrays are created and
   filled one zarr shard per unit (a unit writes a whole shard, so units
   never write the same object); ``.parts/assembled/<unit>`` marks it done.
3. finish: the counts summed over the parts, the sizes of the arrays' shard
   objects (checked when the store is opened), the tokenizer, and the
   manifest, written last; then ``.parts/`` is deleted.

A finished store at the output (its manifest there) of the same inputs and
settings is returned as it is; one of other settings is refused.

Runners: ``local`` (a process pool of ``--workers``, all cores by default;
one worker runs in this process), ``pod`` (every process of a
``jax.distributed`` job takes every ``P``-th unit; process 0 does the rest,
with barriers between the stages) and ``beam`` (``beam.py``). The command line is ``__main__.py``.
A run killed at any moment and rerun gives the same store.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Sequence

import numpy as np

from mile_jax.data import shards as shards_lib
from mile_jax.data import store
from mile_jax.data.tokenizer import Tokenizer, tokenizer_from_model
from mile_jax.errors import ConfigError

_ENCODE_DOCUMENTS = 1024  # documents per encode call


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything a unit of work needs; picklable, so that any runner can ship it."""

  inputs: shards_lib.Inputs
  tokenizer_model: bytes  # serialized SentencePiece model
  add_bos: bool
  add_eos: bool
  output: str  # the store's root: a local directory or gs://bucket/path
  shards: tuple[shards_lib.Shard, ...]
  threads: int = 1  # encoder threads per worker
  shard_tokens: int = store.SHARD_TOKENS  # ids per zarr shard of tokens: the unit of assembly

  @property
  def counted(self) -> list[shards_lib.Shard]:
    """Stage 0's units."""
    return shards_lib.counted(self.shards)


@functools.lru_cache(maxsize=2)
def _tokenizer(model: bytes) -> Tokenizer:
  return tokenizer_from_model(model, "")


def _part(job: Job, index: int, *keys: str) -> str:
  return store.join(job.output, ".parts", f"{index:07d}", *keys)


def _pack(encoded: list[list[int]], bos: int | None, eos: int | None, dtype) -> tuple[np.ndarray, np.ndarray]:
  """Documents' ids laid out as ``[BOS] ids [EOS]`` each: (tokens [n], lengths int64 [documents])."""
  lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
  specials = (bos is not None) + (eos is not None)
  total = lengths + specials
  out = np.empty(int(total.sum()), dtype=dtype)
  ends = np.cumsum(total)
  if bos is not None:
    out[ends - total] = bos
  if eos is not None:
    out[ends - 1] = eos
  flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum()))
  if specials:
    keep = np.ones(len(out), dtype=bool)
    keep[ends - total] = bos is None
    keep[ends - 1] = eos is None
    out[keep] = flat
  else:
    out[:] = flat
  return out, total


def count_shard(job: Job, shard: shards_lib.Shard) -> None:
  """Stage 0 for one byte range: ``.parts/<index>/newlines.json``, its newlines."""
  if _counted_newlines(job, shard) is None:
    store.write_bytes(_part(job, shard.index, "newlines.json"), json.dumps(
        {"shard": _shard_json(shard), "newlines": shards_lib.count_newlines(shard)}, sort_keys=True).encode())


def _counted_newlines(job: Job, shard: shards_lib.Shard) -> int | None:
  """Stage 0's count for ``shard``; None where there is none, or one for another shard of the same index."""
  data = store.read_bytes(_part(job, shard.index, "newlines.json"))
  record = json.loads(data) if data is not None else {}
  return record["newlines"] if record.get("shard") == _shard_json(shard) else None


def _newlines_before(job: Job, shard: shards_lib.Shard) -> int:
  """The newlines of the shard's file before ``shard.start``: the counts of the ranges before it."""
  total, k = 0, shard.index - 1
  while shard.start and k >= 0 and job.shards[k].path == shard.path:
    newlines = _counted_newlines(job, job.shards[k])
    if newlines is None:
      raise ConfigError(f"prepare: shard {k} of {job.output!r} was not counted; run prepare again")
    total, k = total + newlines, k - 1
  return total


def _shard_json(shard: shards_lib.Shard) -> dict:
  return {k: v for k, v in dataclasses.asdict(shard).items() if k != "index"}


def encode_shard(job: Job, shard: shards_lib.Shard) -> None:
  """Stage 1 for one shard: ``.parts/<index>/<split>/{tokens,lengths,counts.npy}`` then ``done.json``.

  A part left by a prepare of the same output with other shards is encoded again.
  """
  done = store.read_bytes(_part(job, shard.index, "done.json"))
  if done is not None and json.loads(done).get("shard") == _shard_json(shard):
    return
  tokenizer = _tokenizer(job.tokenizer_model)
  dtype = store.token_dtype(tokenizer.vocab_size)
  bos = tokenizer.bos_id if job.add_bos else None
  eos = tokenizer.eos_id if job.add_eos else None
  texts = {split: [] for split in store.SPLITS}
  pieces = {split: ([], []) for split in store.SPLITS}

  def flush(split):
    tokens, lengths = _pack(tokenizer.encode_batch(texts[split], job.threads), bos, eos, dtype)
    pieces[split][0].append(tokens)
    pieces[split][1].append(lengths)
    texts[split].clear()

  for split, text in shards_lib.documents(job.inputs, shard, _newlines_before(job, shard)):
    texts[split].append(text)
    if len(texts[split]) == _ENCODE_DOCUMENTS:
      flush(split)
  sizes = {}
  for split in store.SPLITS:
    if texts[split]:
      flush(split)
    tokens = np.concatenate(pieces[split][0]) if pieces[split][0] else np.zeros(0, dtype)
    lengths = np.concatenate(pieces[split][1]) if pieces[split][1] else np.zeros(0, np.int64)
    store.write_array(_part(job, shard.index, split, "tokens"), tokens)
    store.write_array(_part(job, shard.index, split, "lengths"), lengths)
    counts = np.bincount(tokens, minlength=tokenizer.vocab_size).astype(np.int64)
    store.write_bytes(_part(job, shard.index, split, "counts.npy"), store.npy_bytes(counts))
    sizes[split] = {"num_tokens": len(tokens), "num_documents": len(lengths)}
  store.write_bytes(_part(job, shard.index, "done.json"),
                    json.dumps({"shard": _shard_json(shard), "splits": sizes}, sort_keys=True).encode())


def _sizes(job: Job) -> dict:
  """Per split, the token and document counts of every shard, in shard order (after stage 1)."""
  out = {split: {"num_tokens": [], "num_documents": []} for split in store.SPLITS}
  for shard in job.shards:
    data = store.read_bytes(_part(job, shard.index, "done.json"))
    if data is None:
      raise ConfigError(f"prepare: shard {shard.index} of {job.output!r} was not encoded; run prepare again")
    for split, sizes in json.loads(data)["splits"].items():
      for k, v in sizes.items():
        out[split][k].append(v)
  return out


def _units(job: Job, sizes: dict) -> list[tuple[str, str, int]]:
  """The units of stage 2: ``(split, array, zarr shard)``."""
  units = []
  for split in store.SPLITS:
    for name, key, shard in (("tokens", "num_tokens", job.shard_tokens),
                             ("ends", "num_documents", store.SHARD_ENDS)):
      units += [(split, name, j) for j in range(-(-sum(sizes[split][key]) // shard))]
  return units


def create_arrays(job: Job) -> list[tuple[str, str, int]]:
  """Stage 2's set-up (one process): the shard sizes and the arrays' metadata; returns stage 2's units."""
  sizes = _sizes(job)
  store.write_bytes(store.join(job.output, ".parts", "sizes.json"), json.dumps(sizes).encode())
  dtype = store.token_dtype(_tokenizer(job.tokenizer_model).vocab_size)
  for split in store.SPLITS:
    store.create_array(store.join(job.output, split, "tokens"), dtype, sum(sizes[split]["num_tokens"]),
                       job.shard_tokens, min(store.CHUNK_TOKENS, job.shard_tokens))
    store.create_array(store.join(job.output, split, "ends"), np.dtype(np.int64),
                       sum(sizes[split]["num_documents"]), store.SHARD_ENDS, store.CHUNK_ENDS)
  return _units(job, sizes)


def _written_sizes(job: Job) -> dict:
  return json.loads(store.read_bytes(store.join(job.output, ".parts", "sizes.json")))


def assemble_unit(job: Job, unit: tuple) -> None:
  """Stage 2 for one zarr shard of one array: its values gathered from the parts."""
  split, name, j = unit
  marker = store.join(job.output, ".parts", "assembled", f"{split}-{name}-{j}")
  if store.read_bytes(marker) is not None:
    return
  sizes = _written_sizes(job)[split]
  per_part = np.asarray(sizes["num_tokens" if name == "tokens" else "num_documents"], dtype=np.int64)
  first = np.concatenate([[0], np.cumsum(per_part)])  # where each part starts in the array
  token_first = np.concatenate([[0], np.cumsum(sizes["num_tokens"])])
  shard_len = job.shard_tokens if name == "tokens" else store.SHARD_ENDS
  lo, hi = j * shard_len, min((j + 1) * shard_len, int(first[-1]))
  pieces = []
  for k in np.nonzero((first[:-1] < hi) & (first[1:] > lo))[0]:
    a, b = max(lo, first[k]) - first[k], min(hi, first[k + 1]) - first[k]
    source = store.open_array(_part(job, job.shards[k].index, split, "tokens" if name == "tokens" else "lengths"))
    if name == "tokens":
      pieces.append(source[a:b].read().result())
    else:  # ends: the part's running lengths, offset by where its tokens start
      lengths = source[:b].read().result()
      pieces.append(np.cumsum(lengths)[a:b] + token_first[k])
  store.open_array(store.join(job.output, split, name))[lo:hi].write(np.concatenate(pieces)).result()
  store.write_bytes(marker, b"done")


def finish(job: Job) -> store.Manifest:
  """Stage 3 (one process): counts, tokenizer and, last, the manifest."""
  sizes = _written_sizes(job)
  tokenizer = _tokenizer(job.tokenizer_model)
  splits = {}
  for split in store.SPLITS:
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for shard in job.shards:
      counts += store.npy_load(store.read_bytes(_part(job, shard.index, split, "counts.npy")))
    store.write_bytes(store.join(job.output, split, "token_counts.npy"), store.npy_bytes(counts))
    shards = store.shard_sizes(job.output, split)
    if shards is not None:
      store.write_bytes(store.join(job.output, split, store.SHARDS), json.dumps(shards, sort_keys=True).encode())
    splits[split] = {k: int(sum(v)) for k, v in sizes[split].items()}
    if not splits[split]["num_documents"]:
      raise ConfigError(f"data.source: {job.inputs.source!r} gives no {split} documents; use more documents "
                        "or another data.val_fraction")
  store.write_bytes(store.join(job.output, store.TOKENIZER), job.tokenizer_model)
  manifest = store.Manifest(
      tokenizer_fingerprint=tokenizer.fingerprint(), vocab_size=tokenizer.vocab_size, add_bos=job.add_bos,
      add_eos=job.add_eos, bos_id=tokenizer.bos_id if job.add_bos else None,
      eos_id=tokenizer.eos_id if job.add_eos else None,
      dtype=store.token_dtype(tokenizer.vocab_size).name, splits=splits,
      inputs=dataclasses.asdict(job.inputs))
  store.write_bytes(store.join(job.output, store.MANIFEST), manifest.to_json())
  remove_parts(job)
  return manifest


def remove_parts(job: Job) -> None:
  """Deletes ``.parts/`` (the stages' intermediate arrays and markers; about as large as the store)."""
  store.delete_tree(store.join(job.output, ".parts"))


def finished(job: Job) -> store.Manifest | None:
  """The manifest of the store already finished at ``job.output`` with ``job``'s inputs and settings, or None.

  Raises:
    ConfigError: a finished store of other inputs or settings is there, naming what differs.
  """
  if store.read_bytes(store.join(job.output, store.MANIFEST)) is None:
    return None
  manifest = store.read_manifest(job.output, setting="--output")
  wanted = {"tokenizer": _tokenizer(job.tokenizer_model).fingerprint(), "add_bos": job.add_bos,
            "add_eos": job.add_eos, "inputs": json.loads(json.dumps(dataclasses.asdict(job.inputs)))}
  found = {"tokenizer": manifest.tokenizer_fingerprint, "add_bos": manifest.add_bos, "add_eos": manifest.add_eos,
           "inputs": manifest.inputs}
  differ = [k for k in wanted if wanted[k] != found[k]]
  if differ:
    raise ConfigError(f"--output: {job.output!r} holds a finished token store of other settings ({', '.join(differ)} "
                      "differ); choose another --output, or delete that store to prepare this one there")
  return manifest


def _call(args):
  fn, job, item = args
  fn(job, item)


def _map(fn: Callable, job: Job, items: Sequence, workers: int) -> None:
  if workers <= 1 or len(items) <= 1:
    for item in items:
      fn(job, item)
    return
  with multiprocessing.get_context("spawn").Pool(min(workers, len(items))) as pool:
    for _ in pool.imap_unordered(_call, [(fn, job, item) for item in items]):
      pass


def run_local(job: Job, workers: int = 0) -> store.Manifest:
  """All the stages on this machine, with ``workers`` processes (0: one per core)."""
  if (manifest := finished(job)) is not None:
    remove_parts(job)  # What a run killed after its manifest may have left.
    return manifest
  workers = workers or os.cpu_count() or 1
  _map(count_shard, job, job.counted, workers)
  _map(encode_shard, job, job.shards, workers)
  _map(assemble_unit, job, create_arrays(job), workers)
  return finish(job)


def run_pod(job: Job, workers: int = 0) -> store.Manifest:
  """All the stages across the processes of a ``jax.distributed`` job (collective: every process calls it),
  each process running its units on ``workers`` local processes (0: one per core)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  p, count = jax.process_index(), jax.process_count()
  if (manifest := finished(job)) is not None:
    if p == 0:
      remove_parts(job)
    multihost_utils.sync_global_devices("mile_jax prepare: already finished")
    return manifest
  workers = workers or os.cpu_count() or 1
  _map(count_shard, job, job.counted[p::count], workers)
  multihost_utils.sync_global_devices("mile_jax prepare: counted")
  _map(encode_shard, job, job.shards[p::count], workers)
  multihost_utils.sync_global_devices("mile_jax prepare: encoded")
  units = create_arrays(job) if p == 0 else None
  multihost_utils.sync_global_devices("mile_jax prepare: arrays created")
  units = units if p == 0 else _units(job, _written_sizes(job))
  _map(assemble_unit, job, units[p::count], workers)
  multihost_utils.sync_global_devices("mile_jax prepare: assembled")
  if p == 0:
    finish(job)
  multihost_utils.sync_global_devices("mile_jax prepare: finished")
  return store.read_manifest(job.output)


def make_job(inputs: shards_lib.Inputs, tokenizer: Tokenizer, *, add_bos: bool, add_eos: bool, output: str,
             records_per_shard: int = shards_lib.RECORDS_PER_SHARD,
             bytes_per_shard: int = shards_lib.BYTES_PER_SHARD, threads: int = 1,
             shard_tokens: int = store.SHARD_TOKENS) -> Job:
  shards, _ = shards_lib.plan(inputs, records_per_shard, bytes_per_shard)
  return Job(inputs=inputs, tokenizer_model=tokenizer.serialized_model(), add_bos=add_bos, add_eos=add_eos,
             output=output, shards=tuple(shards), threads=threads, shard_tokens=shard_tokens)

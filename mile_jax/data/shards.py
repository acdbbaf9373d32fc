"""A source cut into fixed shards of documents: the units of work of ``prepare.py``.

``files:<glob>``: files sorted, one shard per file, but an uncompressed JSON
Lines file larger than ``BYTES_PER_SHARD`` is cut into byte ranges of that
size, each holding the lines that start in it (``text_files.read_line_range``);
a range's line numbers come from the newlines of the ranges before it, counted
first (``count_newlines``). Each document goes to validation when the hash of
its id (``builtin._unit_hash`` of ``<path relative to the files' root>:<block
or line>``) falls below ``data.val_fraction``. ``tfds:`` and ``builtin:pydocs``: consecutive ranges of
``RECORDS_PER_SHARD`` records of each split as ``corpus.load_corpus`` gives it.
The shards, their order and their documents depend on the inputs alone, never
on how many workers read them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterator

from mile_jax.data import builtin, text_files
from mile_jax.data import corpus as corpus_lib
from mile_jax.errors import ConfigError

RECORDS_PER_SHARD = 1 << 16
BYTES_PER_SHARD = 1 << 26  # of an uncompressed JSON Lines file


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The source and the settings that decide its documents (``config.data``'s of the same names)."""

  source: str
  txt_documents: str = "file"
  text_field: str = "text"
  decode_errors: str = "replace"
  val_fraction: float = 0.05
  data_dir: str = ""
  train_split: str = "train"
  val_split: str = ""
  tfds_download: bool = False

  @classmethod
  def of(cls, data_config, source: str | None = None) -> Inputs:
    fields = {f.name: getattr(data_config, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**fields, "source": source or data_config.source})


@dataclasses.dataclass(frozen=True)
class Shard:
  """Shard ``index``: a file (``path``, ``stop`` 0), bytes ``[start, stop)`` of one, or records ``[start, stop)``
  of ``split``."""

  index: int
  path: str = ""
  split: str = ""
  start: int = 0
  stop: int = 0


@functools.lru_cache(maxsize=4)
def _corpus(inputs: Inputs) -> corpus_lib.Corpus:
  return corpus_lib.load_corpus(inputs, cache_dir="")


def _files(inputs: Inputs) -> tuple[list[str], str]:
  paths = text_files.list_files(inputs.source[len("files:"):])
  return paths, text_files.common_root(paths)


def plan(inputs: Inputs, records_per_shard: int = RECORDS_PER_SHARD,
         bytes_per_shard: int = BYTES_PER_SHARD) -> tuple[list[Shard], str]:
  """The shards of ``inputs`` and a digest that changes whenever their documents may.

  The shards' documents end to end, and the digest, are the same whatever
  ``records_per_shard`` and ``bytes_per_shard`` are.

  Raises:
    ConfigError: naming the setting, for a source that cannot be read.
  """
  corpus_lib.check_source(inputs.source)
  if inputs.source.startswith("files:"):
    paths, root = _files(inputs)
    listing = [(os.path.relpath(p, root), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    identity = [listing, inputs.txt_documents, inputs.text_field, inputs.decode_errors, inputs.val_fraction]
    if bytes_per_shard < 1:
      raise ConfigError(f"prepare: --bytes_per_shard must be positive, got {bytes_per_shard}")
    shards = []
    for path, (_, size, _) in zip(paths, listing):
      if size <= bytes_per_shard or not text_files.splittable(path):
        shards.append(Shard(len(shards), path=path))
        continue
      for start in range(0, size, bytes_per_shard):
        shards.append(Shard(len(shards), path=path, start=start, stop=min(start + bytes_per_shard, size)))
  else:
    if records_per_shard < 1:
      raise ConfigError(f"prepare: --records_per_shard must be positive, got {records_per_shard}")
    corpus = _corpus(inputs)
    identity = [corpus.train_key, corpus.validation_key]
    shards = []
    for split, texts in (("train", corpus.train), ("validation", corpus.validation)):
      for start in range(0, len(texts), records_per_shard):
        shards.append(Shard(len(shards), split=split, start=start, stop=min(start + records_per_shard, len(texts))))
  digest = hashlib.sha256(json.dumps([inputs.source, identity], sort_keys=True).encode("utf-8")).hexdigest()
  return shards, digest[:16]


def validation_setting(inputs: Inputs) -> str:
  """The setting that sizes the validation split of ``inputs``."""
  if inputs.source.startswith("tfds:"):
    return _corpus(inputs).validation_setting
  return "data.val_fraction"


def counted(shards: list[Shard] | tuple[Shard, ...]) -> list[Shard]:
  """The byte ranges whose newlines a later range of the same file needs (``count_newlines``)."""
  return [s for s, after in zip(shards, shards[1:]) if s.stop and after.path == s.path and after.start]


def count_newlines(shard: Shard) -> int:
  """The newlines in a byte-range shard."""
  return text_files.count_newlines(shard.path, shard.start, shard.stop)


def documents(inputs: Inputs, shard: Shard, newlines_before: int = 0) -> Iterator[tuple[str, str]]:
  """``(split, text)`` of the shard's documents, in order.

  Args:
    newlines_before: for a byte range, the newlines of its file before ``shard.start``.
  """
  if shard.path:
    root = _files(inputs)[1]
    if shard.stop:
      docs = text_files.read_line_range(shard.path, root, shard.start, shard.stop, newlines_before,
                                        text_field=inputs.text_field, decode_errors=inputs.decode_errors)
    else:
      docs = text_files.read_documents([shard.path], root, txt_documents=inputs.txt_documents,
                                       text_field=inputs.text_field, decode_errors=inputs.decode_errors)
    for doc_id, text in docs:
      yield ("validation" if builtin._unit_hash(doc_id) < inputs.val_fraction else "train"), text
    return
  texts = getattr(_corpus(inputs), shard.split)
  for i in range(shard.start, shard.stop, 1024):
    for text in texts[i:min(i + 1024, shard.stop)]:
      yield shard.split, text

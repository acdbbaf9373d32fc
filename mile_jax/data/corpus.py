"""From ``config.data.source`` to train and validation texts.

Sources:
  ``builtin:pydocs``  the offline corpus of ``builtin.py``; validation is a
                      hash-of-id hold-out of ``data.val_fraction``.
  ``files:<glob>``    local ``.txt``/``.jsonl`` files (``.gz`` too), read in
                      file order; validation is a hash-of-id hold-out.
  ``tfds:<name>``     a prepared TFDS dataset, ``<name>[/<config>][:<version>]``.
  ``store:<path>``    a token store made by ``prepare.py`` (local or ``gs://``);
                      it holds token ids, not texts, so ``load_corpus`` refuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from mile_jax.data import builtin, text_files
from mile_jax.errors import ConfigError

BUILTIN = ("builtin:pydocs",)
GENERATED = ("synthetic:zipf",)  # token ids from a known process; see synthetic.py
PREFIXES = ("files:", "tfds:", "store:")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Texts of both splits, each with a key that changes whenever its texts do."""

  train: Sequence[str]
  validation: Sequence[str]
  train_key: str
  validation_key: str
  validation_setting: str = "data.val_fraction"  # the setting that sizes the validation split


def check_source(source: str) -> None:
  """Raises ConfigError unless ``source`` names a known kind of source."""
  if source in BUILTIN or source in GENERATED:
    return
  for prefix in PREFIXES:
    if source.startswith(prefix) and source[len(prefix):].strip():
      return
  raise ConfigError(f"data.source: {source!r} is not a source; use one of {', '.join(BUILTIN + GENERATED)}, "
                    "files:<glob>, tfds:<name>[/<config>] or store:<path or gs://...>")


def documents_key(source: str, docs: Sequence[builtin.Document]) -> str:
  """A digest of the documents themselves, so any change to them changes the key."""
  h = hashlib.sha256(source.encode("utf-8"))
  for doc_id, text in docs:
    for part in (doc_id, text):
      data = part.encode("utf-8")
      h.update(len(data).to_bytes(8, "little"))
      h.update(data)
  return h.hexdigest()[:16]


def _builtin(source: str, val_fraction: float) -> Corpus:
  docs = builtin.pydocs_documents()
  train, val = builtin.split_documents(docs, val_fraction)
  if not val:
    raise ConfigError(f"data.val_fraction: {val_fraction} holds out none of the {len(docs)} documents of "
                      f"{source}; raise data.val_fraction")
  return Corpus(train=[t for _, t in train], validation=[t for _, t in val],
                train_key=documents_key(source, train), validation_key=documents_key(source, val))


def load_corpus(data_config: Any, cache_dir: str) -> Corpus:
  """The texts of the configured source, for training a tokenizer (``shards.py`` reads them for a store).

  Args:
    data_config: ``config.data``.
    cache_dir: not read: every source is read where it lies.
  """
  source = data_config.source
  check_source(source)
  if source in BUILTIN:
    return _builtin(source, data_config.val_fraction)
  from mile_jax.data import tfds_sources  # pylint: disable=import-outside-toplevel

  if source.startswith("files:"):
    pattern = source[len("files:"):]
    paths, stats = text_files.list_files(pattern), text_files.ReadStats()
    docs = list(text_files.read_documents(
        paths, text_files.common_root(paths), txt_documents=data_config.txt_documents,
        text_field=data_config.text_field, decode_errors=data_config.decode_errors, stats=stats))
    if not docs:
      raise ConfigError(f"data.source: the files matching {pattern!r} hold no non-empty documents "
                        f"({stats.empty_skipped} empty, {stats.utf8_skipped} skipped for invalid UTF-8)")
    train, val = builtin.split_documents(docs, data_config.val_fraction)
    for setting, split, texts in (("data.source", "train", train), ("data.val_fraction", "validation", val)):
      if not texts:
        raise ConfigError(f"{setting}: none of the {len(docs)} documents of {pattern!r} falls in the {split} "
                          "split; use more documents or another data.val_fraction")
    return Corpus(train=[t for _, t in train], validation=[t for _, t in val],
                  train_key=documents_key(source, train), validation_key=documents_key(source, val))
  if source.startswith("store:"):
    raise ConfigError(f"data.source: {source!r} holds token ids; train a tokenizer on the texts it was "
                      "prepared from, or leave data.tokenizer_path empty to use the store's own")
  train, val, key, val_setting = tfds_sources.open_tfds(
      source[len("tfds:"):], data_config.data_dir, train_split=data_config.train_split,
      val_split=data_config.val_split, text_field=data_config.text_field,
      val_fraction=data_config.val_fraction, download=data_config.tfds_download)
  return Corpus(train=train, validation=val, train_key=key + "|train",
                validation_key=key + "|validation", validation_setting=val_setting)

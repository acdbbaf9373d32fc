"""From ``config.data.source`` to train and validation texts.

Sources:
  ``builtin:pydocs``  the offline corpus of ``builtin.py``; validation is a
                      hash-of-id hold-out of ``data.val_fraction``.
  ``files:<glob>``    local ``.txt``/``.jsonl`` files (``.gz`` too), prepared
                      once into array_record by ``tfds_sources.prepare_files``.
  ``tfds:<name>``     a prepared TFDS dataset, ``<name>[/<config>][:<version>]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from mile_jax.data import builtin
from mile_jax.errors import ConfigError

BUILTIN = ("builtin:pydocs",)
GENERATED = ("synthetic:zipf",)  # token ids from a known process; see synthetic.py
PREFIXES = ("files:", "tfds:")


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
                    "files:<glob> or tfds:<name>[/<config>]")


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
  """The texts of the configured source (preparing ``files:`` data once).

  Args:
    data_config: ``config.data``.
    cache_dir: ``files:`` data is prepared in ``data.data_dir`` or, if that
      is empty, in ``<cache_dir>/prepared``.
  """
  source = data_config.source
  check_source(source)
  if source in BUILTIN:
    return _builtin(source, data_config.val_fraction)
  from mile_jax.data import tfds_sources  # pylint: disable=import-outside-toplevel

  if source.startswith("files:"):
    data_dir = data_config.data_dir or os.path.join(cache_dir, "prepared")
    builder = tfds_sources.prepare_files(
        source[len("files:"):], data_dir, txt_documents=data_config.txt_documents,
        text_field=data_config.text_field, decode_errors=data_config.decode_errors,
        val_fraction=data_config.val_fraction)
    splits = {name: builder.as_data_source(name) for name in ("train", "validation")}
    key = f"files|{builder.data_dir}"
    return Corpus(train=tfds_sources.TextSequence(splits["train"], "text"),
                  validation=tfds_sources.TextSequence(splits["validation"], "text"),
                  train_key=key + "|train", validation_key=key + "|validation")
  train, val, key, val_setting = tfds_sources.open_tfds(
      source[len("tfds:"):], data_config.data_dir, train_split=data_config.train_split,
      val_split=data_config.val_split, text_field=data_config.text_field,
      val_fraction=data_config.val_fraction, download=data_config.tfds_download)
  return Corpus(train=train, validation=val, train_key=key + "|train",
                validation_key=key + "|validation", validation_setting=val_setting)

"""From a data config to packed train/validation datasets and their tokenizer.

Validation documents are held out before the tokenizer is trained, so the
tokenizer never sees them. Everything slow is done once and cached under
``data.cache_dir``: ``files:`` preparation, tokenizer training and
tokenization (see ``token_store``). In a multi-process run only process 0
trains the tokenizer and the others receive its model, so that every process
tokenizes alike even when their copies of the corpus differ.

A mixture (``mix:``, see ``mixture.py``) loads each component as a source of
its own, trains one tokenizer on a weighted sample of all their training
documents, and packs each component separately; the train and validation
splits draw rows from them by the mixture's schedule.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mile_jax.data import corpus as corpus_lib
from mile_jax.data import mixture as mixture_lib
from mile_jax.data import synthetic
from mile_jax.data import token_store
from mile_jax.data.packing import PackedDataset
from mile_jax.data.prefetch import Prefetcher
from mile_jax.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_model, train_tokenizer
from mile_jax.errors import ConfigError

__all__ = ["DataSplits", "Prefetcher", "make_data", "resolve_cache_dir"]

_CACHE_ENV = "MILE_JAX_CACHE"


@dataclasses.dataclass
class DataSplits:
  """Packed training and validation data and the tokenizer that made them.

  For a mixture, ``train`` and ``validation`` are ``MixedDataset`` s and
  ``validation_components`` holds each component's validation split by name.
  """

  train: PackedDataset | mixture_lib.MixedDataset
  validation: PackedDataset | mixture_lib.MixedDataset  # shuffle=False: evaluation sees a fixed order
  tokenizer: Tokenizer
  validation_components: dict[str, PackedDataset] = dataclasses.field(default_factory=dict)


def resolve_cache_dir(cache_dir: str) -> str:
  """``cache_dir``, or ``$MILE_JAX_CACHE``, or ``~/.cache/mile_jax``, in that order."""
  if cache_dir:
    return os.path.expanduser(cache_dir)
  return os.path.expanduser(os.environ.get(_CACHE_ENV) or "~/.cache/mile_jax")


def _get_tokenizer(data_config: Any, vocab_size: int, corpus: Callable[[], corpus_lib.Corpus],
                   cache_dir: str) -> Tokenizer:
  """The tokenizer of data.tokenizer_path, or one trained on ``corpus()``'s train texts."""
  if data_config.tokenizer_path:
    path = data_config.tokenizer_path if "://" in data_config.tokenizer_path else os.path.expanduser(
        data_config.tokenizer_path)
    try:
      tokenizer = load_tokenizer(path)
    except FileNotFoundError:
      raise ConfigError(f"data.tokenizer_path: no such file {data_config.tokenizer_path!r}") from None
    except ImportError as e:  # gs:// or s3:// without its filesystem package.
      raise ConfigError(f"data.tokenizer_path: {path!r} needs a package: {e}") from None
    except (OSError, RuntimeError) as e:
      raise ConfigError(f"data.tokenizer_path: {path!r} is not a SentencePiece model ({e})") from None
  else:
    tokenizer = _shared_tokenizer(lambda: _train(data_config, vocab_size, corpus(), cache_dir))
  if tokenizer.vocab_size != vocab_size:
    raise ConfigError(
        f"model.vocab_size={vocab_size} does not match the vocabulary of "
        f"data.tokenizer_path={data_config.tokenizer_path!r}, which has {tokenizer.vocab_size} pieces")
  for setting, wanted, piece_id in (("data.add_bos", data_config.add_bos, tokenizer.bos_id),
                                    ("data.add_eos", data_config.add_eos, tokenizer.eos_id)):
    if wanted and piece_id < 0:
      raise ConfigError(f"{setting}: the tokenizer has no such piece; set it to False")
  return tokenizer


def _train(data_config: Any, vocab_size: int, corpus: corpus_lib.Corpus, cache_dir: str) -> Tokenizer:
  """The tokenizer trained on the first ``data.tokenizer_train_documents`` train texts (cached)."""
  limit = data_config.tokenizer_train_documents
  texts = list(itertools.islice(iter(corpus.train), limit))
  key = corpus.train_key if len(texts) == len(corpus.train) else f"{corpus.train_key}|first{limit}"
  try:
    return train_tokenizer(
        texts, vocab_size, os.path.join(cache_dir, "tokenizers"), corpus_key=key,
        model_type=data_config.tokenizer_model_type,
        character_coverage=data_config.character_coverage,
        byte_fallback=data_config.byte_fallback)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's ``data`` on every process (the others pass None); collective.

  Sent as int32 values, which every backend's all-reduce sums exactly.
  """
  size = multihost_utils.broadcast_one_to_all(np.int32(len(data) if jax.process_index() == 0 else 0))
  if not size:
    return b""
  values = np.frombuffer(data, np.uint8) if jax.process_index() == 0 else np.zeros(int(size), np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(values.astype(np.int32))).astype(np.uint8).tobytes()


def _shared_tokenizer(train) -> Tokenizer:
  """``train()`` on process 0, its model sent to the other processes.

  A failure on process 0 is sent as an empty model, so that the others stop
  with an error instead of waiting.
  """
  if jax.process_count() == 1:
    return train()
  if jax.process_index() == 0:
    try:
      tokenizer = train()
    except BaseException:
      _broadcast_bytes(b"")
      raise
    _broadcast_bytes(tokenizer.serialized_model())
    return tokenizer
  model = _broadcast_bytes(None)
  if not model:
    raise ConfigError(f"data.tokenizer_path: process 0 could not train the tokenizer (its own error says why; "
                      f"this is process {jax.process_index()}); a trained one set in data.tokenizer_path skips "
                      "training")
  return tokenizer_from_model(model, "")


def _check_rows(split, name: str, size_setting: str, global_batch_size: int, component: str = "") -> None:
  """Raises ConfigError, naming the setting to change, unless ``split`` makes a global batch."""
  try:
    split.check_batch(global_batch_size)
  except ConfigError as e:
    if name == "train":
      raise ConfigError(f"{e} (the train split)") from None
    # The train split made a batch: the validation split is what is too small.
    of = f" of mixture component {component!r}" if component else ""
    raise ConfigError(
        f"{size_setting}: the validation split{of} ({split.num_documents} documents, {split.num_tokens} tokens) "
        f"packs into {split.rows_per_epoch} rows of data.seq_len + 1 = {split.row_len} tokens, fewer than one "
        f"global batch of {global_batch_size}; raise {size_setting}, or lower data.global_batch_size or "
        f"data.seq_len") from None


def make_data(data_config: Any, vocab_size: int, seq_len: int, seed: int) -> DataSplits:
  """Load, split, tokenize (cached) and pack the configured corpus.

  Args:
    data_config: ``config.data`` (every field of ``config_lib.base_config``).
    vocab_size: ``config.model.vocab_size``; a trained tokenizer gets exactly
      this size, a given one must have it.
    seq_len: tokens per training example.
    seed: seeds the training data order.

  Raises:
    ConfigError: naming the setting or file to fix, before anything compiles.
  """
  cache_dir = resolve_cache_dir(data_config.cache_dir)
  if data_config.source == synthetic.SOURCE:
    train, validation, tokenizer = synthetic.make_splits(data_config, vocab_size, seq_len, seed, cache_dir)
    for name, split in (("train", train), ("validation", validation)):
      _check_rows(split, name, "data.synthetic_val_tokens", data_config.global_batch_size)
    return DataSplits(train=train, validation=validation, tokenizer=tokenizer)
  components = mixture_lib.components(data_config.source)
  weights = [c.weight for c in components]
  corpora = [corpus_lib.load_corpus(_WithSource(data_config, c.source), cache_dir) for c in components]
  tokenizer = _get_tokenizer(
      data_config, vocab_size,
      lambda: mixture_lib.tokenizer_corpus(corpora, weights, data_config.tokenizer_train_documents), cache_dir)
  packed = {}  # name -> {"train": PackedDataset, "validation": PackedDataset}
  for k, (component, corpus) in enumerate(zip(components, corpora)):
    stream = k + 1 if mixture_lib.is_mixture(data_config.source) else 0  # the row order's key: (seed, stream, epoch)
    packed[component.name] = {
        name: _pack(data_config, tokenizer, texts, key, seq_len, seed, shuffle, stream, cache_dir,
                    f"{component.name} {name}" if stream else name)
        for name, texts, key, shuffle in (("train", corpus.train, corpus.train_key, True),
                                          ("validation", corpus.validation, corpus.validation_key, False))}
  if not mixture_lib.is_mixture(data_config.source):
    (splits,), (corpus,) = packed.values(), corpora
    for name, split in splits.items():
      _check_rows(split, name, corpus.validation_setting, data_config.global_batch_size)
    return DataSplits(train=splits["train"], validation=splits["validation"], tokenizer=tokenizer)
  for (name, splits), corpus in zip(packed.items(), corpora):
    _check_rows(splits["validation"], "validation", corpus.validation_setting, data_config.global_batch_size, name)
  train, validation = (
      mixture_lib.MixedDataset({name: splits[split] for name, splits in packed.items()}, weights, seed)
      for split in ("train", "validation"))
  _check_rows(train, "train", "data.val_fraction", data_config.global_batch_size)
  return DataSplits(train=train, validation=validation, tokenizer=tokenizer,
                    validation_components={name: splits["validation"] for name, splits in packed.items()})


class _WithSource:
  """``data_config`` read with ``source`` replaced."""

  def __init__(self, data_config: Any, source: str):
    self._data_config, self.source = data_config, source

  def __getattr__(self, name: str):
    return getattr(self._data_config, name)


def _pack(data_config: Any, tokenizer: Tokenizer, texts, key: str, seq_len: int, seed: int, shuffle: bool,
          stream: int, cache_dir: str, label: str) -> PackedDataset:
  """One split tokenized (cached) and packed."""
  store = token_store.load_or_build(texts, tokenizer, key, cache_dir)
  split = PackedDataset.from_flat(
      store.tokens, store.offsets, seq_len, tokenizer.eos_id if data_config.add_eos else None,
      seed, shuffle=shuffle, bos_id=tokenizer.bos_id if data_config.add_bos else None,
      segment_documents=data_config.segment_documents, counts=store.counts, stream=stream)
  logging.info("data %s: %d documents, %d tokens, %d rows per epoch (%s)", label, split.num_documents,
               split.num_tokens, split.rows_per_epoch, store.path)
  return split

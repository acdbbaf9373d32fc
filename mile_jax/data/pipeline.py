"""From a data config to packed train/validation datasets and their tokenizer.

Validation documents are held out before the tokenizer is trained, so the
tokenizer never sees them. Everything slow is done once and cached under
``data.cache_dir``: ``files:`` preparation, tokenizer training and
tokenization (see ``token_store``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any

from mile_jax.config_lib import ConfigError
from mile_jax.data import corpus as corpus_lib
from mile_jax.data import synthetic
from mile_jax.data import token_store
from mile_jax.data.packing import PackedDataset
from mile_jax.data.prefetch import Prefetcher
from mile_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["DataSplits", "Prefetcher", "make_data", "resolve_cache_dir"]

_CACHE_ENV = "MILE_JAX_CACHE"


@dataclasses.dataclass
class DataSplits:
  """Packed training and validation data and the tokenizer that made them."""

  train: PackedDataset
  validation: PackedDataset  # shuffle=False: evaluation sees a fixed order
  tokenizer: Tokenizer


def resolve_cache_dir(cache_dir: str) -> str:
  """``cache_dir``, or ``$MILE_JAX_CACHE``, or ``~/.cache/mile_jax``, in that order."""
  if cache_dir:
    return os.path.expanduser(cache_dir)
  return os.path.expanduser(os.environ.get(_CACHE_ENV) or "~/.cache/mile_jax")


def _get_tokenizer(data_config: Any, vocab_size: int, corpus: corpus_lib.Corpus,
                   cache_dir: str) -> Tokenizer:
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
    limit = data_config.tokenizer_train_documents
    texts = list(itertools.islice(iter(corpus.train), limit))
    key = corpus.train_key if len(texts) == len(corpus.train) else f"{corpus.train_key}|first{limit}"
    try:
      tokenizer = train_tokenizer(
          texts, vocab_size, os.path.join(cache_dir, "tokenizers"), corpus_key=key,
          model_type=data_config.tokenizer_model_type,
          character_coverage=data_config.character_coverage,
          byte_fallback=data_config.byte_fallback)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if tokenizer.vocab_size != vocab_size:
    raise ConfigError(
        f"model.vocab_size={vocab_size} does not match the vocabulary of "
        f"data.tokenizer_path={data_config.tokenizer_path!r}, which has {tokenizer.vocab_size} pieces")
  for setting, wanted, piece_id in (("data.add_bos", data_config.add_bos, tokenizer.bos_id),
                                    ("data.add_eos", data_config.add_eos, tokenizer.eos_id)):
    if wanted and piece_id < 0:
      raise ConfigError(f"{setting}: the tokenizer has no such piece; set it to False")
  return tokenizer


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
      try:
        split.check_batch(data_config.global_batch_size)
      except ConfigError as e:
        raise ConfigError(f"{e} (the {name} split)") from None
    return DataSplits(train=train, validation=validation, tokenizer=tokenizer)
  corpus = corpus_lib.load_corpus(data_config, cache_dir)
  tokenizer = _get_tokenizer(data_config, vocab_size, corpus, cache_dir)
  splits = {}
  for name, texts, key, shuffle in (("train", corpus.train, corpus.train_key, True),
                                    ("validation", corpus.validation, corpus.validation_key, False)):
    store = token_store.load_or_build(texts, tokenizer, key, cache_dir)
    splits[name] = PackedDataset.from_flat(
        store.tokens, store.offsets, seq_len, tokenizer.eos_id if data_config.add_eos else None,
        seed, shuffle=shuffle, bos_id=tokenizer.bos_id if data_config.add_bos else None,
        segment_documents=data_config.segment_documents, counts=store.counts)
    try:
      splits[name].check_batch(data_config.global_batch_size)
    except ConfigError as e:
      raise ConfigError(f"{e} (the {name} split)") from None
    logging.info("data %s: %d documents, %d tokens, %d rows per epoch (%s)", name,
                 splits[name].num_documents, splits[name].num_tokens, splits[name].rows_per_epoch,
                 store.path)
  return DataSplits(train=splits["train"], validation=splits["validation"], tokenizer=tokenizer)

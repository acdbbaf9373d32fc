"""From a data config to packed train/validation datasets and their tokenizer.

Validation documents are held out before the tokenizer is trained, so the
tokenizer never sees them. Every source is read through a token store
(``store.py``): ``store:<path or gs://...>`` names one made by the prepare
step (``prepare.py``), and any other source is prepared into
``<data.cache_dir>/stores/<key>`` on first use, the key digesting the
tokenizer, the inputs and ``add_bos``/``add_eos``. With a shared
``data.cache_dir`` (``gs://``) the processes of a multi-process run prepare it
together (``prepare.run_pod``); with a local one each process makes its own
copy, under a temporary name renamed when complete. In a multi-process run
only process 0 trains the tokenizer and the others receive its model, so that
every process tokenizes alike even when their copies of the corpus differ.

A mixture (``mix:``, see ``mixture.py``) loads each component as a source of
its own, trains one tokenizer on a weighted sample of all their training
documents, and packs each component separately; the train and validation
splits draw rows from them by the mixture's schedule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mile_jax.data import corpus as corpus_lib
from mile_jax.data import mixture as mixture_lib
from mile_jax.data import prepare as prepare_lib
from mile_jax.data import shards as shards_lib
from mile_jax.data import store as store_lib
from mile_jax.data import synthetic
from mile_jax.data.packing import PackedDataset
from mile_jax.data.prefetch import Prefetcher
from mile_jax.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_model, train_tokenizer
from mile_jax.errors import ConfigError

__all__ = ["DataSplits", "Prefetcher", "make_data", "per_host_copies_line", "resolve_cache_dir"]

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
    return cache_dir if "://" in cache_dir else os.path.expanduser(cache_dir)
  return os.path.expanduser(os.environ.get(_CACHE_ENV) or "~/.cache/mile_jax")


def per_host_copies_line(data_config: Any, process_count: int) -> str:
  """The run header's line saying that each process tokenizes its own copy of the data, or "" where none does.

  That happens in a run of several processes whose ``data.cache_dir`` is local
  to each host and whose source is one the run prepares itself (not ``store:``).
  """
  if process_count <= 1 or data_config.source == synthetic.SOURCE or "://" in resolve_cache_dir(data_config.cache_dir):
    return ""
  sources = [c.source for c in mixture_lib.components(data_config.source)
             if not c.source.startswith(store_lib.PREFIX)]
  if not sources:
    return ""
  return (f"Data preparation: each of the {process_count} processes tokenizes its own copy of {', '.join(sources)} "
          "into its local data.cache_dir; prepare it once instead (python -m mile_jax.data.prepare "
          f"--source={sources[0]} --tokenizer=... --output=gs://bucket/store --runner=pod) and train with "
          "data.source=store:gs://bucket/store")


def _get_tokenizer(data_config: Any, vocab_size: int, corpus: Callable[[], corpus_lib.Corpus],
                   cache_dir: str, store_url: str = "") -> Tokenizer:
  """The tokenizer of data.tokenizer_path, else the token store's at ``store_url``, else one trained on
  ``corpus()``'s train texts."""
  if not data_config.tokenizer_path and store_url:
    tokenizer = tokenizer_from_model(store_lib.store_tokenizer(store_url), store_lib.join(store_url, "tokenizer.model"))
  elif data_config.tokenizer_path:
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
  if tokenizer.vocab_size != vocab_size and store_url and not data_config.tokenizer_path:
    raise ConfigError(f"model.vocab_size={vocab_size} does not match the token store {store_url!r}, whose tokenizer "
                      f"has {tokenizer.vocab_size} pieces; set model.vocab_size={tokenizer.vocab_size}")
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
  stores = [c.source[len(store_lib.PREFIX):] for c in components if c.source.startswith(store_lib.PREFIX)]
  for url in stores:
    store_lib.read_manifest(url)  # Fails first, naming the store, when one is missing or unreadable.
  corpora = {}  # component index -> Corpus, loaded only to train a tokenizer

  def tokenizer_corpus():
    for k, c in enumerate(components):
      if not c.source.startswith(store_lib.PREFIX) and k not in corpora:
        corpora[k] = corpus_lib.load_corpus(_WithSource(data_config, c.source), cache_dir)
    return mixture_lib.tokenizer_corpus(list(corpora.values()), [weights[k] for k in corpora],
                                        data_config.tokenizer_train_documents)

  tokenizer = _get_tokenizer(data_config, vocab_size, tokenizer_corpus, cache_dir, stores[0] if stores else "")
  packed = {}  # name -> {"train": PackedDataset, "validation": PackedDataset}
  settings = {}  # name -> the setting that sizes its validation split
  for k, component in enumerate(components):
    stream = k + 1 if mixture_lib.is_mixture(data_config.source) else 0  # the row order's key: (seed, stream, epoch)
    url = _store_of(data_config, component.source, tokenizer, cache_dir)
    _, streams = store_lib.open_store(
        url, vocab_size=vocab_size, add_bos=data_config.add_bos, add_eos=data_config.add_eos,
        tokenizer_fingerprint=tokenizer.fingerprint())
    packed[component.name] = {
        name: _pack(data_config, tokenizer, streams[name], seq_len, seed, name == "train", stream,
                    f"{component.name} {name}" if stream else name, url)
        for name in store_lib.SPLITS}
    settings[component.name] = shards_lib.validation_setting(shards_lib.Inputs.of(data_config, component.source))
  if not mixture_lib.is_mixture(data_config.source):
    ((name, splits),) = packed.items()
    for split_name, split in splits.items():
      _check_rows(split, split_name, settings[name], data_config.global_batch_size)
    return DataSplits(train=splits["train"], validation=splits["validation"], tokenizer=tokenizer)
  for name, splits in packed.items():
    _check_rows(splits["validation"], "validation", settings[name], data_config.global_batch_size, name)
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


def _pack(data_config: Any, tokenizer: Tokenizer, tokens: store_lib.StoreStream, seq_len: int, seed: int,
          shuffle: bool, stream: int, label: str, url: str) -> PackedDataset:
  """One split of a token store, packed."""
  split = PackedDataset.from_stream(
      tokens, seq_len, tokenizer.eos_id if data_config.add_eos else None, seed, shuffle=shuffle,
      bos_id=tokenizer.bos_id if data_config.add_bos else None, segment_documents=data_config.segment_documents,
      stream=stream)
  logging.info("data %s: %d documents, %d tokens, %d rows per epoch (%s)", label, split.num_documents,
               split.num_tokens, split.rows_per_epoch, url)
  return split


def _store_of(data_config: Any, source: str, tokenizer: Tokenizer, cache_dir: str) -> str:
  """The token store of ``source``: the one it names, or its cached one, prepared on first use."""
  if source.startswith(store_lib.PREFIX):
    return source[len(store_lib.PREFIX):]
  inputs = shards_lib.Inputs.of(data_config, source)
  shards, digest = shards_lib.plan(inputs)
  blob = f"{store_lib.VERSION}|{tokenizer.fingerprint()}|{digest}|{data_config.add_bos}|{data_config.add_eos}"
  url = store_lib.join(cache_dir, "stores", hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16])
  if store_lib.read_bytes(store_lib.join(url, store_lib.MANIFEST)) is not None:
    return url
  job = prepare_lib.Job(inputs=inputs, tokenizer_model=tokenizer.serialized_model(), add_bos=data_config.add_bos,
                        add_eos=data_config.add_eos, output=url, shards=tuple(shards), threads=0)
  if "://" in url:  # A bucket: shared by the processes, and written in place (a rerun resumes).
    logging.info("data: preparing %s into %s", source, url)
    if jax.process_count() > 1:
      prepare_lib.run_pod(job)
    else:
      prepare_lib.run_local(job, workers=1)
    return url
  tmp = f"{url}.tmp-{os.uname().nodename}-{os.getpid()}"
  try:
    prepare_lib.run_local(dataclasses.replace(job, output=tmp), workers=1)
    try:
      os.rename(tmp, url)
    except OSError:
      if store_lib.read_bytes(store_lib.join(url, store_lib.MANIFEST)) is None:
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same store first, or this one failed
  return url

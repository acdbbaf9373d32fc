"""From a data config to train/validation datasets, and a background prefetcher.

Sources are looked up by name in ``SOURCES``: each is a function returning
``(id, text)`` documents. Validation documents are held out by id before the
tokenizer is trained, so the tokenizer never sees them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mile_jax.data import builtin
from mile_jax.data.packing import PackedDataset
from mile_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer, write_atomic

SOURCES: dict[str, Callable[[], list[builtin.Document]]] = {
    "builtin:pydocs": builtin.pydocs_documents,
}
_CACHE_ENV = "MILE_JAX_CACHE"
# Part of the token-cache key: bump when the cached arrays change meaning.
_TOKENS_VERSION = "tokens-v1"


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


def _load_documents(source: str) -> list[builtin.Document]:
  if source not in SOURCES:
    raise ValueError(
        f"data.source={source!r} is not supported; supported sources: "
        f"{', '.join(sorted(SOURCES))}"
    )
  return SOURCES[source]()


def _corpus_key(source: str, docs: Sequence[builtin.Document]) -> str:
  """A digest of the documents themselves, so any change to them misses the cache."""
  h = hashlib.sha256(source.encode("utf-8"))
  for doc_id, text in docs:
    for part in (doc_id, text):
      data = part.encode("utf-8")
      h.update(len(data).to_bytes(8, "little"))
      h.update(data)
  return h.hexdigest()[:16]


def _tokenize_cached(
    docs: Sequence[builtin.Document], tokenizer: Tokenizer, corpus_key: str, cache_dir: str
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of ``docs``, read from or written to the cache.

  Returns:
    ``tokens`` int32 [num_tokens] and ``offsets`` int64 [len(docs) + 1]:
    document i is ``tokens[offsets[i]:offsets[i + 1]]``.
  """
  key = hashlib.sha256(
      f"{_TOKENS_VERSION}|{tokenizer.fingerprint()}|{corpus_key}".encode("utf-8")
  ).hexdigest()[:16]
  path = os.path.join(cache_dir, "tokens", f"{key}.npz")
  if os.path.isfile(path):
    with np.load(path) as cached:
      return cached["tokens"], cached["offsets"]
  encoded = tokenizer.encode_batch([text for _, text in docs])
  offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
  np.cumsum([len(ids) for ids in encoded], out=offsets[1:])
  tokens = np.fromiter(
      (i for ids in encoded for i in ids), dtype=np.int32, count=int(offsets[-1])
  )
  buf = io.BytesIO()
  np.savez(buf, tokens=tokens, offsets=offsets)
  write_atomic(path, buf.getvalue())
  return tokens, offsets


def _get_tokenizer(data_config: Any, vocab_size: int, train_docs, corpus_key, cache_dir):
  if data_config.tokenizer_path:
    tokenizer = load_tokenizer(os.path.expanduser(data_config.tokenizer_path))
    if tokenizer.vocab_size != vocab_size:
      raise ValueError(
          f"model.vocab_size={vocab_size} does not match the vocabulary of "
          f"data.tokenizer_path={data_config.tokenizer_path!r}, which has "
          f"{tokenizer.vocab_size} pieces"
      )
    return tokenizer
  return train_tokenizer(
      [text for _, text in train_docs],
      vocab_size,
      os.path.join(cache_dir, "tokenizers"),
      corpus_key=corpus_key,
      model_type=data_config.tokenizer_model_type,
      character_coverage=data_config.character_coverage,
      byte_fallback=data_config.byte_fallback,
  )


def make_data(data_config: Any, vocab_size: int, seq_len: int, seed: int) -> DataSplits:
  """Load, split, tokenize (cached) and pack the configured corpus.

  Args:
    data_config: ``config.data``, read by attribute: ``source``,
      ``val_fraction``, ``cache_dir``, ``tokenizer_path``,
      ``tokenizer_model_type``, ``character_coverage``, ``byte_fallback``.
    vocab_size: ``config.model.vocab_size``; a trained tokenizer gets exactly
      this size, a given one must have it.
    seq_len: tokens per training example.
    seed: seeds the training data order.
  """
  cache_dir = resolve_cache_dir(data_config.cache_dir)
  source = data_config.source
  train_docs, val_docs = builtin.split_documents(
      _load_documents(source), data_config.val_fraction
  )
  train_key = _corpus_key(source, train_docs)
  tokenizer = _get_tokenizer(data_config, vocab_size, train_docs, train_key, cache_dir)
  splits = {}
  for name, docs, key, shuffle in (
      ("train", train_docs, train_key, True),
      ("validation", val_docs, _corpus_key(source, val_docs), False),
  ):
    tokens, offsets = _tokenize_cached(docs, tokenizer, key, cache_dir)
    splits[name] = PackedDataset.from_flat(
        tokens, offsets, seq_len, tokenizer.eos_id, seed, shuffle=shuffle
    )
  return DataSplits(train=splits["train"], validation=splits["validation"], tokenizer=tokenizer)


class Prefetcher:
  """Makes batches ahead of time on a daemon thread, handing them out in order.

  Args:
    make_batch: ``step -> batch`` (any pytree of numpy arrays); called with
      ``start_step, start_step + 1, ...`` from the background thread.
    start_step: the first step.
    buffer_size: batches made ahead at most.

  ``next()`` returns ``(step, batch)``. An exception raised by ``make_batch``
  is raised again by the ``next()`` that would have returned that step, and
  by every later call.
  """

  def __init__(
      self, make_batch: Callable[[int], Any], start_step: int = 0, buffer_size: int = 2
  ):
    if buffer_size < 1:
      raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    self._make_batch = make_batch
    self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._error: BaseException | None = None
    self._thread = threading.Thread(
        target=self._fill, args=(start_step,), name="mile_jax-prefetch", daemon=True
    )
    self._thread.start()

  def _put(self, item) -> bool:
    # A timeout rather than a blocking put, so close() is noticed promptly.
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self, step: int) -> None:
    while not self._stop.is_set():
      try:
        item = (step, self._make_batch(step), None)
      except BaseException as e:  # handed to the consumer, which decides
        self._put((step, None, e))
        return
      if not self._put(item):
        return
      step += 1

  def next(self) -> tuple[int, Any]:
    """The next ``(step, batch)``, waiting for it if needed."""
    if self._error is not None:
      raise self._error
    if self._stop.is_set():
      raise RuntimeError("Prefetcher is closed")
    step, batch, error = self._get()
    if error is not None:
      self._error = error
      raise error
    return step, batch

  def _get(self):
    # Polls rather than blocking forever, so a thread that died without
    # reporting (it never should) cannot hang the consumer.
    while True:
      try:
        return self._queue.get(timeout=0.1)
      except queue.Empty:
        if not self._thread.is_alive():
          try:
            return self._queue.get_nowait()
          except queue.Empty:
            raise RuntimeError("the prefetch thread stopped unexpectedly") from None

  __next__ = next

  def __iter__(self):
    return self

  def close(self) -> None:
    """Stop the thread and drop the batches it made ahead."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5.0)

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

"""Deterministic packing of tokenized documents into fixed-length rows.

An epoch is the documents in some order, each followed by one EOS, cut into
consecutive rows of ``seq_len + 1`` tokens; the tail that does not fill a row
is dropped. Every epoch has the same total length whatever the order, so the
number of rows per epoch is a constant and global row ``r`` lives in epoch
``r // rows_per_epoch``. Epoch ``e`` orders the documents by a permutation
drawn from ``np.random.default_rng([seed, e])``. Batch ``s`` is global rows
``[s * B, (s + 1) * B)``: a pure function of ``(seed, s)``, which is what lets a
resumed run or a different number of hosts see exactly the same data.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np


class PackedDataset:
  """Rows of ``seq_len + 1`` tokens packed from documents, indexed forever.

  Args:
    docs_tokens: one int array of token ids per document (EOS not included).
    seq_len: model sequence length; rows hold ``seq_len + 1`` tokens so that
      inputs and targets are both ``seq_len`` long.
    eos_id: token placed after every document.
    seed: seeds the per-epoch document order.
    shuffle: if False every epoch keeps the given document order.
  """

  def __init__(
      self,
      docs_tokens: Sequence[np.ndarray],
      seq_len: int,
      eos_id: int,
      seed: int,
      shuffle: bool = True,
  ):
    lengths = np.array([len(d) for d in docs_tokens], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(docs_tokens):
      tokens = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs_tokens])
    else:
      tokens = np.zeros(0, dtype=np.int32)
    self._init_flat(tokens, offsets, seq_len, eos_id, seed, shuffle)

  @classmethod
  def from_flat(
      cls,
      tokens: np.ndarray,
      offsets: np.ndarray,
      seq_len: int,
      eos_id: int,
      seed: int,
      shuffle: bool = True,
  ) -> PackedDataset:
    """Build from a flat token stream: ``tokens[offsets[i]:offsets[i+1]]`` is document i.

    Args:
      tokens: int32 [num_tokens].
      offsets: int64 [num_documents + 1], starting at 0, non-decreasing.
    """
    self = cls.__new__(cls)
    self._init_flat(tokens, offsets, seq_len, eos_id, seed, shuffle)
    return self

  def _init_flat(self, tokens, offsets, seq_len, eos_id, seed, shuffle) -> None:
    if seq_len < 1:
      raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    self._tokens = np.asarray(tokens, dtype=np.int32)  # [num_tokens]
    self._offsets = np.asarray(offsets, dtype=np.int64)  # [num_documents + 1]
    if self._offsets[0] != 0 or self._offsets[-1] != len(self._tokens):
      raise ValueError("offsets must start at 0 and end at len(tokens)")
    self._lengths = np.diff(self._offsets)  # [num_documents]
    self.seq_len = seq_len
    self.eos_id = eos_id
    self.seed = seed
    self.shuffle = shuffle
    self.row_len = seq_len + 1
    # Documents plus one EOS each: the same for every order.
    self.tokens_per_epoch = len(self._tokens) + self.num_documents
    self.rows_per_epoch = self.tokens_per_epoch // self.row_len
    self._lock = threading.Lock()
    self._cached_epoch = -1
    self._cached_stream = np.zeros(0, dtype=np.int32)

  @property
  def num_documents(self) -> int:
    return len(self._lengths)

  @property
  def num_tokens(self) -> int:
    """Document tokens, EOS not counted."""
    return len(self._tokens)

  def token_counts(self, vocab_size: int) -> np.ndarray:
    """Occurrences of each token id over one epoch, EOS included: int64 [vocab_size]."""
    counts = np.bincount(self._tokens, minlength=vocab_size).astype(np.int64)
    counts[self.eos_id] += self.num_documents
    return counts

  def document_order(self, epoch: int) -> np.ndarray:
    """The document permutation of ``epoch``: int64 [num_documents]."""
    if not self.shuffle:
      return np.arange(self.num_documents)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_documents)

  def _build_stream(self, epoch: int) -> np.ndarray:
    """The epoch's documents in order, each followed by EOS: int32 [tokens_per_epoch]."""
    order = self.document_order(epoch)
    new_starts = np.zeros(self.num_documents, dtype=np.int64)
    np.cumsum(self._lengths[order] + 1, out=new_starts)
    new_starts -= self._lengths[order] + 1  # exclusive cumulative sum
    # Where each document starts in the stream, indexed by document id.
    dest_start = np.empty_like(new_starts)
    dest_start[order] = new_starts
    shift = np.repeat(dest_start - self._offsets[:-1], self._lengths)
    stream = np.empty(self.tokens_per_epoch, dtype=np.int32)
    stream[np.arange(self.num_tokens) + shift] = self._tokens
    stream[dest_start + self._lengths] = self.eos_id
    return stream

  def _stream(self, epoch: int) -> np.ndarray:
    # Sequential access stays within one epoch for rows_per_epoch rows, so
    # one cached epoch makes it cheap.
    with self._lock:
      if epoch != self._cached_epoch:
        self._cached_stream = self._build_stream(epoch)
        self._cached_epoch = epoch
      return self._cached_stream

  def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Global rows by index (any epoch): int32 [len(indices), seq_len + 1]."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if self.rows_per_epoch == 0:
      raise ValueError(
          f"corpus of {self.tokens_per_epoch} tokens is shorter than one row of "
          f"data.seq_len + 1 = {self.row_len} tokens"
      )
    if indices.size and indices.min() < 0:
      raise ValueError("row indices must be non-negative")
    out = np.empty((len(indices), self.row_len), dtype=np.int32)
    epochs, within = np.divmod(indices, self.rows_per_epoch)
    for epoch in np.unique(epochs):
      sel = np.nonzero(epochs == epoch)[0]
      stream = self._stream(int(epoch))
      starts = within[sel] * self.row_len
      out[sel] = stream[starts[:, None] + np.arange(self.row_len)]
    return out

  def batch(
      self,
      step: int,
      global_batch_size: int,
      process_index: int = 0,
      process_count: int = 1,
  ) -> dict[str, np.ndarray]:
    """This process's contiguous share of the global batch at ``step``.

    The global batch is rows ``[step * B, (step + 1) * B)``; process ``p`` of
    ``P`` gets rows ``step * B + p * B/P`` onwards, ``B/P`` of them, so the
    shares concatenated in process order equal the single-process batch.

    Returns:
      ``inputs`` int32 [B/P, seq_len], ``targets`` int32 [B/P, seq_len]
      (inputs shifted left by one), ``mask`` float32 [B/P, seq_len] (all
      ones: packed rows have no padding).
    """
    if global_batch_size < 1 or global_batch_size % process_count != 0:
      raise ValueError(
          f"data.global_batch_size={global_batch_size} must be a positive "
          f"multiple of the process count {process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if self.rows_per_epoch < global_batch_size:
      raise ValueError(
          f"the corpus packs into {self.rows_per_epoch} rows of data.seq_len + 1 = "
          f"{self.row_len} tokens, fewer than one global batch of "
          f"data.global_batch_size={global_batch_size}; lower either setting"
      )
    per_process = global_batch_size // process_count
    first = step * global_batch_size + process_index * per_process
    rows = self.rows(np.arange(first, first + per_process))
    return {
        "inputs": np.ascontiguousarray(rows[:, :-1]),
        "targets": np.ascontiguousarray(rows[:, 1:]),
        "mask": np.ones((per_process, self.seq_len), dtype=np.float32),
    }

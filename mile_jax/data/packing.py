"""Deterministic packing of tokenized documents into fixed-length rows.

An epoch is the documents in some order, each as ``[BOS] tokens [EOS]`` (BOS
and EOS optional), laid end to end and cut into consecutive rows of
``seq_len + 1`` tokens; the tail that does not fill a row is dropped. Every
epoch has the same total length whatever the order, so the number of rows per
epoch is a constant and global row ``r`` lives in epoch ``r // rows_per_epoch``.
Epoch ``e`` orders the documents by a permutation drawn from
``np.random.default_rng([seed, e])``. Batch ``s`` is global rows
``[s * B, (s + 1) * B)``: a pure function of ``(seed, s)``, which is what lets a
resumed run or a different number of processes see exactly the same data.

Rows are never materialised as a whole epoch: a row's tokens are found by a
binary search over the epoch's document start offsets and gathered from the
(possibly memory-mapped) token array, so a process reads only its own rows.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import numpy as np

from mile_jax.config_lib import ConfigError

_EPOCHS_CACHED = 2  # a batch can straddle two epochs


class PackedDataset:
  """Rows of ``seq_len + 1`` tokens packed from documents, indexed forever.

  Args:
    docs_tokens: one int array of token ids per document (no BOS or EOS).
    seq_len: model sequence length; rows hold ``seq_len + 1`` tokens so that
      inputs and targets are both ``seq_len`` long.
    eos_id: token placed after every document; None for none.
    seed: seeds the per-epoch document order.
    shuffle: if False every epoch keeps the given document order.
    bos_id: token placed before every document; None for none. Targets that
      are a BOS get mask 0 (nothing to learn in predicting it).
    segment_documents: batches also carry ``segment_ids`` and ``positions``
      so that attention stays within each document.
  """

  def __init__(self, docs_tokens: Sequence[np.ndarray], seq_len: int, eos_id: int | None, seed: int,
               shuffle: bool = True, *, bos_id: int | None = None, segment_documents: bool = False):
    lengths = np.array([len(d) for d in docs_tokens], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(docs_tokens):
      tokens = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs_tokens])
    else:
      tokens = np.zeros(0, dtype=np.int32)
    self._init_flat(tokens, offsets, seq_len, eos_id, seed, shuffle, bos_id, segment_documents, None)

  @classmethod
  def from_flat(cls, tokens: np.ndarray, offsets: np.ndarray, seq_len: int, eos_id: int | None,
                seed: int, shuffle: bool = True, *, bos_id: int | None = None,
                segment_documents: bool = False, counts: np.ndarray | None = None) -> PackedDataset:
    """Build from a flat token stream: ``tokens[offsets[i]:offsets[i+1]]`` is document i.

    Args:
      tokens: integer [num_tokens]; may be a read-only memory map.
      offsets: int64 [num_documents + 1], starting at 0, non-decreasing.
      counts: int64 [vocab], occurrences of each id in ``tokens`` if known.
    """
    self = cls.__new__(cls)
    self._init_flat(tokens, offsets, seq_len, eos_id, seed, shuffle, bos_id, segment_documents, counts)
    return self

  def _init_flat(self, tokens, offsets, seq_len, eos_id, seed, shuffle, bos_id, segment_documents,
                 counts) -> None:
    if seq_len < 1:
      raise ConfigError(f"data.seq_len: must be >= 1, got {seq_len}")
    self._tokens = tokens  # [num_tokens], any integer dtype
    self._offsets = np.asarray(offsets, dtype=np.int64)  # [num_documents + 1]
    if self._offsets[0] != 0 or self._offsets[-1] != len(self._tokens):
      raise ValueError("offsets must start at 0 and end at len(tokens)")
    self._lengths = np.diff(self._offsets)  # [num_documents]
    self._counts = counts
    self.seq_len = seq_len
    self.eos_id = eos_id
    self.bos_id = bos_id
    self.seed = seed
    self.shuffle = shuffle
    self.segment_documents = segment_documents
    self.row_len = seq_len + 1
    specials = (bos_id is not None) + (eos_id is not None)
    self._extended = self._lengths + specials  # [num_documents]: tokens in the stream
    self.tokens_per_epoch = int(self._extended.sum())
    self.rows_per_epoch = self.tokens_per_epoch // self.row_len
    self._lock = threading.Lock()
    self._epochs: collections.OrderedDict = collections.OrderedDict()

  @property
  def num_documents(self) -> int:
    return len(self._lengths)

  @property
  def num_tokens(self) -> int:
    """Document tokens, BOS and EOS not counted."""
    return len(self._tokens)

  def token_counts(self, vocab_size: int) -> np.ndarray:
    """Occurrences of each token id over one epoch's documents, BOS and EOS
    included (the dropped tail too): int64 [vocab_size]."""
    if self._counts is not None:
      counts = np.zeros(vocab_size, dtype=np.int64)
      counts[: len(self._counts)] = self._counts[:vocab_size]
    else:
      counts = np.bincount(np.asarray(self._tokens, dtype=np.int64), minlength=vocab_size)
      counts = counts.astype(np.int64)
    for special in (self.bos_id, self.eos_id):
      if special is not None:
        counts[special] += self.num_documents
    return counts

  def document_order(self, epoch: int) -> np.ndarray:
    """The document permutation of ``epoch``: int64 [num_documents]."""
    if not self.shuffle:
      return np.arange(self.num_documents)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_documents)

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, ends)`` of ``epoch``: int64 [num_documents] each;
    document ``order[k]`` fills stream positions ``[starts[k], ends[k])``."""
    with self._lock:
      if epoch not in self._epochs:
        order = self.document_order(epoch)
        ends = np.cumsum(self._extended[order])
        self._epochs[epoch] = (order, ends - self._extended[order], ends)
        while len(self._epochs) > _EPOCHS_CACHED:
          self._epochs.popitem(last=False)
      return self._epochs[epoch]

  def _check_rows(self, indices: np.ndarray) -> None:
    if self.rows_per_epoch == 0:
      raise ConfigError(
          f"data.seq_len: the corpus of {self.tokens_per_epoch} tokens is shorter than one row "
          f"of data.seq_len + 1 = {self.row_len} tokens")
    if indices.size and indices.min() < 0:
      raise ValueError("row indices must be non-negative")

  def _gather(self, indices: np.ndarray, with_segments: bool):
    """Tokens (int32), segment ids and positions (int64 or None) of global rows:
    [len(indices), seq_len + 1] each."""
    n = len(indices)
    tokens = np.empty((n, self.row_len), dtype=np.int32)
    segments = np.empty((n, self.row_len), dtype=np.int64) if with_segments else None
    positions = np.empty((n, self.row_len), dtype=np.int64) if with_segments else None
    epochs, within = np.divmod(indices, self.rows_per_epoch)
    for epoch in np.unique(epochs):
      sel = np.nonzero(epochs == epoch)[0]
      order, starts, ends = self._epoch(int(epoch))
      row_start = within[sel, None] * self.row_len  # (n_sel, 1)
      p = row_start + np.arange(self.row_len)  # (n_sel, L): stream positions
      k = np.searchsorted(ends, p, side="right")  # index into order
      doc = order[k]
      t = p - starts[k]  # offset within [BOS] tokens [EOS]
      out = np.empty(p.shape, dtype=np.int32)
      if self.bos_id is not None:
        out[t == 0] = self.bos_id
        t = t - 1
      if self.eos_id is not None:
        out[t == self._lengths[doc]] = self.eos_id
      regular = (t >= 0) & (t < self._lengths[doc])
      out[regular] = self._tokens[self._offsets[doc][regular] + t[regular]]
      tokens[sel] = out
      if with_segments:
        segments[sel] = k - k[:, :1] + 1
        positions[sel] = p - np.maximum(starts[k], row_start)
    return tokens, segments, positions

  def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Global rows by index (any epoch): int32 [len(indices), seq_len + 1]."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    self._check_rows(indices)
    return self._gather(indices, False)[0]

  def check_batch(self, global_batch_size: int, process_count: int = 1) -> None:
    """Raises ConfigError unless one global batch can be made and split."""
    if global_batch_size < 1 or global_batch_size % process_count != 0:
      raise ConfigError(f"data.global_batch_size={global_batch_size} must be a positive multiple "
                        f"of the process count {process_count}")
    self._check_rows(np.zeros(0, dtype=np.int64))
    if self.rows_per_epoch < global_batch_size:
      raise ConfigError(
          f"data.global_batch_size: the corpus packs into {self.rows_per_epoch} rows of "
          f"data.seq_len + 1 = {self.row_len} tokens, fewer than one global batch of "
          f"{global_batch_size}; lower data.global_batch_size or data.seq_len, or add documents")

  def batch(self, step: int, global_batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's contiguous share of the global batch at ``step``.

    The global batch is rows ``[step * B, (step + 1) * B)``; process ``p`` of
    ``P`` gets rows ``step * B + p * B/P`` onwards, ``B/P`` of them, so the
    shares concatenated in process order equal the single-process batch.

    Returns:
      ``inputs`` int32 [B/P, seq_len], ``targets`` int32 [B/P, seq_len]
      (inputs shifted left by one), ``mask`` float32 [B/P, seq_len] (0 where
      the target is a BOS, else 1), and with ``segment_documents``:
      ``segment_ids`` int32 [B/P, seq_len] (1, 2, ... per document within the
      row) and ``positions`` int32 [B/P, seq_len] (restarting at 0 in each
      document and at the start of the row).
    """
    self.check_batch(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per_process = global_batch_size // process_count
    first = step * global_batch_size + process_index * per_process
    rows, segments, positions = self._gather(
        np.arange(first, first + per_process, dtype=np.int64), self.segment_documents)
    targets = np.ascontiguousarray(rows[:, 1:])
    mask = np.ones((per_process, self.seq_len), dtype=np.float32)
    if self.bos_id is not None:
      mask[targets == self.bos_id] = 0.0
    out = {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": targets, "mask": mask}
    if self.segment_documents:
      out["segment_ids"] = segments[:, :-1].astype(np.int32)
      out["positions"] = positions[:, :-1].astype(np.int32)
    return out

  def state(self, step: int, global_batch_size: int) -> dict[str, int]:
    """Where the data stands before ``step``: a function of the step alone.

    Resuming needs only the step (saved with the train state); this is for
    logs and checks: ``epoch`` and ``row`` (within the epoch) of the next
    global batch's first row.
    """
    epoch, row = divmod(step * global_batch_size, max(self.rows_per_epoch, 1))
    return {"step": int(step), "epoch": int(epoch), "row": int(row), "seed": int(self.seed)}

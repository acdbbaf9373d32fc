"""Deterministic packing of tokenized documents into fixed-length rows.

The documents, in storage order, each as ``[BOS] tokens [EOS]`` (BOS and EOS
optional), are laid end to end and cut into consecutive rows of
``seq_len + 1`` tokens; the tail that does not fill a row is dropped. This
packing is fixed: ``rows_per_epoch`` rows, the same in every epoch. Global
row ``r`` is packed row ``pi_e(r mod rows_per_epoch)`` of epoch
``e = r // rows_per_epoch``, where ``pi_e`` is the keyed permutation
(``permutation.KeyedPermutation``) of ``(seed, stream, e)``, or the identity
without ``shuffle``. Batch ``s`` is global rows ``[s * B, (s + 1) * B)``: a
pure function of ``(seed, s)``, which is what lets a resumed run or a
different number of processes see exactly the same data.

Shuffling rows rather than documents keeps the cost independent of the corpus
size: a document permutation needs the prefix sums of the lengths in permuted
order, O(documents) memory and time per epoch (BENCHMARKS.md, "Data order
at scale"), while a row permutation needs nothing
beyond the static document offsets. What it gives up: a document shares its
rows with the same storage neighbours in every epoch.

Rows are never materialised as a whole epoch: a row's tokens are found by a
binary search over the documents' end offsets in the packed stream and
gathered from the (possibly memory-mapped) token array, so a process reads
only its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mile_jax.data.permutation import KeyedPermutation
from mile_jax.errors import ConfigError


class PackedDataset:
  """Rows of ``seq_len + 1`` tokens packed from documents, indexed forever.

  Args:
    docs_tokens: one int array of token ids per document (no BOS or EOS).
    seq_len: model sequence length; rows hold ``seq_len + 1`` tokens so that
      inputs and targets are both ``seq_len`` long.
    eos_id: token placed after every document; None for none.
    seed: seeds the per-epoch row order.
    shuffle: if False every epoch reads the packed rows in order.
    bos_id: token placed before every document; None for none. Targets that
      are a BOS get mask 0 (nothing to learn in predicting it).
    segment_documents: batches also carry ``segment_ids`` and ``positions``
      so that attention stays within each document.
    stream: part of the permutation key ``(seed, stream, epoch)``, so that
      datasets sharing a seed (a mixture's components) are ordered independently.
  """

  def __init__(self, docs_tokens: Sequence[np.ndarray], seq_len: int, eos_id: int | None, seed: int,
               shuffle: bool = True, *, bos_id: int | None = None, segment_documents: bool = False,
               stream: int = 0):
    lengths = np.array([len(d) for d in docs_tokens], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(docs_tokens):
      tokens = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs_tokens])
    else:
      tokens = np.zeros(0, dtype=np.int32)
    self._init_flat(tokens, offsets, seq_len, eos_id, seed, shuffle, bos_id, segment_documents, None, stream)

  @classmethod
  def from_flat(cls, tokens: np.ndarray, offsets: np.ndarray, seq_len: int, eos_id: int | None,
                seed: int, shuffle: bool = True, *, bos_id: int | None = None,
                segment_documents: bool = False, counts: np.ndarray | None = None,
                stream: int = 0) -> PackedDataset:
    """Build from a flat token stream: ``tokens[offsets[i]:offsets[i+1]]`` is document i.

    Args:
      tokens: integer [num_tokens]; may be a read-only memory map.
      offsets: int64 [num_documents + 1], starting at 0, non-decreasing.
      counts: int64 [vocab], occurrences of each id in ``tokens`` if known.
    """
    self = cls.__new__(cls)
    self._init_flat(tokens, offsets, seq_len, eos_id, seed, shuffle, bos_id, segment_documents, counts, stream)
    return self

  def _init_flat(self, tokens, offsets, seq_len, eos_id, seed, shuffle, bos_id, segment_documents,
                 counts, stream) -> None:
    if seq_len < 1:
      raise ConfigError(f"data.seq_len: must be >= 1, got {seq_len}")
    self._tokens = tokens  # [num_tokens], any integer dtype
    self._offsets = np.asarray(offsets, dtype=np.int64)  # [num_documents + 1]
    if self._offsets[0] != 0 or self._offsets[-1] != len(self._tokens):
      raise ValueError("offsets must start at 0 and end at len(tokens)")
    self._counts = counts
    self.seq_len = seq_len
    self.eos_id = eos_id
    self.bos_id = bos_id
    self.seed = seed
    self.shuffle = shuffle
    self.stream = stream
    self.segment_documents = segment_documents
    self.row_len = seq_len + 1
    self._specials = (bos_id is not None) + (eos_id is not None)  # tokens added to each document
    num_documents = len(self._offsets) - 1
    self._ends = self._offsets[1:]  # int64 [num_documents]: where each document ends in the packed stream
    if self._specials:
      self._ends = self._ends + np.arange(1, num_documents + 1) * self._specials
    self.tokens_per_epoch = int(self._offsets[-1]) + num_documents * self._specials
    self.rows_per_epoch = self.tokens_per_epoch // self.row_len

  @property
  def num_documents(self) -> int:
    return len(self._offsets) - 1

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

  def packed_rows(self, indices: np.ndarray) -> np.ndarray:
    """The packed rows (int64, in ``[0, rows_per_epoch)``) that global rows ``indices`` read."""
    epochs, within = np.divmod(indices, self.rows_per_epoch)
    if not self.shuffle:
      return within
    out = np.empty_like(within)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = KeyedPermutation(self.rows_per_epoch, (self.seed, self.stream, int(epoch)))(within[sel])
    return out

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
    n, width = len(indices), self.row_len
    row_start = self.packed_rows(indices)[:, None] * width  # (n, 1)
    p = row_start + np.arange(width)  # (n, L): stream positions
    # The documents of each row are consecutive: search only for its first and last, then give each of
    # them its run of positions (two binary searches per row instead of one per token).
    first = np.searchsorted(self._ends, row_start[:, 0], side="right")  # (n,)
    count = np.searchsorted(self._ends, row_start[:, 0] + width - 1, side="right") - first + 1  # (n,)
    row = np.repeat(np.arange(n), count)  # (m,): the row of each (row, document) pair
    doc = first[row] + np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)  # (m,)
    run = (np.minimum(self._ends[doc], row_start[row, 0] + width)
           - np.maximum(self._offsets[doc] + doc * self._specials, row_start[row, 0]))
    doc = np.repeat(doc, run).reshape(n, width)  # (n, L): the document of each position
    start = self._offsets[doc] + doc * self._specials  # where the document starts in the stream
    length = self._offsets[doc + 1] - self._offsets[doc]  # (n, L): tokens of the document
    t = p - start  # offset within [BOS] tokens [EOS]
    tokens = np.empty(p.shape, dtype=np.int32)
    if self.bos_id is not None:
      tokens[t == 0] = self.bos_id
      t = t - 1
    if self.eos_id is not None:
      tokens[t == length] = self.eos_id
    regular = (t >= 0) & (t < length)
    tokens[regular] = self._tokens[self._offsets[doc][regular] + t[regular]]
    if not with_segments:
      return tokens, None, None
    segments = doc - doc[:, :1] + 1
    positions = p - np.maximum(start, row_start)
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
    return self.batch_of_rows(np.arange(first, first + per_process, dtype=np.int64))

  def batch_of_rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """``batch``'s arrays for global rows ``indices`` (int64 [n], any order): [n, seq_len] each."""
    self._check_rows(indices)
    rows, segments, positions = self._gather(indices, self.segment_documents)
    targets = np.ascontiguousarray(rows[:, 1:])
    mask = np.ones((len(indices), self.seq_len), dtype=np.float32)
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

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

The packed stream is stored as such (``ArrayStream`` in memory, or a token
store's split, ``store.StoreStream``): a row is one range read of it, so a
process reads only its own rows and never a whole epoch. Segment ids and
positions come from the BOS/EOS in the row; only with neither are the
documents' end offsets looked up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mile_jax.data.permutation import KeyedPermutation
from mile_jax.errors import ConfigError


class ArrayStream:
  """A packed token stream held in memory: ``[BOS] ids [EOS]`` per document, end to end.

  Args:
    docs_tokens: one int array of token ids per document (no BOS or EOS).
    bos_id, eos_id: placed before / after every document; None for none.
  """

  def __init__(self, docs_tokens: Sequence[np.ndarray], bos_id: int | None, eos_id: int | None):
    pieces = []
    for d in docs_tokens:
      pieces += [[bos_id]] * (bos_id is not None) + [np.asarray(d, np.int64)] + [[eos_id]] * (eos_id is not None)
    self.tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)  # [num_tokens]
    lengths = [len(d) + (bos_id is not None) + (eos_id is not None) for d in docs_tokens]
    self.ends = np.cumsum(np.asarray(lengths, dtype=np.int64))  # int64 [num_documents]
    self.num_tokens, self.num_documents = len(self.tokens), len(lengths)
    self.counts = None  # counted when asked for

  def read(self, starts: np.ndarray, width: int) -> np.ndarray:
    """int32 [len(starts), width]: tokens ``[s, s + width)`` for each start ``s``."""
    return self.tokens[np.asarray(starts, np.int64)[:, None] + np.arange(width)]


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
    self._init(ArrayStream(docs_tokens, bos_id, eos_id), seq_len, eos_id, seed, shuffle, bos_id,
               segment_documents, stream)

  @classmethod
  def from_stream(cls, tokens, seq_len: int, eos_id: int | None, seed: int, shuffle: bool = True, *,
                  bos_id: int | None = None, segment_documents: bool = False, stream: int = 0) -> PackedDataset:
    """Build over a packed stream already laid out with ``bos_id``/``eos_id`` (a token store's split).

    Args:
      tokens: has ``num_tokens``, ``num_documents``, ``counts`` (int64
        [vocab] or None), ``ends`` (int64 [num_documents]) and
        ``read(starts, width) -> int32 [n, width]``, e.g. ``store.StoreStream``.
    """
    self = cls.__new__(cls)
    self._init(tokens, seq_len, eos_id, seed, shuffle, bos_id, segment_documents, stream)
    return self

  def _init(self, tokens, seq_len, eos_id, seed, shuffle, bos_id, segment_documents, stream) -> None:
    if seq_len < 1:
      raise ConfigError(f"data.seq_len: must be >= 1, got {seq_len}")
    self._stream = tokens
    self.seq_len = seq_len
    self.eos_id = eos_id
    self.bos_id = bos_id
    self.seed = seed
    self.shuffle = shuffle
    self.stream = stream
    self.segment_documents = segment_documents
    self.row_len = seq_len + 1
    self._specials = (bos_id is not None) + (eos_id is not None)  # tokens added to each document
    self.tokens_per_epoch = int(tokens.num_tokens)
    self.rows_per_epoch = self.tokens_per_epoch // self.row_len

  @property
  def num_documents(self) -> int:
    return int(self._stream.num_documents)

  @property
  def num_tokens(self) -> int:
    """Document tokens, BOS and EOS not counted."""
    return self.tokens_per_epoch - self.num_documents * self._specials

  def token_counts(self, vocab_size: int) -> np.ndarray:
    """Occurrences of each token id over one epoch's documents, BOS and EOS
    included (the dropped tail too): int64 [vocab_size]."""
    counts = self._stream.counts
    if counts is None:
      counts = np.bincount(self._stream.read(np.zeros(1, np.int64), self.tokens_per_epoch)[0],
                           minlength=vocab_size)
    out = np.zeros(vocab_size, dtype=np.int64)
    out[: min(len(counts), vocab_size)] = counts[:vocab_size]
    return out

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

  def _segments(self, tokens: np.ndarray, row_start: np.ndarray):
    """Segment ids and positions (int64 [n, L] each) of rows ``tokens`` starting at stream offsets ``row_start``.

    A document starts at its BOS, or just after the EOS before it; with
    neither, at the end offset of the document before it.
    """
    n, width = tokens.shape
    if self._specials:
      starts = np.zeros((n, width), dtype=bool)  # (n, L): a document starts here
      if self.bos_id is not None:
        starts |= tokens == self.bos_id
      if self.eos_id is not None:
        starts[:, 1:] |= tokens[:, :-1] == self.eos_id
    else:
      ends = self._stream.ends
      p = row_start[:, None] + np.arange(width)  # (n, L): stream positions
      doc = np.searchsorted(ends, p, side="right")  # (n, L): the document of each position
      starts = np.zeros((n, width), dtype=bool)
      starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
      # Empty documents between two positions still count as segments.
      segments = doc - doc[:, :1] + 1
    starts[:, 0] = True
    if self._specials:
      segments = np.cumsum(starts, axis=1)
    last_start = np.maximum.accumulate(np.where(starts, np.arange(width), 0), axis=1)
    return segments, np.arange(width) - last_start

  def _gather(self, indices: np.ndarray, with_segments: bool):
    """Tokens (int32), segment ids and positions (int64 or None) of global rows:
    [len(indices), seq_len + 1] each."""
    row_start = self.packed_rows(indices) * self.row_len  # (n,)
    tokens = self._stream.read(row_start, self.row_len)  # (n, L)
    if not with_segments:
      return tokens, None, None
    segments, positions = self._segments(tokens, row_start)
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

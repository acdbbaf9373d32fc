"""`synthetic:zipf`: a seeded language with known next-token distributions.

Documents are Markov chains over `num_symbols` symbols. The first symbol of a
document is drawn from a Zipfian unigram distribution q (q_r proportional to
1 / r ** zipf_exponent); after every symbol the document ends with
probability `stop_prob`, otherwise the next symbol is drawn from a sparse
transition row: `successors` distinct symbols sampled from q, with Gamma
distributed weights. Frequent symbols are frequent successors, so the corpus
keeps a Zipfian profile while every conditional distribution is known exactly.

Token ids: 0 pad, 1 unk, 2 bos, 3 eos, then the symbols, so the vocabulary
size is `num_symbols + 4` (the model's `vocab_size` sets `num_symbols`). Because the packer joins documents with EOS, the
distribution of every target depends only on the token just before it, and
`-log_prob_table()[input, target]` is the loss of the best possible model.
"""

import dataclasses
import os
from typing import Any

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_model

from mile_jax.data.packing import PackedDataset
from mile_jax.data.tokenizer import Tokenizer, load_tokenizer, write_atomic
from mile_jax.errors import ConfigError

NUM_SPECIAL = 4
EOS_ID = 3


@dataclasses.dataclass(frozen=True)
class ZipfBigram:
  """A sparse bigram language with a Zipfian unigram profile."""
  num_symbols: int = 1020
  zipf_exponent: float = 1.1
  successors: int = 32
  stop_prob: float = 0.01
  noise_shape: float = 0.5  # Gamma shape of the transition weights' noise.
  seed: int = 0

  @property
  def vocab_size(self) -> int:
    return self.num_symbols + NUM_SPECIAL

  def unigram(self) -> np.ndarray:
    """q: float64 [num_symbols], the Zipfian start distribution."""
    q = 1.0 / np.arange(1, self.num_symbols + 1, dtype=np.float64) ** self.zipf_exponent
    return q / q.sum()

  def transitions(self) -> tuple[np.ndarray, np.ndarray]:
    """(successor ids int64 [S, k], probabilities float64 [S, k]) in symbol space."""
    rng = np.random.default_rng([self.seed, 1])
    q = self.unigram()
    k = min(self.successors, self.num_symbols)
    ids = np.stack([rng.choice(self.num_symbols, size=k, replace=False, p=q) for _ in range(self.num_symbols)])
    weights = rng.gamma(self.noise_shape, size=ids.shape)
    return ids, weights / weights.sum(axis=1, keepdims=True)

  def log_prob_table(self) -> np.ndarray:
    """log P(next token | previous token): float64 [V, V], -inf where impossible.

    Rows for pad/unk/bos are never used by packed data; they are set to the
    start distribution like EOS's row.
    """
    v, s = self.vocab_size, NUM_SPECIAL
    probs = np.zeros((v, v))
    probs[:s, s:] = self.unigram()
    ids, p = self.transitions()
    rows = np.repeat(np.arange(self.num_symbols), ids.shape[1])
    np.add.at(probs, (rows + s, ids.ravel() + s), (1.0 - self.stop_prob) * p.ravel())
    probs[s:, EOS_ID] = self.stop_prob
    with np.errstate(divide="ignore"):
      return np.log(probs)

  def sample_documents(self, num_tokens: int, stream: int) -> list[np.ndarray]:
    """Documents (int32 token ids, EOS excluded) totalling about `num_tokens`.

    `stream` selects an independent sample (e.g. 0 for train, 1 for validation).
    Chains run in parallel and each keeps only its completed documents.
    """
    rng = np.random.default_rng([self.seed, 2, stream])
    ids, p = self.transitions()
    cdf = np.cumsum(p, axis=1)
    start_cdf = np.cumsum(self.unigram())
    chains = 256
    length = max(2 * num_tokens // chains, 64)
    out = np.empty((chains, length), np.int64)
    current = np.searchsorted(start_cdf, rng.random(chains) * start_cdf[-1])
    for t in range(length):
      out[:, t] = current
      ended = current == -1
      restart = np.searchsorted(start_cdf, rng.random(chains) * start_cdf[-1])
      column = np.minimum((cdf[np.maximum(current, 0)] < rng.random((chains, 1))).sum(axis=1), ids.shape[1] - 1)
      step = ids[np.maximum(current, 0), column]
      stop = rng.random(chains) < self.stop_prob
      current = np.where(ended, restart, np.where(stop, -1, step))
    docs = []
    for row in out:
      ends = np.flatnonzero(row == -1)
      starts = np.concatenate([[0], ends[:-1] + 1])
      docs.extend((row[a:b] + NUM_SPECIAL).astype(np.int32) for a, b in zip(starts, ends) if b > a)
    total, kept = 0, []
    for doc in docs:
      if total >= num_tokens:
        break
      kept.append(doc)
      total += len(doc)
    return kept


def optimal_losses(table: np.ndarray, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """The best achievable cross-entropy of each target: float64, shape of `targets`."""
  return -table[inputs, targets]


SOURCE = "synthetic:zipf"


def language(data_config: Any, vocab_size: int) -> ZipfBigram:
  """The language of `config.data` for a model with `vocab_size` ids."""
  if vocab_size <= NUM_SPECIAL + 1:
    raise ConfigError(f"model.vocab_size: {SOURCE} needs more than {NUM_SPECIAL + 1} ids, got {vocab_size}")
  return ZipfBigram(num_symbols=vocab_size - NUM_SPECIAL, zipf_exponent=data_config.synthetic_zipf_exponent,
                    seed=data_config.synthetic_seed)


def symbol_tokenizer(vocab_size: int, cache_dir: str) -> Tokenizer:
  """A SentencePiece word model whose pieces are the symbols `s0 s1 ...`.

  Id 4 + k is symbol k, matching the ids the language samples, so the text
  `"s0 s17"` encodes to [4, 21] and eval.py can use it like any tokenizer.
  """
  model = sp_model.ModelProto()
  model.trainer_spec.model_type = sp_model.TrainerSpec.WORD
  model.trainer_spec.vocab_size = vocab_size
  model.trainer_spec.pad_id, model.trainer_spec.unk_id = 0, 1
  model.trainer_spec.bos_id, model.trainer_spec.eos_id = 2, EOS_ID
  model.normalizer_spec.name = "identity"
  model.normalizer_spec.add_dummy_prefix = True
  model.normalizer_spec.remove_extra_whitespaces = True
  piece_type = sp_model.ModelProto.SentencePiece
  for piece, kind in (("<pad>", piece_type.CONTROL), ("<unk>", piece_type.UNKNOWN), ("<s>", piece_type.CONTROL),
                      ("</s>", piece_type.CONTROL)):
    model.pieces.add(piece=piece, type=kind, score=0.0)
  for k in range(vocab_size - NUM_SPECIAL):
    model.pieces.add(piece=f"\u2581s{k}", type=piece_type.NORMAL, score=-float(k))
  path = os.path.join(cache_dir, "tokenizers", f"synthetic-symbols-{vocab_size}.model")
  if not os.path.isfile(path):
    write_atomic(path, model.SerializeToString())
  return load_tokenizer(path)


def make_splits(data_config: Any, vocab_size: int, seq_len: int, seed: int, cache_dir: str):
  """(train, validation, tokenizer) for `synthetic:zipf`: independent samples of the language."""
  lang = language(data_config, vocab_size)
  splits = []
  for stream, num_tokens, shuffle in ((0, data_config.synthetic_train_tokens, True),
                                      (1, data_config.synthetic_val_tokens, False)):
    splits.append(PackedDataset(lang.sample_documents(num_tokens, stream), seq_len, EOS_ID, seed, shuffle=shuffle))
  return splits[0], splits[1], symbol_tokenizer(vocab_size, cache_dir)

"""SentencePiece tokenizer: training with an on-disk cache, loading, encoding.

Training is lossless by construction: identity normalisation, whitespace kept
as is, every character of the corpus in the vocabulary (``character_coverage``
1.0 by default) and byte fallback for anything unseen, so that
``decode(encode(text)) == text``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence

import sentencepiece as spm
from etils import epath

from mile_jax.errors import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SPECIAL = 4  # pad, unk, bos, eos
NUM_BYTE_PIECES = 256  # <0x00> ... <0xFF> with byte fallback
# Part of the cache key: bump when the trainer options below change meaning.
_TRAINER_VERSION = "spm-lossless-v1"
# Paragraphs longer than this (bytes) would be skipped by the trainer.
_MAX_SENTENCE_BYTES = 1 << 16


def write_atomic(path: str, data: bytes) -> None:
  """Write ``data`` to ``path`` through a temp file and ``os.replace``.

  An interrupted run leaves either the old file or none, never half of one.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; caches are shareable
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


class Tokenizer:
  """A loaded SentencePiece model.

  Token ids are Python ints in ``[0, vocab_size)``; no BOS or EOS is added
  by ``encode``: the packer places EOS between documents itself.
  """

  def __init__(self, processor: spm.SentencePieceProcessor, model_path: str):
    self._sp = processor
    self._model_path = model_path

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def model_path(self) -> str:
    """The ``.model`` file this tokenizer was loaded from ("" for a model received from process 0)."""
    return self._model_path

  def serialized_model(self) -> bytes:
    """The model protobuf, byte for byte what ``model_path`` holds."""
    return self._sp.serialized_model_proto()

  def fingerprint(self) -> str:
    """A hex digest of the model: equal fingerprints tokenize identically."""
    return hashlib.sha256(self.serialized_model()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    """Token ids of one string."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """Token ids of many strings, encoded in parallel.

    Args:
      num_threads: 0 means one per CPU core.
    """
    threads = num_threads or os.cpu_count() or 1
    return self._sp.encode(list(texts), out_type=int, num_threads=threads)

  def decode(self, ids: Sequence[int]) -> str:
    """The text of a sequence of token ids."""
    return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
  """Load a SentencePiece ``.model`` file (a local path or a gs:// / s3:// URI).

  Raises:
    FileNotFoundError: no such file.
    RuntimeError: the file is not a SentencePiece model (SentencePiece's own error).
  """
  model = epath.Path(path)
  if not model.is_file():
    raise FileNotFoundError(f"tokenizer model file not found: {path!r}")
  return tokenizer_from_model(model.read_bytes(), path)


def tokenizer_from_model(serialized: bytes, model_path: str) -> Tokenizer:
  """A tokenizer from a serialized SentencePiece model, which ``model_path`` holds ("" for none)."""
  return Tokenizer(spm.SentencePieceProcessor(model_proto=serialized), model_path)


def min_trainable_vocab_size(byte_fallback: bool) -> int:
  """The smallest ``vocab_size`` the SentencePiece trainer accepts, for any corpus.

  The 4 special pieces, the 256 byte pieces with byte fallback, and one
  character: training bpe or unigram (with this module's options) on a corpus
  of the single character U+2581 succeeds at 5 pieces (261 with byte
  fallback) and fails below. Every other character of a corpus needs one
  piece more (the trainer names how many).
  """
  return NUM_SPECIAL + 1 + (NUM_BYTE_PIECES if byte_fallback else 0)


def check_trainable_vocab_size(vocab_size: int, byte_fallback: bool) -> None:
  """Raises ConfigError naming model.vocab_size when no tokenizer of that size can be trained."""
  smallest = min_trainable_vocab_size(byte_fallback)
  if vocab_size < smallest:
    parts = f"{NUM_SPECIAL} special pieces" + (
        f", {NUM_BYTE_PIECES} byte pieces (data.byte_fallback=True)" if byte_fallback else "")
    raise ConfigError(f"model.vocab_size: no tokenizer of {vocab_size} pieces can be trained; the smallest is "
                      f"{smallest}: {parts} and one character, plus one for each further character of the "
                      f"corpus. Raise model.vocab_size, or set data.tokenizer_path")


def _cache_path(cache_dir: str, **key) -> str:
  blob = json.dumps({"version": _TRAINER_VERSION, **key}, sort_keys=True)
  digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
  return os.path.join(cache_dir, f"spm-{key['model_type']}-{key['vocab_size']}-{digest}.model")


def _paragraphs(texts: Sequence[str]) -> Iterator[str]:
  """Training sentences: paragraphs, newlines inside them kept."""
  for text in texts:
    for para in text.split("\n\n"):
      if para.strip():
        yield para


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    cache_dir: str,
    *,
    corpus_key: str,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    input_sentence_size: int = 1_000_000,
    num_threads: int = 0,
) -> Tokenizer:
  """Train a tokenizer on ``texts``, or load it from the cache.

  The cache file is keyed by ``corpus_key`` (which must change whenever
  ``texts`` do) and the training settings; a second call with the same key
  loads the file without training.

  Args:
    texts: training documents.
    vocab_size: exact size of the trained vocabulary, special ids included
      (pad 0, unk 1, bos 2, eos 3).
    cache_dir: directory for the ``.model`` files.
    corpus_key: identifies the corpus, e.g. a hash of its contents.
    model_type: ``"bpe"`` or ``"unigram"``.
    character_coverage: fraction of characters the vocabulary must cover.
    byte_fallback: encode unseen characters as UTF-8 byte tokens (costs 256
      vocabulary entries).
    input_sentence_size: at most this many paragraphs are sampled for
      training (with a fixed seed).
    num_threads: trainer threads; 0 means one per CPU core.

  Raises:
    ValueError: if ``vocab_size`` is impossible for this corpus (a
      ConfigError, before training, when it is for every corpus).
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(
        f"data.tokenizer_model_type must be 'bpe' or 'unigram', got {model_type!r}"
    )
  check_trainable_vocab_size(vocab_size, byte_fallback)
  path = _cache_path(
      cache_dir,
      corpus_key=corpus_key,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      byte_fallback=byte_fallback,
      input_sentence_size=input_sentence_size,
  )
  if os.path.isfile(path):
    return load_tokenizer(path)

  # Makes the paragraph sampling repeatable when the corpus is larger than
  # input_sentence_size (the seed is process-global in sentencepiece).
  spm.set_random_generator_seed(0)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_paragraphs(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    if "Vocabulary size" in str(e):
      # "INTERNAL: src/trainer_interface.cc(638) [check] Vocabulary size is ...": the part after the check.
      detail = str(e).split("] ", 1)[-1].strip().replace(
          "Increase vocab_size or decrease character_coverage with --character_coverage option.",
          "Raise model.vocab_size or lower data.character_coverage.")
      raise ValueError(
          f"model.vocab_size={vocab_size} is impossible for this corpus with "
          f"model_type={model_type!r}, byte_fallback={byte_fallback}: {detail}"
      ) from e
    raise
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  if processor.get_piece_size() != vocab_size:
    # hard_vocab_limit makes this unreachable; kept as a guard on the contract.
    raise ValueError(
        f"trained vocabulary has {processor.get_piece_size()} pieces, "
        f"model.vocab_size asks for {vocab_size}"
    )
  write_atomic(path, model.getvalue())
  return Tokenizer(processor, path)

"""Token ids of one corpus split, tokenized once and kept on disk, memory-mapped.

A store is a folder ``<cache_dir>/tokens/<key>/`` holding ``tokens.bin`` (the
documents' ids back to back, uint16 when the vocabulary fits, else int32),
``offsets.npy`` (int64 [num_documents + 1]), ``token_counts.npy`` (int64
[vocab_size], occurrences of each id) and ``meta.json``. The key digests the
tokenizer model and the corpus, so either changing makes a new store. The
folder is written under a temporary name and renamed when complete: an
interrupted run leaves no store, and the next run tokenizes again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable

import numpy as np

from mile_jax.data.tokenizer import Tokenizer

# Part of the key: bump when the stored arrays change meaning.
_VERSION = "token-store-v2"
_CHUNK_DOCUMENTS = 2048  # documents encoded per call


@dataclasses.dataclass(frozen=True)
class TokenStore:
  """A tokenized split: document i is ``tokens[offsets[i]:offsets[i + 1]]``."""

  tokens: np.ndarray  # uint16 or int32 [num_tokens], memory-mapped
  offsets: np.ndarray  # int64 [num_documents + 1]
  counts: np.ndarray  # int64 [vocab_size]: occurrences of each id in `tokens`
  key: str  # identifies tokenizer and corpus
  path: str  # the store's folder


def _token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def store_key(tokenizer: Tokenizer, corpus_key: str) -> str:
  blob = f"{_VERSION}|{tokenizer.fingerprint()}|{corpus_key}"
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _load(path: str, key: str) -> TokenStore:
  with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
    meta = json.load(f)
  if meta["num_tokens"]:
    tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=meta["dtype"], mode="r",
                       shape=(meta["num_tokens"],))
  else:
    tokens = np.zeros(0, dtype=meta["dtype"])
  offsets = np.load(os.path.join(path, "offsets.npy"))
  counts = np.load(os.path.join(path, "token_counts.npy"))
  return TokenStore(tokens=tokens, offsets=offsets, counts=counts, key=key, path=path)


def _write(directory: str, texts: Iterable[str], tokenizer: Tokenizer) -> None:
  dtype = _token_dtype(tokenizer.vocab_size)
  counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
  lengths = []
  chunk: list[str] = []

  def flush(f):
    encoded = tokenizer.encode_batch(chunk)
    lengths.extend(len(ids) for ids in encoded)
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=dtype,
                       count=sum(len(ids) for ids in encoded))
    counts[:] += np.bincount(flat, minlength=tokenizer.vocab_size)
    f.write(flat.tobytes())
    chunk.clear()

  with open(os.path.join(directory, "tokens.bin"), "wb") as f:
    for text in texts:
      chunk.append(text)
      if len(chunk) == _CHUNK_DOCUMENTS:
        flush(f)
    if chunk:
      flush(f)
  offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  np.save(os.path.join(directory, "offsets.npy"), offsets)
  np.save(os.path.join(directory, "token_counts.npy"), counts)
  meta = {"dtype": np.dtype(dtype).name, "num_tokens": int(offsets[-1]),
          "num_documents": len(lengths), "vocab_size": tokenizer.vocab_size}
  # Written last: a folder with meta.json is complete.
  with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f)


def load_or_build(texts: Iterable[str], tokenizer: Tokenizer, corpus_key: str,
                  cache_dir: str) -> TokenStore:
  """The store of ``texts`` under ``tokenizer``, built on the first call.

  Args:
    texts: the split's documents in order (read only when building).
    corpus_key: changes whenever ``texts`` do.
    cache_dir: stores go in ``<cache_dir>/tokens``.
  """
  key = store_key(tokenizer, corpus_key)
  root = os.path.join(cache_dir, "tokens")
  path = os.path.join(root, key)
  if os.path.isfile(os.path.join(path, "meta.json")):
    return _load(path, key)
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{key}-")
  try:
    _write(tmp, texts, tokenizer)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; caches are shareable
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.isfile(os.path.join(path, "meta.json")):
        raise
      shutil.rmtree(tmp)  # another process finished the same store first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return _load(path, key)

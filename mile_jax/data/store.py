"""The token store: a corpus tokenized once, kept locally or on ``gs://``, read a row at a time.

Layout under the store's root (a local directory or ``gs://bucket/path``),
all of it read and written through TensorStore (its ``file`` and ``gcs``
key-value stores), so a bucket and a directory behave alike:

  ``manifest.json``              written last: a store without one is unfinished
  ``tokenizer.model``            the SentencePiece model that made the ids
  ``<split>/tokens``             zarr3 [num_tokens] uint16 (int32 past 65536 ids): the
                                 split's documents end to end, each ``[BOS] ids [EOS]``
  ``<split>/ends``               zarr3 int64 [num_documents]: where each document ends in ``tokens``
  ``<split>/token_counts.npy``   int64 [vocab_size]: occurrences of each id in ``tokens``
  ``<split>/shards.json``        the bytes of each zarr shard object of ``tokens`` and ``ends``,
                                 checked when the store is opened
  ``.parts/``                    prepare's per-shard output (``prepare.py``), deleted at the end

for ``<split>`` in ``train`` and ``validation``. ``tokens`` is cut into zarr
shards of ``SHARD_TOKENS`` ids, each holding inner chunks of ``CHUNK_TOKENS``
ids: a row of ``seq_len + 1`` tokens is one or two small range reads, and
rows are cut at read time, so one store serves every ``seq_len``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil

import numpy as np
import tensorstore as ts

from mile_jax.errors import ConfigError

VERSION = "mile-jax-token-store-1"
SPLITS = ("train", "validation")
SHARD_TOKENS = 1 << 22  # ids per zarr shard (one file or object each)
CHUNK_TOKENS = 1 << 12  # ids per inner chunk (one range read each)
SHARD_ENDS = 1 << 20
CHUNK_ENDS = 1 << 12
MANIFEST = "manifest.json"
SHARDS = "shards.json"
ARRAYS = ("tokens", "ends")
TOKENIZER = "tokenizer.model"
PREFIX = "store:"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def join(url: str, *parts: str) -> str:
  return "/".join([url.rstrip("/"), *parts])


def kvstore_spec(url: str) -> dict:
  """TensorStore's key-value store for a local path or ``gs://bucket/path`` (a directory: ends in /)."""
  if url.startswith("gs://"):
    bucket, _, path = url[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": path.strip("/") + "/" if path.strip("/") else ""}
  if "://" in url:
    raise ConfigError(f"data.source: {url!r}: token stores live in a local directory or on gs://")
  return {"driver": "file", "path": os.path.abspath(os.path.expanduser(url)) + "/"}


def _split_url(url: str) -> tuple[str, str]:
  head, _, key = url.rstrip("/").rpartition("/")
  return head, key


def read_bytes(url: str) -> bytes | None:
  """The object at ``url``, or None where there is none."""
  head, key = _split_url(url)
  result = ts.KvStore.open(kvstore_spec(head)).result().read(key).result()
  return result.value if result.state == "value" else None


def write_bytes(url: str, data: bytes) -> None:
  """Writes the object at ``url`` whole (atomically: a reader sees the old or the new value)."""
  head, key = _split_url(url)
  ts.KvStore.open(kvstore_spec(head)).result().write(key, data).result()


def list_keys(url: str) -> list[str]:
  """Keys under the directory ``url``, relative to it, sorted."""
  store = ts.KvStore.open(kvstore_spec(url)).result()
  return sorted(k.decode() for k in store.list().result())


def delete_tree(url: str) -> None:
  """Deletes the directory ``url`` and everything under it (nothing where it does not exist)."""
  if "://" not in url:
    shutil.rmtree(os.path.abspath(os.path.expanduser(url)), ignore_errors=True)
    return
  ts.KvStore.open(kvstore_spec(url)).result().delete_range(ts.KvStore.KeyRange()).result()


def object_sizes(url: str) -> dict[str, int] | None:
  """{name: bytes} of the objects directly under the directory ``url`` ({} where there is none), in one
  listing; None where sizes cannot be listed (an object store whose fsspec package is not installed)."""
  if "://" not in url:
    try:
      with os.scandir(os.path.abspath(os.path.expanduser(url))) as entries:
        return {e.name: e.stat().st_size for e in entries if e.is_file()}
    except FileNotFoundError:
      return {}
  try:
    import fsspec  # pylint: disable=import-outside-toplevel

    fs = fsspec.filesystem(url.split("://", 1)[0])
  except (ImportError, ValueError):
    return None
  try:
    entries = fs.ls(url, detail=True, refresh=True)
  except FileNotFoundError:
    return {}
  return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e.get("type") == "file"}


def shard_sizes(url: str, split: str) -> dict[str, dict[str, int]] | None:
  """{array: {shard object: bytes}} of a split's arrays as they are now (None: sizes cannot be listed)."""
  sizes = {name: object_sizes(join(url, split, name, "c")) for name in ARRAYS}
  return None if None in sizes.values() else sizes


def check_shards(url: str, split: str) -> None:
  """Compares a split's shard objects with the sizes its prepare step wrote (one listing per array).

  Raises:
    ConfigError: a shard object is missing or of another size (a copy cut short, a damaged disk).
  """
  recorded = read_bytes(join(url, split, SHARDS))
  found = shard_sizes(url, split) if recorded is not None else None
  if found is None:  # A store from before shards.json, or sizes that cannot be listed here.
    return
  for name, sizes in json.loads(recorded).items():
    for key, size in sorted(sizes.items(), key=lambda item: int(item[0])):
      if found[name].get(key) != size:
        what = "is missing" if key not in found[name] else f"holds {found[name][key]:,} bytes where {size:,} were written"
        raise ConfigError(f"data.source: the token store {url!r} is damaged: {split}/{name}/c/{key} {what}; copy "
                          "the store again, or prepare it again")


def npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
  return np.load(io.BytesIO(data))


def array_spec(url: str, dtype: np.dtype | None = None, length: int | None = None, shard: int = 0,
               chunk: int = 0) -> dict:
  """The zarr3 spec of a 1-D array; with ``dtype`` and ``length``, one to create (sharded when ``shard``)."""
  spec = {"driver": "zarr3", "kvstore": kvstore_spec(url)}
  if dtype is None:
    return spec
  bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
  codecs = [bytes_codec]
  if shard:
    codecs = [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": [chunk], "codecs": [bytes_codec],
        "index_codecs": [bytes_codec, {"name": "crc32c"}]}}]
  spec["metadata"] = {
      "shape": [length], "data_type": np.dtype(dtype).name,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(shard or chunk, 1)]}},
      "chunk_key_encoding": {"name": "default"}, "fill_value": 0, "codecs": codecs}
  return spec


def write_array(url: str, values: np.ndarray, chunk: int = 1 << 20) -> None:
  """A whole 1-D array at ``url`` (unsharded chunks of ``chunk``), replacing any array there.

  A killed run may have left one there, of these values or (a rerun with other shards) of others.
  """
  # No chunk larger than the array: zarr stores an edge chunk whole, so a short array in a long chunk is mostly zeros.
  spec = array_spec(url, values.dtype, len(values), chunk=min(chunk, max(1, len(values))))
  array = ts.open(spec, create=True, delete_existing=True).result()
  if len(values):
    array.write(values).result()


def create_array(url: str, dtype: np.dtype, length: int, shard: int, chunk: int) -> None:
  """The metadata of a sharded 1-D array (kept as it is if the same is there already)."""
  ts.open(array_spec(url, dtype, length, shard, chunk), create=True, open=True).result()


def open_array(url: str):
  return ts.open(array_spec(url), open=True).result()


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What ``manifest.json`` holds: enough to check a store before reading it."""

  tokenizer_fingerprint: str
  vocab_size: int
  add_bos: bool
  add_eos: bool
  bos_id: int | None  # the id before each document, None without add_bos
  eos_id: int | None
  dtype: str  # of <split>/tokens
  splits: dict  # split -> {"num_tokens": int, "num_documents": int}
  inputs: dict  # the source and the reading settings it was prepared with
  version: str = VERSION

  def to_json(self) -> bytes:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True).encode("utf-8")


def read_manifest(url: str, setting: str = "data.source") -> Manifest:
  """The store's manifest; ConfigError naming ``url`` and what to do if it is missing or unreadable."""
  try:
    data = read_bytes(join(url, MANIFEST))
  except ValueError as e:  # TensorStore's errors: an unreachable bucket, no permission
    first = str(e).strip().splitlines()[0]
    raise ConfigError(f"{setting}: cannot read the token store {url!r} ({first}); check the path or bucket "
                      "and its credentials") from None
  if data is None:
    raise ConfigError(f"{setting}: {url!r} has no {MANIFEST}, so it is no finished token store; prepare it "
                      f"(python -m mile_jax.data.prepare --source=... --output={url}), or rerun an "
                      "interrupted prepare, which resumes")
  fields = json.loads(data)
  if fields.get("version") != VERSION:
    raise ConfigError(f"{setting}: the token store {url!r} is of format {fields.get('version')!r}, not "
                      f"{VERSION!r}; prepare it again")
  return Manifest(**fields)


class StoreStream:
  """One split of a store as the packed token stream ``packing.PackedDataset`` reads rows of.

  Opening reads the split's counts and nothing else; ``read`` issues one
  range read per row. ``ends`` (int64 [num_documents]) is read whole, on
  first use: only rows that carry document boundaries without a BOS or EOS to
  mark them need it.
  """

  def __init__(self, url: str, split: str, manifest: Manifest):
    self.url, self.split = url, split
    sizes = manifest.splits[split]
    self.num_tokens = int(sizes["num_tokens"])  # BOS and EOS included
    self.num_documents = int(sizes["num_documents"])
    counts = read_bytes(join(url, split, "token_counts.npy"))
    if counts is None:
      raise ConfigError(f"data.source: the token store {url!r} lacks {split}/token_counts.npy; prepare it again")
    self.counts = npy_load(counts)  # int64 [vocab_size]
    check_shards(url, split)
    self._tokens = open_array(join(url, split, "tokens"))
    if self._tokens.shape[0] != self.num_tokens:
      raise ConfigError(f"data.source: {join(url, split, 'tokens')} holds {self._tokens.shape[0]} ids where "
                        f"{MANIFEST} says {self.num_tokens}; prepare the store again")
    self._ends = None

  def read(self, starts: np.ndarray, width: int) -> np.ndarray:
    """Tokens ``[s, s + width)`` for each ``s`` in ``starts``: int32 [len(starts), width]."""
    out = np.empty((len(starts), width), dtype=np.int32)
    try:
      with ts.Batch() as batch:
        futures = [self._tokens[int(s):int(s) + width].read(batch=batch) for s in starts]
      for i, f in enumerate(futures):
        out[i] = f.result()
    except ValueError as e:
      first = str(e).strip().splitlines()[0]
      raise ConfigError(f"data.source: cannot read {join(self.url, self.split, 'tokens')} ({first}); a shard "
                        "is damaged or missing: prepare the store again") from None
    return out

  @property
  def ends(self) -> np.ndarray:
    if self._ends is None:
      self._ends = open_array(join(self.url, self.split, "ends")).read().result().astype(np.int64)
    return self._ends


def open_store(url: str, *, vocab_size: int, add_bos: bool, add_eos: bool,
               tokenizer_fingerprint: str | None) -> tuple[Manifest, dict[str, StoreStream]]:
  """A store's manifest and its splits, after checking them against the run's settings.

  Reads the manifest, the counts, and the shard objects' sizes (one listing per array, checked against
  those the prepare step wrote); no token. ``tokenizer_fingerprint`` None
  accepts the store's own tokenizer.

  Raises:
    ConfigError: one line naming the store and the setting to change.
  """
  manifest = read_manifest(url)
  if tokenizer_fingerprint is not None and manifest.tokenizer_fingerprint != tokenizer_fingerprint:
    raise ConfigError(f"data.tokenizer_path: the token store {url!r} was made with another tokenizer; leave "
                      "data.tokenizer_path empty to use the store's own, or prepare the store with this one")
  if manifest.vocab_size != vocab_size:
    raise ConfigError(f"model.vocab_size={vocab_size} does not match the token store {url!r}, whose tokenizer "
                      f"has {manifest.vocab_size} pieces; set model.vocab_size={manifest.vocab_size}")
  for setting, wanted, stored in (("data.add_bos", add_bos, manifest.add_bos),
                                  ("data.add_eos", add_eos, manifest.add_eos)):
    if wanted != stored:
      raise ConfigError(f"{setting}={wanted}, but the token store {url!r} was prepared with {stored}; set "
                        f"{setting}={stored}, or prepare a store with {setting.split('.')[1]}={wanted}")
  return manifest, {split: StoreStream(url, split, manifest) for split in SPLITS}


def store_tokenizer(url: str) -> bytes:
  """The serialized SentencePiece model kept in the store."""
  data = read_bytes(join(url, TOKENIZER))
  if data is None:
    raise ConfigError(f"data.source: the token store {url!r} lacks {TOKENIZER}; prepare it again")
  return data


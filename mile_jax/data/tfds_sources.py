"""TFDS: the builder that prepares local text files, and reading any TFDS text dataset.

Local files are prepared once by ``TextFilesBuilder`` into array_record files
(TFDS writes into an ``incomplete.*`` folder and renames it at the end, so an
interrupted preparation is redone, never read). Prepared datasets, ours or
from the TFDS catalog, are read by random access through
``builder.as_data_source()``, which needs no TensorFlow.
tensorflow_datasets is imported only when a ``files:`` or ``tfds:`` source is
used.

TFDS's own lines about a dataset it opens or prepares (absl warnings such as
"Using custom data configuration" or "Variant folder ... has no
dataset_info.json", and the printed "Downloading and preparing dataset" of a
preparation that downloads nothing) say nothing the user must act on: they
are dropped (`_quiet_tfds`, and the builder's no-op `_log_download_*`); what
was prepared is logged here at INFO. The messages of a real download (a
catalog dataset with ``data.tfds_download``) are left as TFDS prints them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from mile_jax.data import builtin, text_files
from mile_jax.errors import ConfigError

BUILDER_NAME = "mile_jax_text_files"
# Part of the prepared dataset's name: bump when the records change meaning.
_BUILDER_VERSION = "1.0.0"
_READ_CHUNK = 1024  # records fetched per random-access call


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  tfds.disable_progress_bar()
  return tfds


class _DropTfdsNotices(logging.Filter):
  """Drops records below ERROR logged from TFDS's own code."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_tfds():
  """Within: TFDS's warnings and infos (absl's logger, and the root logger) are dropped; errors pass."""
  drop = _DropTfdsNotices()
  loggers = [logging.getLogger("absl"), logging.getLogger()]
  for logger in loggers:
    logger.addFilter(drop)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(drop)


class TextSequence(Sequence):
  """The texts of one split as a random-access sequence of ``str``.

  Args:
    records: a TFDS data source (records are dicts) or a list of strings.
    field: the text feature of dict records; None for strings.
    indices: int64 [n], the records taken, in order; None for all.
  """

  def __init__(self, records, field: str | None = None, indices: np.ndarray | None = None):
    self._records = records
    self._field = field
    self._indices = indices

  def __len__(self) -> int:
    return len(self._records) if self._indices is None else len(self._indices)

  def _text(self, record) -> str:
    value = record if self._field is None else record[self._field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i %= len(self)
    return self._text(self._records[int(i if self._indices is None else self._indices[i])])

  def __iter__(self) -> Iterator[str]:
    for start in range(0, len(self), _READ_CHUNK):
      keys = range(start, min(start + _READ_CHUNK, len(self)))
      if self._indices is not None:
        keys = [int(k) for k in self._indices[start:keys.stop]]
      if hasattr(self._records, "__getitems__"):
        records = self._records.__getitems__(list(keys))
      else:
        records = [self._records[k] for k in keys]
      yield from (self._text(r) for r in records)


def holdout(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic document-level hold-out of record indices ``0..n-1``.

  Record ``i`` goes to validation when a 64-bit mix of ``i`` (splitmix64),
  scaled to [0, 1), falls below ``val_fraction``.

  Returns:
    ``(train_indices, val_indices)``, int64, ascending.
  """
  x = np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x ^= x >> np.uint64(31)
  is_val = (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < val_fraction
  return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def _make_builder_class():
  tfds = _tfds()

  class TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local text/JSON Lines files as a TFDS dataset with train and validation splits.

    Records: ``{"id": str, "text": str}``. A document goes to validation when
    the hash of its id (``builtin.split_documents``) falls below
    ``val_fraction``.
    """

    name = BUILDER_NAME
    VERSION = tfds.core.Version(_BUILDER_VERSION)
    # Nothing is downloaded, so there is no checksums file to look for beside
    # the code (looking needs importlib_resources, absent on Python >= 3.9).
    code_path = None

    def __init__(self, *, paths: Sequence[str], root: str, read_options: dict,
                 val_fraction: float, pattern: str, **kwargs):
      self._paths, self._root, self._read_options = list(paths), root, read_options
      self._val_fraction, self._pattern = val_fraction, pattern
      self._metadata = tfds.core.MetadataDict()
      super().__init__(**kwargs)

    def _log_download_bytes(self) -> None:
      pass  # TFDS prints "Downloading and preparing dataset Unknown size": nothing is downloaded.

    def _log_download_done(self) -> None:
      pass  # `prepare_files` logs what was prepared.

    def _info(self):
      features = tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=features, metadata=self._metadata)

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      # Validation first: a split that would be empty fails before the big one is written.
      return {"validation": self._generate_examples(True), "train": self._generate_examples(False)}

    def _generate_examples(self, validation: bool):
      stats = text_files.ReadStats()
      docs = text_files.read_documents(self._paths, self._root, stats=stats, **self._read_options)
      yielded = 0
      for doc_id, text in docs:
        if (builtin._unit_hash(doc_id) < self._val_fraction) == validation:
          yielded += 1
          yield doc_id, {"id": doc_id, "text": text}
      if not stats.documents:
        raise ConfigError(f"data.source: the files matching {self._pattern!r} hold no non-empty "
                          f"documents ({stats.empty_skipped} empty, {stats.utf8_skipped} skipped "
                          "for invalid UTF-8)")
      if not yielded:
        name = "data.val_fraction" if validation else "data.source"
        raise ConfigError(f"{name}: none of the {stats.documents} documents of {self._pattern!r} "
                          f"falls in the {'validation' if validation else 'train'} split; "
                          "use more documents or another data.val_fraction")
      if not validation:
        self._metadata.update(_stats_dict(stats))

  return TextFilesBuilder


def _stats_dict(stats: text_files.ReadStats) -> dict:
  return {k: int(v) for k, v in vars(stats).items()}


def prepare_files(pattern: str, data_dir: str, *, txt_documents: str, text_field: str,
                  decode_errors: str, val_fraction: float):
  """Prepare the files matching ``pattern`` once (array_record), and return the builder.

  The dataset is ``<data_dir>/mile_jax_text_files/<config>/<version>``, where
  the config name is a digest of the files (paths, sizes, modification times)
  and the reading options: changing any of them prepares a new dataset.
  """
  paths = text_files.list_files(pattern)
  root = text_files.common_root(paths)
  read_options = dict(txt_documents=txt_documents, text_field=text_field, decode_errors=decode_errors)
  listing = [(os.path.relpath(p, root), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
  blob = json.dumps([root, listing, read_options, val_fraction], sort_keys=True)
  config_name = "c" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
  tfds = _tfds()
  with _quiet_tfds():
    builder = _make_builder_class()(
        paths=paths, root=root, read_options=read_options, val_fraction=val_fraction, pattern=pattern,
        config=tfds.core.BuilderConfig(name=config_name, description=f"files {pattern}"),
        data_dir=data_dir, file_format="array_record")
    prepared = builder.is_prepared()
    if not prepared:
      builder.download_and_prepare()
  if not prepared:
    meta = dict(builder.info.metadata or {})
    logging.info(
        "Prepared %d documents (%d characters) from %d files matching %r into %s; skipped %d empty "
        "documents; invalid UTF-8: %d documents replaced, %d skipped",
        meta.get("documents", 0), meta.get("characters", 0), len(paths), pattern, builder.data_dir,
        meta.get("empty_skipped", 0), meta.get("utf8_replaced", 0), meta.get("utf8_skipped", 0))
  return builder


def _needs_tensorflow(name: str, builder, setting: str) -> ConfigError:
  return ConfigError(
      f"{setting}: TFDS dataset {name!r} in {builder.data_dir} is stored as "
      f"{builder.info.file_format.value}, which only TensorFlow reads: pip install tensorflow, "
      f"or prepare it as array_record (tfds build {name} --file_format=array_record "
      f"--data_dir={builder.data_dir_root})")


def _split_names(builder) -> list[str]:
  return sorted(builder.info.splits.keys())


def _check_split(setting: str, split: str, builder) -> None:
  if split.split("[")[0] not in builder.info.splits:
    raise ConfigError(f"{setting}: split {split!r} not in the dataset's splits {_split_names(builder)}")


def prepared_builder(name: str, data_dir: str, *, setting: str, download: bool = False,
                     prepare_hint: str = ""):
  """The builder of TFDS dataset ``name`` (``<dataset>[/<config>][:<version>]``), prepared.

  ``data_dir`` is local or ``gs://``, "" for TFDS's default. A dataset that is
  not prepared there is prepared as array_record when ``download``, else
  ConfigError (naming ``setting``, ending with ``prepare_hint``); so is an
  unknown name.
  """
  tfds = _tfds()
  try:
    with _quiet_tfds():  # A dataset not (yet) prepared there is ours to report.
      builder = tfds.builder(name, data_dir=data_dir or None)
      prepared = builder.is_prepared()
    if not prepared:
      if not download:
        raise ConfigError(
            f"{setting}: TFDS dataset {name!r} is not prepared in {builder.data_dir_root}; "
            f"prepare it (tfds build {name} --file_format=array_record --data_dir=...){prepare_hint}")
      builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
      builder.download_and_prepare()
  except ConfigError:
    raise
  except ValueError as e:  # DatasetNotFoundError and unknown configs or versions
    first_line = str(e).strip().splitlines()[0]
    raise ConfigError(f"{setting}: unknown TFDS dataset {name!r} ({first_line})") from None
  return builder


def split_reader(name: str, builder, *, setting: str, fields: Sequence[str] | None = None):
  """A function ``split -> records`` (dicts of decoded NumPy values) for a prepared dataset.

  Random-access formats (array_record) are read through
  ``builder.as_data_source`` without TensorFlow; others (tfrecord) are read
  whole with ``tfds.as_numpy(builder.as_dataset(split))`` where TensorFlow is
  importable (keeping only ``fields`` of each record in memory when given),
  else ConfigError naming ``setting``.
  """
  tfds = _tfds()
  if builder.info.available_file_formats() & tfds.core.file_adapters.FileFormat.with_random_access():
    return builder.as_data_source
  if importlib.util.find_spec("tensorflow") is not None:
    keep = (lambda r: {k: r[k] for k in fields}) if fields else (lambda r: r)
    return lambda split: [keep(r) for r in tfds.as_numpy(builder.as_dataset(split))]
  raise _needs_tensorflow(name, builder, setting)


def open_tfds(name: str, data_dir: str, *, train_split: str, val_split: str, text_field: str,
              val_fraction: float, download: bool):
  """Train and validation texts of a TFDS dataset.

  Args:
    name: ``<dataset>[/<config>][:<version>]``.
    data_dir: TFDS data directory (local or ``gs://``); "" for TFDS's default.
    val_split: "" takes ``validation`` if the dataset has it, else holds out
      ``val_fraction`` of the train records (see ``holdout``).
    download: prepare the dataset (as array_record) if it is not there.

  Returns:
    ``(train, validation, key, validation_setting)``: two ``TextSequence``, a
    string that identifies the data, and the setting that sizes the
    validation split (``data.val_split`` or, for a hold-out, ``data.val_fraction``).
  """
  builder = prepared_builder(name, data_dir, setting="data.source", download=download,
                             prepare_hint=" or set data.tfds_download=True")
  features = builder.info.features
  if text_field not in features:
    raise ConfigError(f"data.text_field: {text_field!r} is not a feature of TFDS dataset "
                      f"{name!r}; its features are {sorted(features.keys())}")
  _check_split("data.train_split", train_split, builder)
  if not val_split and "validation" in builder.info.splits:
    val_split = "validation"
  if val_split:
    _check_split("data.val_split", val_split, builder)
  read = split_reader(name, builder, setting="data.source", fields=(text_field,))
  train_records = read(train_split)
  key = f"tfds|{builder.info.full_name}|{builder.data_dir}|{text_field}|{train_split}"
  if val_split:
    val_records = read(val_split)
    train = TextSequence(train_records, text_field)
    val = TextSequence(val_records, text_field)
    key += f"|{len(train_records)}|{val_split}|{len(val_records)}"
  else:
    train_idx, val_idx = holdout(len(train_records), val_fraction)
    train = TextSequence(train_records, text_field, train_idx)
    val = TextSequence(train_records, text_field, val_idx)
    key += f"|{len(train_records)}|holdout={val_fraction}"
  val_setting = "data.val_split" if val_split else "data.val_fraction"
  if not len(train) or not len(val):
    raise ConfigError(f"{val_setting if len(train) else 'data.train_split'}: TFDS dataset {name!r} gives "
                      f"{len(train)} train and {len(val)} validation documents; both must be non-empty")
  return train, val, key, val_setting

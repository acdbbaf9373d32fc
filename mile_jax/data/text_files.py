"""Documents from local text files: plain text, JSON Lines, and gzip of either.

A ``.txt`` file is one document, or one document per blank-line-separated
block (``data.txt_documents``); a ``.jsonl`` file holds one JSON object per
line whose ``data.text_field`` is the document. Bytes that are not UTF-8 are
replaced by U+FFFD or the document is skipped (``data.decode_errors``); empty
and all-whitespace documents are skipped. Both are counted in ``ReadStats``.
A ``.txt`` file of which more than ``NOT_TEXT_SHARE`` of the characters are
invalid UTF-8 or control characters (a binary file matched by the glob) is
not text: a ``ConfigError`` names it, rather than a tokenizer trained on its
bytes. Any other problem is a ``ConfigError`` naming the file and the setting.
A file reached by several paths (symbolic links, a link back to a directory
above) is read once, under its shortest path.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence

from mile_jax.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TXT_DOCUMENTS = ("file", "blank_line")
DECODE_ERRORS = ("replace", "skip")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")
_READ_BLOCK = 1 << 24  # bytes per read when counting newlines
# A line holding only whitespace separates blocks, as an empty line does.
_BLANK_LINE = re.compile(rb"\r?\n[ \t\r\f\v]*\r?\n")
# Characters no text holds more than a few of: U+FFFD (invalid UTF-8 replaced) and C0 controls but
# tab, newline, vertical tab, form feed and carriage return.
_NOT_TEXT_CHARS = re.compile("[\ufffd\x00-\x08\x0e-\x1f\x7f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
NOT_TEXT_SHARE = 0.25  # of a file's characters; random bytes give about half, a few bad bytes in a text far less


@dataclasses.dataclass
class ReadStats:
  """What reading skipped or changed, for the log."""

  documents: int = 0  # documents kept
  characters: int = 0  # characters of the kept documents
  empty_skipped: int = 0  # empty or all-whitespace documents dropped
  utf8_replaced: int = 0  # documents with invalid UTF-8 replaced by U+FFFD
  utf8_skipped: int = 0  # documents dropped for invalid UTF-8

  def add(self, other: ReadStats) -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def list_files(pattern: str) -> list[str]:
  """Regular files matching ``pattern`` (``**`` recurses), sorted, each file once.

  A file matched under several paths (symbolic links; ``**`` through a link to
  a directory above, which glob follows round the loop) is listed once, by its
  shortest path (fewest parts, then first in order).

  Raises:
    ConfigError: if nothing matches, or a match has an unknown format.
  """
  shortest = {}  # real path -> path listed
  for p in glob.glob(os.path.expanduser(pattern), recursive=True):
    if os.path.isfile(p):
      real = os.path.realpath(p)
      kept = shortest.get(real)
      if kept is None or (p.count(os.sep), p) < (kept.count(os.sep), kept):
        shortest[real] = p
  paths = sorted(shortest.values())
  if not paths:
    raise ConfigError(f"data.source: no files match {pattern!r}")
  for path in paths:
    file_format(path)
  return paths


def file_format(path: str) -> str:
  """``"text"`` or ``"jsonl"`` from the file name (a ``.gz`` suffix is looked through)."""
  name = path[:-3] if path.endswith(".gz") else path
  if name.endswith(TEXT_SUFFIXES):
    return "text"
  if name.endswith(JSONL_SUFFIXES):
    return "jsonl"
  raise ConfigError(
      f"data.source: cannot tell the format of {path!r}; name files "
      f"{'/'.join(TEXT_SUFFIXES)} (plain text) or {'/'.join(JSONL_SUFFIXES)} "
      "(JSON Lines), optionally with .gz"
  )


def _read_bytes(path: str) -> bytes:
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ConfigError(f"data.source: cannot read {path!r}: {e}") from None


def _check_text(path: str, data: bytes) -> None:
  """Raises ConfigError naming ``path`` when ``data`` (its bytes) is not text (see ``NOT_TEXT_SHARE``)."""
  try:
    text = data.decode("utf-8")
    bad = len(_CONTROL_BYTES.findall(data))
  except UnicodeDecodeError:
    text = data.decode("utf-8", errors="replace")
    bad = len(_NOT_TEXT_CHARS.findall(text))
  if text and bad > NOT_TEXT_SHARE * len(text):
    raise ConfigError(
        f"data.source: {path!r} is not UTF-8 text ({bad / len(text):.0%} of its characters are invalid UTF-8 or "
        f"control characters); remove it, or narrow the pattern of data.source to the text files")


def _decode(data: bytes, decode_errors: str, stats: ReadStats) -> str | None:
  """``data`` as text, or None when it is to be skipped (and counted)."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    if decode_errors == "skip":
      stats.utf8_skipped += 1
      return None
    stats.utf8_replaced += 1
    return data.decode("utf-8", errors="replace")


def _raw_documents(path: str, txt_documents: str, text_field: str, decode_errors: str,
                   stats: ReadStats) -> Iterator[tuple[str, str]]:
  """``(local id, text)`` of one file's documents, before empty ones are dropped."""
  data = _read_bytes(path)
  if file_format(path) == "text":
    _check_text(path, data)
    if txt_documents == "file" or not data.strip():
      blocks = [data]  # an all-blank file counts as one empty document
    else:  # blank lines at the file's start and end separate nothing
      blocks = _BLANK_LINE.split(data.strip(b"\r\n"))
    for i, block in enumerate(blocks):
      text = _decode(block, decode_errors, stats)
      if text is not None:
        yield str(i), text
    return
  for line_no, line in enumerate(data.split(b"\n"), start=1):
    value = _jsonl_text(path, line_no, line, text_field, decode_errors, stats)
    if value is not None:
      yield str(line_no), value


def _jsonl_text(path: str, line_no: int, line: bytes, text_field: str, decode_errors: str,
                stats: ReadStats) -> str | None:
  """The document of one JSON Lines line (no newline), or None for a blank or skipped line."""
  if not line.strip():
    return None
  text = _decode(line, decode_errors, stats)
  if text is None:
    return None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"data.source: {path!r} line {line_no} is not valid JSON ({e.msg})") from None
  if not isinstance(record, dict) or text_field not in record:
    raise ConfigError(
        f"data.text_field: {path!r} line {line_no} has no field {text_field!r}"
    )
  value = record[text_field]
  if not isinstance(value, str):
    raise ConfigError(
        f"data.text_field: {path!r} line {line_no} field {text_field!r} is "
        f"{type(value).__name__}, not a string"
    )
  return value


def splittable(path: str) -> bool:
  """Whether ``path`` may be read in byte ranges: an uncompressed file of one document per line.

  A compressed file can only be read from its start, and a ``.txt`` file's
  documents (the file, or blocks between blank lines) are found from its start.
  """
  return not path.endswith(COMPRESSED_SUFFIXES) and file_format(path) == "jsonl"


def count_newlines(path: str, start: int, stop: int) -> int:
  """The number of newline bytes in bytes ``[start, stop)`` of ``path``."""
  count = 0
  try:
    with open(path, "rb") as f:
      f.seek(start)
      while start < stop:
        block = f.read(min(_READ_BLOCK, stop - start))
        if not block:
          break
        count += block.count(b"\n")
        start += len(block)
  except OSError as e:
    raise ConfigError(f"data.source: cannot read {path!r}: {e}") from None
  return count


def read_line_range(path: str, root: str, start: int, stop: int, newlines_before: int, *,
                    text_field: str = "text", decode_errors: str = "replace",
                    stats: ReadStats | None = None) -> Iterator[tuple[str, str]]:
  """``(id, text)`` of the non-empty documents of a JSON Lines file whose lines start in bytes ``[start, stop)``.

  Ranges that tile a file give, end to end, what ``read_documents`` gives for
  the whole file, with the same ids: a line's number is one more than the
  newlines before it, and ``newlines_before`` (those in bytes ``[0, start)``)
  is counted by ``count_newlines`` over the ranges before this one.
  """
  stats = ReadStats() if stats is None else stats
  rel = os.path.relpath(path, root)
  try:
    with open(path, "rb") as f:
      line_no, pos = newlines_before + 1, start
      if start > 0:
        f.seek(start - 1)
        # Through the newline that ends the line holding byte start - 1: a line starting before
        # start belongs to the range before.
        skipped = f.readline()
        pos += len(skipped) - 1
        line_no += int(len(skipped) > 1 and skipped.endswith(b"\n"))
      while pos < stop:
        line = f.readline()
        if not line:
          break
        pos += len(line)
        value = _jsonl_text(path, line_no, line[:-1] if line.endswith(b"\n") else line, text_field, decode_errors,
                            stats)
        line_no += 1
        if value is not None and _counted(value, stats):
          yield f"{rel}:{line_no - 1}", value
  except OSError as e:
    raise ConfigError(f"data.source: cannot read {path!r}: {e}") from None


def _counted(text: str, stats: "ReadStats") -> bool:
  """Whether `text` is a document (not empty or blank), counted in `stats` either way."""
  if not text.strip():
    stats.empty_skipped += 1
    return False
  stats.documents += 1
  stats.characters += len(text)
  return True


def read_documents(paths: Sequence[str], root: str, *, txt_documents: str = "file",
                   text_field: str = "text", decode_errors: str = "replace",
                   stats: ReadStats | None = None) -> Iterator[tuple[str, str]]:
  """``(id, text)`` of every non-empty document of ``paths``, in order.

  Ids are ``<path relative to root>:<block index or line number>``, so they
  name the document and do not depend on which other files are present.

  Args:
    paths: files, e.g. from ``list_files``.
    root: directory the ids are relative to.
    stats: counts are added here.
  """
  if txt_documents not in TXT_DOCUMENTS:
    raise ConfigError(f"data.txt_documents: must be one of {TXT_DOCUMENTS}, got {txt_documents!r}")
  if decode_errors not in DECODE_ERRORS:
    raise ConfigError(f"data.decode_errors: must be one of {DECODE_ERRORS}, got {decode_errors!r}")
  stats = ReadStats() if stats is None else stats
  for path in paths:
    rel = os.path.relpath(path, root)
    for local_id, text in _raw_documents(path, txt_documents, text_field, decode_errors, stats):
      if _counted(text, stats):
        yield f"{rel}:{local_id}", text


def common_root(paths: Sequence[str]) -> str:
  """The deepest directory holding every path."""
  return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])

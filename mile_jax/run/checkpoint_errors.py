"""What a failed checkpoint read or write means, in one line.

- `shows_damage`: the error says a file is missing, cut short or garbled
  (a status code of TensorStore's that says so, or a failed decompression or
  checksum, which TensorStore may report with no status code), so falling
  back to an older step is right; `is_transient`: the reader failed
  (out of memory, an object-store timeout), and another try may succeed;
  `is_missing`: NOT_FOUND or FAILED_PRECONDITION, damage that an object
  store may also answer for a while (retried there before it is believed).
- `describe_error`: the reason to print, in the operating system's words
  where a cause has them.
- `quiet_orbax_echoes`: Orbax reports one failed read or write many times
  over from its background threads (tracebacks of the same error, and "Event
  loop is closed" from reads or writes abandoned by the failure); the caller's
  one-line message says what failed, so those echoes are dropped.
"""

import json
import logging
import os
import re
import sys

# TensorStore status codes that describe the files themselves: cut short, garbled, missing.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")
_DAMAGE_TYPES = (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError)
# Bytes that do not decode: a compressed block or a checksum that does not check out, whatever the status code.
_DAMAGE_WORDS = re.compile(r"decompress\w*\(?\)? failed|data corruption|corrupt(ed)? (data|block|frame|input)|"
                           r"checksum|crc32c? mismatch|incorrect header check|invalid (block|frame|stored block)",
                           re.IGNORECASE)
# Failures of the reader, not of the files: another try may succeed.
_TRANSIENT_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")
_TRANSIENT_TYPES = (MemoryError, TimeoutError, ConnectionError)


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from or during, outermost first."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _status(error: BaseException) -> str | None:
  """The status code a TensorStore or XLA error message starts with ("DATA_LOSS: ...")."""
  match = re.match(r"([A-Z][A-Z_]+): ", str(error))
  return match.group(1) if match else None


def is_transient(error: BaseException) -> bool:
  return any(isinstance(e, _TRANSIENT_TYPES) or _status(e) in _TRANSIENT_CODES for e in _chain(error))


def is_missing(error: BaseException) -> bool:
  """The error says a file is missing or not in the expected state (NOT_FOUND,
  FAILED_PRECONDITION): damage on a filesystem, but on an object store also
  what a read racing a write or a listing that lags can answer, so worth a
  second try there before calling the step damaged."""
  chain = _chain(error)
  if any(_DAMAGE_WORDS.search(str(e)) for e in chain):  # Bytes that were read and do not decode.
    return False
  return any(isinstance(e, FileNotFoundError) or _status(e) in ("NOT_FOUND", "FAILED_PRECONDITION")
             for e in chain)


def shows_damage(error: BaseException) -> bool:
  """Whether `error` says that a file is missing, cut short or garbled (and nothing transient)."""
  return not is_transient(error) and any(
      isinstance(e, _DAMAGE_TYPES) or _status(e) in _DAMAGE_CODES or _DAMAGE_WORDS.search(str(e))
      for e in _chain(error))


def describe_error(error: BaseException) -> str:
  """A short reason for a failed read or write: the operating system's words
  where a cause has them, else the first line of the innermost cause."""
  chain = _chain(error)
  for e in chain:
    if isinstance(e, OSError) and e.strerror:
      return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))  # TensorStore's words for an OSError.
    if code:
      return os.strerror(int(code.group(1)))
  inner = chain[-1]
  first = str(inner).splitlines()[0][:300] if str(inner) else ""
  return f"{type(inner).__name__}: {first}" if first else type(inner).__name__


def _raised_in_orbax(error: BaseException) -> bool:
  for e in _chain(error):
    tb = e.__traceback__
    while tb is not None:
      if _in_orbax(tb.tb_frame.f_code.co_filename):
        return True
      tb = tb.tb_next
  return False


def _in_orbax(filename: str) -> bool:
  return f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in filename


def _is_echo(error: BaseException | None) -> bool:
  """An Orbax error reported again where nobody can act on it: an error of an
  Orbax task or TensorStore future that nobody retrieved once the operation
  had failed, or "Event loop is closed" from a read or write it abandoned."""
  if error is None:
    return False
  return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed") or (
      _status(error) is not None or _raised_in_orbax(error))


class _OrbaxEchoFilter(logging.Filter):
  """Drops Orbax's logged tracebacks (absl, ERROR) of failures it raises to its
  caller, and asyncio's reports of Orbax tasks whose error was never retrieved."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if record.name == "asyncio":
      return not _is_echo(error)
    return not (error is not None and record.levelno >= logging.ERROR and _in_orbax(record.pathname))


def quiet_orbax_echoes() -> None:
  """Installs, once per process, the filters of `_is_echo` and `_OrbaxEchoFilter`."""
  previous = sys.unraisablehook
  if not getattr(previous, "drops_orbax_echoes", False):
    def unraisablehook(unraisable):
      if not _is_echo(unraisable.exc_value):
        previous(unraisable)
    unraisablehook.drops_orbax_echoes = True
    sys.unraisablehook = unraisablehook
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxEchoFilter) for f in logger.filters):
      logger.addFilter(_OrbaxEchoFilter())

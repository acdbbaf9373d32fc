"""Surviving faults: one run per workdir, stopping cleanly on a signal, trimming logs on resume.

- `WorkdirLock`: `<workdir>/lock` names the process that uses the workdir; a
  second run refuses to start, a lock left by a dead process is taken over.
  On a filesystem, taking (or taking over) and releasing happen under an
  exclusive `flock` of `<workdir>/lock.guard`, so two runs cannot both take
  it. On an object store (gs://) the lock is written and read through epath
  with no such guard: a run checks after writing that the lock holds its own
  token, but two runs started within the same second could still both take it.
- `StopSignals`: SIGTERM and SIGINT become a request to stop after the
  current step (the loop then saves and returns). In a multi-process run the
  JAX preemption service owns SIGTERM, and every process asks
  `reached_preemption_sync_point` instead, so that all save the same step.
- `drop_records_after`: a resumed run re-does the steps after its checkpoint;
  their first records are dropped from `metrics.jsonl` so that it reads as
  one uninterrupted run.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid

import jax
from jax.experimental import multihost_utils

from mile_jax.errors import ConfigError
from mile_jax.run import workdir as workdir_lib

LOCK_NAME = "lock"
GUARD_NAME = "lock.guard"  # Never deleted: the flock that serialises taking and releasing the lock.


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient and `train.skip_nonfinite` is off."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by someone else.
    return True
  return True


class WorkdirLock:
  """An exclusive claim on a workdir, held from `acquire()` to `release()`.

  The lock file holds JSON {pid, host, token, since, beat}; `token` is drawn
  afresh by every `acquire()` and identifies the holder (a pid can be reused).
  A lock is stale when its holder is on this host and no longer alive, or,
  for a holder on another host (a shared filesystem), when its heartbeat (the
  file's mtime, or on an object store its `beat` time, refreshed every
  `heartbeat_s` by a daemon thread) is older than `stale_after_s`.
  """

  def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0,
               echo=print):
    workdir = workdir_lib.resolve(workdir)
    self.remote = workdir_lib.is_remote(workdir)
    self.path = workdir_lib.join(workdir, LOCK_NAME)
    self.guard_path = workdir_lib.join(workdir, GUARD_NAME)
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self._echo = echo
    self._stop = threading.Event()
    self._thread = None
    self._held = False
    self._token = None

  def _info(self, since: float | None = None) -> dict:
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "token": self._token, "since": since or now,
            "beat": now}

  @contextlib.contextmanager
  def _guard(self):
    """Excludes other processes' `_guard` on a filesystem (nothing on an object store)."""
    if self.remote:
      yield
      return
    try:
      fd = os.open(self.guard_path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
      raise ConfigError(f"--workdir: cannot open the lock's guard file {self.guard_path} ({e.strerror}); "
                        f"remove whatever is in its place, or use another --workdir") from e
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        logging.warning("%s: the filesystem does not lock files; two runs starting at once could both "
                        "take the workdir's lock", self.guard_path)
      yield
    finally:
      os.close(fd)  # Releases the flock.

  def _write(self, info: dict) -> None:
    """Replaces the lock file with `info`, atomically on a filesystem."""
    if self.remote:
      workdir_lib.path(self.path).write_text(json.dumps(info))
      return
    tmp = f"{self.path}.tmp-{self._token}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(info, f)
    os.replace(tmp, self.path)

  def holder(self) -> tuple[dict, float] | None:
    """(the lock file's JSON, its mtime), or None when there is no lock.

    A lock file that is not UTF-8 JSON (written half by a killed process, or
    damaged) gives {}: no holder to respect, so it is stale.

    Raises:
      ConfigError: the lock's path cannot be read as a file (a directory, no permission).
    """
    try:
      if self.remote:
        data, mtime = workdir_lib.path(self.path).read_bytes(), None
      else:
        with open(self.path, "rb") as f:
          data = f.read()
        mtime = os.path.getmtime(self.path)
    except FileNotFoundError:
      return None
    except OSError as e:
      raise ConfigError(f"--workdir: cannot read the lock file {self.path} ({e.strerror or e}); remove whatever "
                        f"is in its place, or use another --workdir") from e
    try:
      info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
      info = {}
    if not isinstance(info, dict):
      info = {}
    if mtime is None:
      beat = info.get("beat", 0.0)
      mtime = float(beat) if isinstance(beat, (int, float)) else 0.0
    return info, mtime

  def _ours(self) -> bool:
    found = self.holder()
    return found is not None and self._token is not None and found[0].get("token") == self._token

  def stale_reason(self, info: dict, mtime: float) -> str | None:
    """Why the lock described by `info` is stale, or None if its holder may be alive."""
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or not host:
      return "the lock file is unreadable"
    if host == socket.gethostname():
      if pid == os.getpid():  # A process before this one had our pid (a restarted container).
        return f"process {pid} on {host} is gone"
      return None if _pid_alive(pid) else f"process {pid} on {host} is gone"
    age = time.time() - mtime
    if age > self.stale_after_s:
      return f"the holder on {host} has not refreshed it for {age:.0f} s"
    return None

  def acquire(self) -> None:
    """Takes the lock, taking over a stale one; raises WorkdirLockedError if held."""
    workdir_lib.path(self.path).parent.mkdir(parents=True, exist_ok=True)
    self._token = uuid.uuid4().hex
    with self._guard():  # Read, judge and replace as one step.
      found = self.holder()
      reason = None
      if found is not None:
        info, mtime = found
        reason = self.stale_reason(info, mtime)
        if reason is None:
          since = info.get("since")
          since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(
              since if isinstance(since, (int, float)) else mtime))
          raise WorkdirLockedError(
              f"workdir {workdir_lib.path(self.path).parent} is in use by process {info['pid']} on host "
              f"{info['host']} (since {since}); wait for it to finish, stop it, or use another --workdir. "
              f"If that process is gone, delete {self.path}")
      self._write(self._info())
    if self.remote and not self._ours():  # Another run wrote its own lock in between.
      raise WorkdirLockedError(f"could not take the lock {self.path}; another run is starting in this workdir")
    if reason is not None:
      self._echo(f"Taking over the stale lock {self.path}: {reason}")
    self._held = True
    self._start_heartbeat()

  def _start_heartbeat(self) -> None:
    since = time.time()
    self._stop.clear()

    def beat():
      while not self._stop.wait(self.heartbeat_s):
        try:
          if not self._ours():
            return  # Taken over: the lock is another run's to refresh.
          if self.remote:
            self._write(self._info(since))
          else:
            os.utime(self.path)
        except (OSError, ConfigError):
          return
    self._thread = threading.Thread(target=beat, name="mile_jax-lock", daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Deletes the lock file if it is still this holder's (never another run's)."""
    if not self._held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5.0)
    with self._guard():
      found = self.holder()
      if found is not None and found[0].get("token") == self._token:
        workdir_lib.path(self.path).unlink(missing_ok=True)
      elif found is not None:
        logging.warning("Left %s in place: another run has taken it over", self.path)
    self._held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def reached_preemption_sync_point(step: int) -> bool:
  """JAX's preemption sync point; False in a single process or without the service."""
  if jax.process_count() == 1:
    return False
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # The preemption service is disabled.
    return False


class StopSignals:
  """While entered, SIGTERM and SIGINT ask the training loop to stop.

  The first signal sets `received` (its name); a second SIGINT raises
  KeyboardInterrupt as usual. The handler only records the signal: printing
  from it could interrupt a write to the same stream. `should_stop`, called
  from the loop, says that the run is stopping. Handlers are installed only in
  a single-process run on the main thread; a multi-process run relies on the
  preemption sync point (see `should_stop`), as JAX's preemption service
  catches SIGTERM.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, echo=print):
    self.received: str | None = None
    self._echo = echo
    self._announced = False
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.received is None:
      self.received = signal.Signals(signum).name

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def should_stop(self, step: int) -> bool:
    """Called after every step by every process, with the same `step`."""
    if reached_preemption_sync_point(step):
      self.received = self.received or "preemption notice"
    if self.received is not None and not self._announced:
      self._announced = True
      self._echo(f"Received {self.received}: stopping after the current step and saving a checkpoint")
    return self.received is not None


def drop_records_after(path: str, step: int) -> int:
  """Removes the records of `metrics.jsonl` at `path` logged after `step`.

  A run resumed from checkpoint `step` logs the later steps again; without
  this the file would hold both. Returns how many lines were dropped. The
  file is replaced atomically, so a kill during the rewrite loses nothing.
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except FileNotFoundError:
    return 0
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line cut short by a kill.
    if record.get("step", 0) <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  dropped = len(lines) - len(kept)
  if dropped:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    logging.info("Dropped %d records after step %d from %s", dropped, step, path)
  return dropped

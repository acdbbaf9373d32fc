"""Surviving faults: one run per workdir, stopping cleanly on a signal, trimming logs on resume.

- `WorkdirLock`: `<workdir>/lock` names the process that uses the workdir; a
  second run refuses to start, a lock left by a dead process is taken over.
  On a filesystem, taking (or taking over) and releasing happen under an
  exclusive `flock` of `<workdir>/lock.guard`, so two runs cannot both take
  it. On an object store (gs://) every write of the lock is conditional on
  the object's generation (GCS `ifGenerationMatch`, through TensorStore):
  taking it creates the object only if it does not exist, taking over a
  stale one replaces only the generation judged stale, the heartbeat and the
  release touch only the generation this run wrote, so of two runs starting
  together one takes it and the other is refused.
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
  A lock is stale when its heartbeat (the file's mtime, or on an object
  store its `beat` time, refreshed every `heartbeat_s` by a daemon thread) is
  older than `stale_after_s`, whoever holds its pid now (a pid is reused
  after a restart), or, sooner, when its holder is on this host and no
  longer alive.
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
    self._generation = None  # On an object store: the lock object's generation last read or written.

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

  def _write(self, info: dict | None) -> bool:
    """Replaces the lock file with `info` (None: deletes it), atomically on a
    filesystem. On an object store only if the object is still at the
    generation last read or written; False when it is not (another run wrote it)."""
    if self.remote:
      store = workdir_lib.kvstore(workdir_lib.path(self.path).parent.as_posix())
      value = None if info is None else json.dumps(info).encode("utf-8")
      written = store.write(LOCK_NAME, value, if_equal=self._generation).result().generation
      if not written:  # TensorStore's answer to a failed condition: an unknown generation.
        return False
      self._generation = written
      return True
    if info is None:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      return True
    tmp = f"{self.path}.tmp-{self._token}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(info, f)
    os.replace(tmp, self.path)
    return True

  def holder(self) -> tuple[dict, float] | None:
    """(the lock file's JSON, its mtime), or None when there is no lock.

    A lock file that is not UTF-8 JSON (written half by a killed process, or
    damaged) gives {}: no holder to respect, so it is stale.

    Raises:
      ConfigError: the lock's path cannot be read as a file (a directory, no permission).
    """
    try:
      if self.remote:
        found = workdir_lib.kvstore(workdir_lib.path(self.path).parent.as_posix()).read(LOCK_NAME).result()
        self._generation = found.stamp.generation
        if found.state != "value":
          return None
        data, mtime = found.value, None
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
    age = time.time() - mtime
    if age > self.stale_after_s:  # Whoever has the pid now: pids are reused after a restart.
      return f"the holder, process {pid} on {host}, has not refreshed it for {age:.0f} s"
    if host == socket.gethostname():
      if pid == os.getpid():  # A process before this one had our pid (a restarted container).
        return f"process {pid} on {host} is gone"
      return None if _pid_alive(pid) else f"process {pid} on {host} is gone"
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
      if not self._write(self._info()):  # Another run wrote the lock since it was read.
        raise WorkdirLockedError(f"could not take the lock {self.path}: another run took it at the same moment; "
                                 f"wait for it to finish, stop it, or use another --workdir")
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
          if self.remote:
            if not self._write(self._info(since)):
              return  # Taken over: the lock is another run's to refresh.
          elif not self._ours():
            return
          else:
            os.utime(self.path)
        except (OSError, ValueError, ConfigError):
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
      if self.remote:
        released = self._write(None)
      else:
        found = self.holder()
        released = found is None or found[0].get("token") == self._token
        if found is not None and released:
          os.remove(self.path)
      if not released:
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

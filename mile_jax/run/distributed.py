"""Joining a multi-process run through JAX's own runtime (`jax.distributed`).

Every host (a TPU VM worker, a GPU node or a SLURM task) runs the same
train.py, and `initialize(config.distributed)` runs before anything touches a
device. How the processes find each other, the first that applies wins:

1. explicit: `distributed.coordinator_address`, `distributed.num_processes`
   and `distributed.process_id` (config flags), each falling back to
   $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and $JAX_PROCESS_ID;
2. SLURM: `srun` gives every task SLURM_* variables, which JAX reads (one
   process per GPU: JAX gives task `SLURM_LOCALID` that one local GPU);
3. a Cloud TPU VM: JAX reads the slice's workers from the VM's metadata;
4. otherwise one process: nothing to do.

On CPU, processes exchange data through gloo, JAX's default
`jax_cpu_collectives_implementation`.

A process that stops on an error (a failed save, a bad config) says so through
the coordination service's key-value store (`announce_failure`), and every
other process, watching for it (`FailureWatch`), stops within a second with
that one line, instead of waiting in its next collective until a timeout.
"""

import dataclasses
import glob
import importlib.util
import os
import sys
import threading
from typing import Any, Mapping

import jax
import tqdm

from mile_jax import config_lib

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the run; the three values are None unless explicit."""
  method: str  # "explicit", "slurm", "tpu_vm" or "single".
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def on_cloud_tpu_vm() -> bool:
  """libtpu is installed and the host has TPU chips (as JAX checks before using the metadata)."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _int_setting(value: Any, env_value: str | None, setting: str, env: str, unset: int) -> int | None:
  if value != unset:
    return int(value)
  if env_value in (None, ""):
    return None
  try:
    return int(env_value)
  except ValueError:
    raise config_lib.ConfigError(f"{setting}: ${env}={env_value!r} is not an integer") from None


def resolve(dist_config: Any, environ: Mapping[str, str], tpu_vm: bool = False) -> Launch:
  """Decides how to join the run from `config.distributed` and the environment.

  Pure: nothing is initialised. Raises ConfigError naming the setting when
  explicit values are incomplete or inconsistent.
  """
  address = dist_config.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "")
  count = _int_setting(dist_config.num_processes, environ.get("JAX_NUM_PROCESSES"),
                       "distributed.num_processes", "JAX_NUM_PROCESSES", unset=0)
  index = _int_setting(dist_config.process_id, environ.get("JAX_PROCESS_ID"),
                       "distributed.process_id", "JAX_PROCESS_ID", unset=-1)
  if address or count is not None or index is not None:
    missing = [name for name, value in (("coordinator_address", address or None), ("num_processes", count),
                                        ("process_id", index)) if value is None]
    if missing:
      env = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
             "process_id": "JAX_PROCESS_ID"}[missing[0]]
      raise config_lib.ConfigError(
          f"distributed.{missing[0]}: must be set (or ${env}) when the other distributed settings are")
    if count < 1:
      raise config_lib.ConfigError(f"distributed.num_processes: must be a positive integer, got {count}")
    if not 0 <= index < count:
      raise config_lib.ConfigError(f"distributed.process_id: must be in [0, {count}), got {index}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise config_lib.ConfigError(f"distributed.coordinator_address: must be host:port, got {address!r}")
    if count == 1:
      return Launch("single", address, count, index)
    return Launch("explicit", address, count, index)
  if all(v in environ for v in _SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
    return Launch("slurm")
  if tpu_vm:
    return Launch("tpu_vm")
  return Launch("single")


def initialize(dist_config: Any, environ: Mapping[str, str] | None = None) -> Launch:
  """Joins the multi-process run this process belongs to; a no-op when alone.

  Call once per process, before the first use of a device. Returns how the
  process joined; afterwards `jax.process_index()` and `jax.process_count()`
  describe the run.
  """
  environ = os.environ if environ is None else environ
  launch = resolve(dist_config, environ)
  if launch == Launch("single") and on_cloud_tpu_vm():
    launch = resolve(dist_config, environ, tpu_vm=True)
  if launch.method == "single" or jax.distributed.is_initialized():
    return launch
  if launch.method == "explicit":
    jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                               num_processes=launch.num_processes, process_id=launch.process_id)
  else:
    jax.distributed.initialize()
  return launch



FAILURE_KEY = "mile_jax/failed"


def _client():
  """The coordination service's client of this process, or None when alone."""
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.client


def announce_failure(message: str) -> None:
  """Tells every process of the run that this one is stopping with `message`
  (a no-op alone), so that they stop too instead of waiting in the next
  collective or barrier for a process that is gone (`FailureWatch`)."""
  client = _client()
  if client is None:
    return
  try:
    client.key_value_set(FAILURE_KEY, f"process {jax.process_index()}: {message}")
  except Exception:  # pylint: disable=broad-except  # The service may be gone already.
    pass


class FailureWatch:
  """While entered in a multi-process run, a daemon thread waits for another
  process's `announce_failure` and then ends this process at once, printing
  `Training stopped: process N: <its message>` (exit status 1): this process
  may be blocked in a collective that can never complete, where no exception
  could reach it. The coordination service going away (process 0 ended) also
  stops it, with a line that says so.
  """

  POLL_MS = 1000

  def __init__(self, stream=None):
    self._stream = stream
    self._closing = threading.Event()
    self._thread = None

  def __enter__(self):
    client = _client()
    if client is not None:
      self._thread = threading.Thread(target=self._watch, args=(client,), name="mile_jax-failures", daemon=True)
      self._thread.start()
    return self

  def _watch(self, client) -> None:
    while not self._closing.is_set():
      try:
        message = client.blocking_key_value_get(FAILURE_KEY, self.POLL_MS)
      except Exception as e:  # pylint: disable=broad-except
        if self._closing.is_set():
          return
        if "DEADLINE_EXCEEDED" in str(e):
          continue
        self._stop(f"lost the run's coordination service ({str(e).splitlines()[0][:200]}); process 0 has "
                   f"probably stopped: see its output")
        return
      if not self._closing.is_set():
        self._stop(message)
      return

  def _stop(self, message: str) -> None:
    stream = self._stream or sys.stderr
    tqdm.tqdm.write(f"Training stopped: {message}", file=stream)  # On a line of its own below the progress bar.
    stream.flush()
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access  # The main thread may never return from a collective.

  def __exit__(self, *exc):
    self._closing.set()
    if self._thread is not None:
      self._thread.join(timeout=2 * self.POLL_MS / 1000)

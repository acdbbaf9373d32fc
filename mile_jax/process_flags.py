"""How a command-line program (eval.py, `python -m mile_jax.hf`) joins a multi-process run.

    --coordinator_address HOST:PORT --num_processes N --process_id I

Each falls back to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and
$JAX_PROCESS_ID, then to SLURM's variables or a Cloud TPU VM's metadata,
exactly as train.py's `distributed` settings do (`run.distributed`, which
does the joining); with none of them the program runs as one process.
"""

from absl import flags
import ml_collections

from mile_jax.errors import ConfigError
from mile_jax.run import distributed

_HOLDERS: dict[str, flags.FlagHolder] = {}


def define_flags(module_name: str) -> None:
  """Defines the three flags once per program, shown by `--help` as `module_name`'s own."""
  if _HOLDERS:
    return
  _HOLDERS.update(
      coordinator_address=flags.DEFINE_string(
          "coordinator_address", "", "Multi-process: host:port of process 0's coordinator; "
          "'' = $JAX_COORDINATOR_ADDRESS or one process.", module_name=module_name),
      num_processes=flags.DEFINE_integer("num_processes", 0, "Multi-process: how many; 0 = $JAX_NUM_PROCESSES.",
                                         module_name=module_name),
      process_id=flags.DEFINE_integer("process_id", -1, "Multi-process: this one's index; -1 = $JAX_PROCESS_ID.",
                                      module_name=module_name))


def join() -> distributed.Launch:
  """Joins the run the flags (or $JAX_*, SLURM, a TPU VM) describe; a no-op
  when alone. Call before the first use of a device.

  Raises:
    ConfigError: naming the flag to fix (`--num_processes: ...`).
  """
  settings = ml_collections.ConfigDict({name: holder.value for name, holder in _HOLDERS.items()})
  try:
    return distributed.initialize(settings)
  except ConfigError as e:
    raise ConfigError(str(e).replace("distributed.", "--", 1)) from None

"""The training command: `mile-train` or `python train.py`.

    mile-train --config configs/default.py --workdir DIR

`--config` is a config file, or the name of a config bundled with the package
(`default`, `mile_468m`, `mile_1b`, `mile_7b`; also written `default.py` or
`configs/default.py`) when no file of that name exists, so the same command
works in a checkout and in any directory after `pip install`. Any config field
can be overridden, e.g. `--config.loss.name=cross_entropy`.
Run again with the same workdir to resume from its latest checkpoint.
SIGTERM or Ctrl-C stops after the current step with a checkpoint (exit 0).

Exit status: 0 done (also when the workdir is already trained to train.steps:
then nothing is written) or stopped by a signal; 1 the run failed (non-finite
loss, a failed save, no readable checkpoint); 2 it could not start (a bad
config, override or workdir, train.steps below the workdir's checkpoint, or
the workdir in use by another run), with one line on stderr.
"""

import os
import sys

from mile_jax import requirements_check
requirements_check.require()  # Before the imports below: a missing package is one line, not a traceback.
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mile_jax import config_files
from mile_jax import train_lib
from mile_jax.errors import ConfigError
from mile_jax.run import checkpoint
from mile_jax.run import distributed
from mile_jax.run import faults

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, or the name of a bundled config (default, mile_468m, mile_1b, mile_7b).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _exit(prefix: str, message: str, status: int):
  print(f"{prefix}: {message}", file=sys.stderr)
  distributed.announce_failure(f"{prefix}: {message}")
  sys.exit(status)


def parse_flags(argv):
  """absl's flag parsing, where any failure to build the config is one line and exit 2."""
  hint = f", and no bundled config of that name ({', '.join(config_files.bundled())})"
  return config_files.exiting_parser(hint)(config_files.resolve_argv(argv))


def main(argv):
  if len(argv) > 1:
    _exit("Config error", f"unexpected arguments {argv[1:]}; settings are given as --config.<name>=<value>", 2)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    config = _CONFIG.value
    dist_config = config.distributed
  except OSError as e:  # config_flags defers an OSError raised while loading the file.
    cause = e.__cause__ or e
    _exit("Config error", f"--config: {config_files.config_path(sys.argv)} raised {type(cause).__name__}: "
          f"{str(cause).splitlines()[0]}", 2)
  try:
    distributed.initialize(dist_config)  # Before any device is touched.
    with distributed.FailureWatch():
      train_lib.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as e:
    _exit("Config error", str(e), 2)
  except faults.WorkdirLockedError as e:
    _exit("Workdir locked", str(e), 2)
  except faults.NonFiniteError as e:
    _exit("Training stopped", str(e), 1)
  except checkpoint.CheckpointError as e:
    print(f"Checkpoint error: {e}", file=sys.stderr)
    distributed.announce_failure(f"Checkpoint error: {e}")
    sys.stdout.flush()
    sys.stderr.flush()
    # Orbax threads of a failed save may wait minutes for signals that never come: leave without joining them.
    os._exit(1)
  except BaseException as e:
    distributed.announce_failure(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    raise


def run():
  """The `mile-train` console script (and what `python train.py` runs)."""
  config_files.present_as_main(__name__, __doc__)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()

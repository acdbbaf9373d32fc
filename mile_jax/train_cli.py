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
import traceback
import types

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
  sys.exit(status)


def _config_path(argv) -> str | None:
  """The file named by --config (without a `:argument` suffix), if given."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1].split(":", 1)[0]
  return None


def _raised_in(error: BaseException, path: str) -> str:
  """`path line N` for the deepest frame of `error`'s traceback inside the config file."""
  if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == path:
    return f"{error.filename} line {error.lineno}"
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == path]
  return f"{path} line {lines[-1]}" if lines else path


def _in_file(error: BaseException, path: str) -> bool:
  """Whether `error` was raised while running code of the file at `path`."""
  return any(os.path.abspath(frame.filename) == os.path.abspath(path)
             for frame in traceback.extract_tb(error.__traceback__))


def describe_flag_error(error: BaseException, argv) -> str:
  """One line for a failure to build the config from the command line."""
  path = _config_path(argv)
  if (isinstance(error, AttributeError) and getattr(error, "name", None) == "get_config"
      and isinstance(getattr(error, "obj", None), types.ModuleType)):
    return (f"--config: {path} has no get_config() function; a config file defines get_config() returning "
            f"the config (see configs/default.py)")
  if isinstance(error, (KeyError, AttributeError)) and not (path and _in_file(error, path)):
    # An override of a setting the config does not have: ml_collections names only the last part.
    while isinstance(error, (KeyError, AttributeError)) and error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]
    text = str(error.args[0] if error.args else error)
    missing, _, hint = text.partition("\n")
    missing = missing.strip("\"'")
    hint = f" ({hint.strip()})" if hint.strip() else ""
    for arg in argv:
      name = arg.split("=", 1)[0]
      if name.startswith("--config.") and missing in name.split(".")[1:]:
        return f"{name}: no such setting in {path}{hint}"
    return f"no such setting {missing!r} in {path}{hint}"
  if isinstance(error, flags.Error):
    text = str(error)
    if "Error whilst parsing config file" in text:  # config_flags wraps TypeError/ValueError.
      return f"--config: {path} raised {text.strip().splitlines()[-1]}"
    return text.splitlines()[0]
  where = _raised_in(error, os.path.abspath(path)) if path else "the config file"
  first = str(error).splitlines()[0] if str(error) else ""
  return f"--config: {where} raised {type(error).__name__}: {first}"


def parse_flags(argv):
  """absl's flag parsing, where any failure to build the config is one line and exit 2."""
  argv = config_files.resolve_argv(argv)
  path = _config_path(argv)
  if path is not None and os.path.isdir(path):
    _exit("Config error", f"--config: {path!r} is a directory; name a config file, e.g. configs/default.py", 2)
  if path is not None and not os.path.isfile(path):
    _exit("Config error", f"--config: no such file {path!r}, and no bundled config of that name "
          f"({', '.join(config_files.bundled())})", 2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    _exit("Config error", describe_flag_error(e, argv), 2)


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
    _exit("Config error", f"--config: {_config_path(sys.argv)} raised {type(cause).__name__}: "
          f"{str(cause).splitlines()[0]}", 2)
  try:
    distributed.initialize(dist_config)  # Before any device is touched.
    train_lib.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as e:
    _exit("Config error", str(e), 2)
  except faults.WorkdirLockedError as e:
    _exit("Workdir locked", str(e), 2)
  except faults.NonFiniteError as e:
    _exit("Training stopped", str(e), 1)
  except checkpoint.CheckpointError as e:
    print(f"Checkpoint error: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Orbax threads of a failed save may wait minutes for signals that never come: leave without joining them.
    os._exit(1)


def run():
  """The `mile-train` console script (and what `python train.py` runs)."""
  # --help shows the main module's docstring and key flags: this module's, whichever script started it.
  sys.modules["__main__"].__doc__ = __doc__
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()

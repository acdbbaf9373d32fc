"""Config files: the bundled ones and how `--config` finds them.

The repository's configs/ is installed with the package as `mile_jax.configs`,
so a bundled config can be named on the command line (`--config default`)
from any directory; a path to a file still works and wins when it exists.
"""

import importlib.util
import os
import re
import sys
import traceback
import types

from absl import flags as absl_flags

from mile_jax.errors import ConfigError

# configs/compare.py configures `python -m mile_jax.experiments.compare`, not one training run.
_NOT_TRAINING_CONFIGS = ("__init__", "compare")


def bundled_dir() -> str:
  """The directory of the bundled config files: the repository's configs/,
  installed as the package `mile_jax.configs`."""
  spec = importlib.util.find_spec("mile_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def bundled() -> list[str]:
  """Names of the bundled training configs, e.g. ['default', 'mile_1b', 'mile_468m', 'mile_7b']."""
  folder = bundled_dir()
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(name[:-3] for name in names if name.endswith(".py") and name[:-3] not in _NOT_TRAINING_CONFIGS)


def resolve(value: str) -> str:
  """`--config`'s value, with a bundled config's name (`default`, `default.py`
  or `configs/default.py`) replaced by that file's path when no file of that
  name exists here; a `:argument` suffix is kept; anything else unchanged."""
  path, colon, argument = value.partition(":")
  if os.path.exists(path):
    return value
  folder, name = os.path.split(path)
  stem = name[:-3] if name.endswith(".py") else name
  if folder in ("", "configs") and stem in bundled():
    return os.path.join(bundled_dir(), f"{stem}.py") + colon + argument
  return value


def resolve_argv(argv: list[str]) -> list[str]:
  """`argv` with the value of `--config` (either form) passed through `resolve`."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      argv[i + 1] = resolve(argv[i + 1])
    elif arg.startswith(("--config=", "-config=")):
      name, value = arg.split("=", 1)
      argv[i] = f"{name}={resolve(value)}"
  return argv


def config_path(argv) -> str | None:
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
  path = config_path(argv)
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  error = chain[0]
  for e in chain:
    if isinstance(e, ConfigError):  # Raised by the config file's get_config: its message is the line.
      text = str(e).strip()
      if text.startswith("Error whilst parsing config file"):  # config_flags re-raised it with the traceback.
        text = re.sub(r"^[\w.]*ConfigError: ", "", text.splitlines()[-1])
      return text.splitlines()[0]
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
  if isinstance(error, absl_flags.Error):
    text = str(error)
    if "Error whilst parsing config file" in text:  # config_flags wraps TypeError/ValueError.
      return f"--config: {path} raised {text.strip().splitlines()[-1]}"
    return text.splitlines()[0]
  where = _raised_in(error, os.path.abspath(path)) if path else "the config file"
  first = str(error).splitlines()[0] if str(error) else ""
  return f"--config: {where} raised {type(error).__name__}: {first}"


def parse_config_flags(argv, flag_values=None, missing_hint: str = ""):
  """absl's parsing of `argv` into `flag_values` (absl's FLAGS), where a missing config file or any
  failure to build the config (a misspelt override, an error in the file) raises ConfigError, one line.

  `missing_hint` ends the message for a config file that does not exist.
  """
  flag_values = absl_flags.FLAGS if flag_values is None else flag_values
  path = config_path(argv)
  if path is not None and os.path.isdir(path):
    raise ConfigError(f"--config: {path!r} is a directory; name a config file, e.g. configs/default.py")
  if path is not None and not os.path.isfile(path):
    raise ConfigError(f"--config: no such file {path!r}{missing_hint}")
  try:
    return flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(describe_flag_error(e, argv)) from None


def exiting_parser(missing_hint: str = ""):
  """A `flags_parser` for `absl.app.run`: `parse_config_flags`, with its ConfigError printed as
  `Config error: ...` on stderr and exit status 2."""
  def parse(argv):
    try:
      return parse_config_flags(argv, missing_hint=missing_hint)
    except ConfigError as e:
      print(f"Config error: {e}", file=sys.stderr)
      sys.exit(2)
  return parse


def present_as_main(module_name: str, doc: str) -> None:
  """Makes --help show `doc` and the key flags of `module_name`, whichever script
  (train.py, a console script, python -m) started the program."""
  sys.modules["__main__"].__doc__ = doc
  for flag in absl_flags.FLAGS.get_key_flags_for_module(module_name):
    absl_flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

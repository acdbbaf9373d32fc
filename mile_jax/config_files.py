"""Config files: the bundled ones and how `--config` finds them.

The repository's configs/ is installed with the package as `mile_jax.configs`,
so a bundled config can be named on the command line (`--config default`)
from any directory; a path to a file still works and wins when it exists.
"""

import importlib.util
import os

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

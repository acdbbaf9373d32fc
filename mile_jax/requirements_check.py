"""One line instead of a traceback when a package a command needs is not installed.

Every command (`train.py`, `eval.py`, `mile-train`, `mile-eval`, `python -m
mile_jax.hf|plan|experiments.compare`) calls `require()` before its other
imports: the packages its modules import when they load are imported here
first, inside a `try`, so that a missing one (or a missing dependency of one)
ends the command with

    mile_jax needs jax: pip install -r requirements.txt (or pip install -e .)

on stderr and exit status 2, instead of a `ModuleNotFoundError` traceback
from deep inside the first module that needed it. Packages of the `eval`
extra (Hugging Face interop, lm-evaluation-harness) name
`pip install -e ".[eval]"` instead. The standard library only, so that this
module itself always imports.
"""

import importlib
import sys
from typing import NoReturn

# The packages mile_jax's command modules import when they load, lowest first (a command's
# extras, e.g. plotting, are passed to `require`).
BASE = ("numpy", "absl", "ml_collections", "tqdm", "jax", "flax", "optax", "orbax.checkpoint", "sentencepiece")
# Top-level import names of the `eval` extra (pyproject.toml, requirements-eval.txt).
EVAL_EXTRA = frozenset({"torch", "transformers", "tokenizers", "safetensors", "accelerate", "lm_eval"})
# pip's name where it differs from the import name.
PIP_NAMES = {"absl": "absl-py", "orbax": "orbax-checkpoint", "lm_eval": "lm-eval",
             "tensorflow_datasets": "tensorflow-datasets", "yaml": "pyyaml"}
BASE_INSTALL = "pip install -r requirements.txt (or pip install -e .)"
EVAL_INSTALL = 'pip install -e ".[eval]"'


def install_hint(package: str) -> str:
  """`<pip name>: <command that installs it>` for a top-level import name."""
  top = package.split(".")[0]
  return f"{PIP_NAMES.get(top, top)}: {EVAL_INSTALL if top in EVAL_EXTRA else BASE_INSTALL}"


def message(error: ImportError, importing: str) -> str | None:
  """The one line for `error`, raised while importing the module `importing`; None when the
  module that failed is mile_jax's own (a bug, not an installation)."""
  name = error.name or importing  # jax raises a bare ModuleNotFoundError when jaxlib is missing.
  if name.split(".")[0] == "mile_jax":
    return None
  return f"mile_jax needs {install_hint(name)}"


def exit_missing(error: ImportError, importing: str) -> NoReturn:
  """Prints `message` to stderr and exits 2; re-raises `error` when it is not a missing package."""
  line = message(error, importing)
  if line is None:
    raise error
  print(line, file=sys.stderr)
  sys.exit(2)


def require(*extra: str) -> None:
  """Imports `BASE` and `extra` (module names); the first that fails ends the process via `exit_missing`."""
  for module in BASE + extra:
    try:
      importlib.import_module(module)
    except ImportError as e:
      exit_missing(e, module)

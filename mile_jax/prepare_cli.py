"""The ``mile-prepare`` console script: ``python -m mile_jax.data.prepare`` behind the missing-package check.

A module of its own, outside ``mile_jax.data``: importing that package loads
the packages the check is about, so the check must run before it.
"""

import sys

from mile_jax import requirements_check
requirements_check.require("tensorstore")  # Before the imports below: a missing package is one line, not a traceback.

from mile_jax.data.prepare import __main__ as prepare_main  # noqa: E402


def run():
  """The ``mile-prepare`` console script; exit status as ``python -m mile_jax.data.prepare``'s."""
  sys.exit(prepare_main.main())

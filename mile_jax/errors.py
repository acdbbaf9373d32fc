"""The error for input the user must fix, at the bottom of the package.

Every layer (config validation, data, checkpoints, the training loop) raises
`ConfigError` with one line that names the setting or file to change, and
train.py prints it as `Config error: ...` and exits 2. It lives here, below
all of them and importing nothing, so that raising it never makes a lower
module import a higher one.
"""


class ConfigError(ValueError):
  """A setting, flag or input file that cannot work; the message names it."""

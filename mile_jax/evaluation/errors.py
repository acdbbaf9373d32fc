"""The one exception evaluation raises for a setting or file the user must fix."""

from mile_jax.config_lib import ConfigError


class EvalError(ConfigError):
  """A flag, file or checkpoint that cannot work; the message names it."""

"""The paper's 1.2B model with MiLe loss (gamma 1, sigma 1).

Set the corpus and tokenizer for a real run, e.g.
--config.data.source=... --config.data.tokenizer_path=/path/to/llama/tokenizer.model
"""

from mile_jax import config_lib


def get_config():
  return config_lib.paper_config("1b")

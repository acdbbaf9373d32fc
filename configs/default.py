"""Tiny LLaMA-style model with MiLe loss on the built-in corpus; runs on one CPU.

About 1.3M parameters (4 layers, d_model 128, vocabulary 1024); 300 steps of
16 x 128 tokens.
"""

from mile_jax import config_lib


def get_config():
  return config_lib.base_config()

"""mile_jax: pretraining decoder language models with MiLe loss in JAX."""

__version__ = "0.1.0"

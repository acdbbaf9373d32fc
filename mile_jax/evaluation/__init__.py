"""Evaluation of saved checkpoints: perplexity, frequency buckets, benchmark tasks."""

from mile_jax.evaluation.errors import EvalError

__all__ = ["EvalError"]

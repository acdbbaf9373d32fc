"""Evaluates checkpoints: `python eval.py --workdir DIR --tasks ppl,buckets,piqa`.

The same command as `mile-eval` once the package is installed; tasks and flags
are documented in mile_jax/eval_cli.py.
"""

from mile_jax import eval_cli

if __name__ == "__main__":
  eval_cli.run()

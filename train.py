"""Trains a decoder LM: `python train.py --config configs/default.py --workdir DIR`.

The same command as `mile-train` once the package is installed; flags, exit
statuses and behaviour are documented in mile_jax/train_cli.py.
"""

from mile_jax import train_cli

if __name__ == "__main__":
  train_cli.run()

"""The loss comparison: cross-entropy, focal (gamma 1), MiLe (gamma 1) and a MiLe gamma sweep, 3 seeds.

    python -m mile_jax.experiments.compare --config configs/compare.py --workdir /tmp/compare
    python -m mile_jax.experiments.compare --config configs/compare.py --workdir /tmp/compare_zipf \\
        --config.run.data.source=synthetic:zipf
    python -m mile_jax.experiments.compare --config configs/compare.py:468m --workdir gs://.../compare

The optional argument after ':' picks the model size: tiny (default, a 2-core
CPU), or one of the paper's sizes (468m, 1b, 7b) for accelerators.
"""

import ml_collections

from mile_jax import config_lib


def get_config(scale: str = "tiny"):
  c = ml_collections.ConfigDict()
  if scale == "tiny":
    run = config_lib.base_config()
    run.train.update(steps=200, log_every=50, eval_every=50, eval_batches=8)
    run.optim.warmup_steps = 20
  else:
    run = config_lib.paper_config(scale)
  run.checkpoint.update(every_steps=max(run.train.steps // 4, 1), max_to_keep=1000)
  c.run = run  # The training config shared by every run; only seed and loss change.
  c.losses = ("cross_entropy", "focal:1.0", "mile:1.0")  # name[:gamma] per baseline.
  c.mile_gammas = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # MiLe's gamma sweep (sigma = run.loss.sigma).
  c.seeds = (0, 1, 2)  # Each seed fixes initialisation and data order for every loss.
  c.eval_batches = 16  # Validation batches measured at every checkpoint.
  c.bucket_high = 0.8  # Frequency buckets: the most frequent ids covering this share are "high"...
  c.bucket_low = 0.05  # ...and the rarest ids covering at most this share are "low".
  return c

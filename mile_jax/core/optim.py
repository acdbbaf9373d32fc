"""AdamW with a warm-up + cosine learning-rate schedule and global-norm clipping."""

from typing import Any

import jax
import optax


def make_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `optim.learning_rate`, then cosine decay to
  `optim.learning_rate * optim.final_lr_ratio` at `total_steps`."""
  peak = optim_config.learning_rate
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=optim_config.warmup_steps,
      decay_steps=max(total_steps, optim_config.warmup_steps + 1),
      end_value=peak * optim_config.final_lr_ratio)


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: norms' scales (1-D) are left alone."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule) from `config.optim`."""
  schedule = make_schedule(optim_config, total_steps)
  tx = optax.chain(
      (optax.clip_by_global_norm(optim_config.grad_clip_norm) if optim_config.grad_clip_norm > 0
       else optax.identity()),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay, mask=decay_mask),
  )
  return tx, schedule

"""AdamW with a warm-up + cosine learning-rate schedule and global-norm clipping."""

from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
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


def _depends_on_inputs(jaxpr) -> list[bool]:
  """For each output of `jaxpr`, whether any input value reaches it (a sub-computation
  that takes an input counts as using it)."""
  reached = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jex_core.Literal) and v in reached for v in eqn.invars):
      reached.update(eqn.outvars)
  return [not isinstance(v, jex_core.Literal) and v in reached for v in jaxpr.outvars]


def fresh_state_arrays(tx: optax.GradientTransformation, abstract_params: Any):
  """A function `(indices, shardings) -> [jax.Array]` giving leaves `indices` (positions in
  `jax.tree.leaves(tx.init(params))`) of a fresh optimizer state, each placed with its
  sharding, without making the parameters or the rest of the state: only what was asked for
  is computed. Holds for optimizers whose fresh state does not depend on the parameters'
  values (AdamW's: zero moments and counts), which is checked on `tx.init`'s program.

  Raises:
    ValueError: `tx.init` reads the parameters' values.
  """
  program = jax.make_jaxpr(tx.init)(abstract_params)
  if any(_depends_on_inputs(program.jaxpr)):
    raise ValueError("the optimizer's fresh state depends on the parameters' values; it cannot be made "
                     "apart from them")

  def fresh_state():
    return tx.init(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params))

  def arrays(indices, shardings):
    def select():
      leaves = jax.tree.leaves(fresh_state())
      return [leaves[i] for i in indices]
    return jax.jit(select, out_shardings=list(shardings))()
  return arrays

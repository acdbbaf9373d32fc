"""The train state and the pure, jitted-once step functions.

- `train_step(state, batch) -> (state, metric sums)`: one optimizer step on a
  global batch, with micro-batches folded in a scan and MiLe's normaliser
  taken over the whole batch.
- `eval_step(params, batch) -> loss sums`, in the train step's micro-batches.
- `host_metrics`: summed metrics -> per-token and per-step means on the host.
The training loop that calls them is `train_lib.Trainer`.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mile_jax.core import fused_loss
from mile_jax.core import losses
from mile_jax.core import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  opt_state: Any


def _boxed_init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  """rng -> TrainState whose parameter leaves carry logical-axis boxes."""
  def init(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def state_shardings(model, tx, mesh, rules, seq_len: int):
  """(abstract unboxed TrainState, its NamedShardings) without allocating."""
  boxed = jax.eval_shape(_boxed_init_fn(model, tx, seq_len), jax.random.key(0))
  return nn.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules)


def init_state(model, tx, mesh, rules, seq_len: int, seed: int) -> TrainState:
  """A freshly initialised TrainState placed directly with its shardings."""
  _, shardings = state_shardings(model, tx, mesh, rules, seq_len)
  init = _boxed_init_fn(model, tx, seq_len)
  with sharding.mesh_context(mesh, sharding.rules_tuple(rules)):
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.key(seed))


def _microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
  """(B, ...) -> (count, B/count, ...), micro-batch k taking rows k, k+count, ...

  Striding keeps every micro-batch spread over all data-parallel devices.
  """
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1),
                      batch)


def _fold_microbatches(fn, batch: dict[str, jax.Array], count: int, combine):
  """`fn` of each of `count` strided micro-batches of `batch`, folded with
  `combine(total, new)` in a scan; `fn(batch)` when `count` is 1.

  The scan starts from zeros, which `combine` must take as its identity (sums
  add; `weight_max` is a maximum of non-negative weights), so that `fn` is
  traced once: the step's program holds each layer's computation once
  whatever the number of micro-batches.
  """
  if count == 1:
    return fn(batch)
  mbs = _microbatches(batch, count)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], mbs))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(lambda t, mb: (combine(t, fn(mb)), None), zeros, mbs)
  return total


def loss_sums_fn(params, batch, *, model: nn.Module, loss_config: Any) -> dict[str, jax.Array]:
  """The loss sums (see `losses.loss_sums`) of one batch under `params`.

  `loss_config.impl`: "naive" computes the logits then the loss; "chunked"
  applies the unembedding blockwise inside `fused_loss.chunked_loss_sums`.
  """
  chunked = loss_config.impl == "chunked"
  out = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                    segment_ids=batch.get("segment_ids"), return_hidden=chunked)
  if not chunked:
    return losses.loss_sums(loss_config.name, out, batch["targets"], batch["mask"],
                            gamma=loss_config.gamma, sigma=loss_config.sigma)
  # The parameter's sharding: under FSDP the loss splits the vocabulary over fsdp instead of gathering the kernel.
  kernel_shardings = (nn.logical_to_mesh_axes((None, "activation_vocab")), nn.logical_to_mesh_axes(("embed", "vocab")))
  return fused_loss.chunked_loss_sums(
      loss_config.name, out, params["lm_head"]["kernel"], batch["targets"], batch["mask"], gamma=loss_config.gamma,
      sigma=loss_config.sigma, block_size=loss_config.block_size,
      vocab_block_size=loss_config.vocab_block_size, dtype=model.cfg.compute_dtype,
      shard_axes=sharding.BATCH_AXES, kernel_shardings=kernel_shardings)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, loss_config: Any,
               microbatches: int, skip_nonfinite: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch {inputs, targets, mask}: (B, T) each.

  With micro-batches, gradients of the loss numerator are summed over
  micro-batches and divided once by the global denominator, so the step is
  exactly the full-batch step (MiLe's normaliser included).
  Returns the new state and metric sums (normalised on the host), with
  `nonfinite_steps` 1.0 when the loss or a gradient is not finite. With
  `skip_nonfinite` such an update is not applied (params and optimizer state,
  its count included, stay as they were; `step` still advances past the batch)
  and the step's sums are zeroed so that logged means cover the good steps.
  `learning_rate_sum` is the rate this update applies: the schedule at the
  optimizer's count of applied updates, which skipped steps do not advance.
  """
  def numerator(params, mb):
    sums = loss_sums_fn(params, mb, model=model, loss_config=loss_config)
    return sums["loss_numerator"], sums

  def grads_and_sums(mb):
    # Tied to the micro-batch, the parameters' FSDP all-gathers stay inside the micro-batch loop:
    # hoisted out of it, every layer's gathered weights would live for the whole step.
    params, mb = jax.lax.optimization_barrier((state.params, mb))
    return jax.grad(numerator, has_aux=True)(params, mb)

  def add(total, new):
    return jax.tree.map(jnp.add, total[0], new[0]), losses.combine_sums(total[1], new[1])
  grads, sums = _fold_microbatches(grads_and_sums, batch, microbatches, add)

  denominator = sums["loss_denominator"]
  scale = losses.safe_divide(1.0, denominator)
  grads = jax.tree.map(lambda g: g * scale, grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  # The global gradient norm is non-finite iff some gradient element is.
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(sums["loss_numerator"]) & jnp.isfinite(denominator)
  out = dict(sums, grad_norm_sum=grad_norm, learning_rate_sum=schedule(applied_updates(state.opt_state, state.step)),
             steps=jnp.ones(()))
  if skip_nonfinite:
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = new_state.replace(params=jax.tree.map(keep, params, state.params),
                                  opt_state=jax.tree.map(keep, opt_state, state.opt_state))
    out = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in out.items()}
  out["nonfinite_steps"] = 1.0 - finite.astype(jnp.float32)
  return new_state, out


def applied_updates(opt_state, step: jax.Array) -> jax.Array:
  """Updates applied so far: the count of the optimizer's learning-rate
  schedule (`step` when it has none). Behind `step` after skipped steps."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
  return counts[0] if counts else step


def eval_step(params, batch, *, model: nn.Module, loss_config: Any, microbatches: int = 1) -> dict[str, jax.Array]:
  """Loss sums of a global batch, in `microbatches` strided pieces as the
  train step takes it (so evaluation needs no more memory than training)."""
  fn = functools.partial(loss_sums_fn, params, model=model, loss_config=loss_config)
  return _fold_microbatches(fn, batch, microbatches, losses.combine_sums)


def host_metrics(summed: dict[str, Any]) -> dict[str, float]:
  """Metric sums (see `losses.combine_sums`) -> per-token and per-step means.

  Train-step sums carry `steps` (applied steps) and `nonfinite_steps`; when
  every step was skipped as non-finite there is nothing to average and only
  `nonfinite_steps` is returned.
  """
  summed = jax.device_get(summed)
  if "steps" in summed and float(summed["steps"]) == 0:
    return {"nonfinite_steps": float(summed["nonfinite_steps"])}
  _, out = losses.normalize_sums(summed)
  out = {k: float(v) for k, v in out.items()}
  if "steps" in summed:
    steps = float(summed["steps"])
    out["grad_norm"] = float(summed["grad_norm_sum"]) / steps
    out["learning_rate"] = float(summed["learning_rate_sum"]) / steps
    out["nonfinite_steps"] = float(summed["nonfinite_steps"])
  out["perplexity"] = float(np.exp(min(out["ce"], 80.0)))
  return out

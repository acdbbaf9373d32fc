"""Next-token losses: cross-entropy, focal loss and MiLe loss (pure jax.numpy).

Every loss here is a weighted cross-entropy

    L = sum_t valid_t * w_t * ce_t / sum_t valid_t * w_t

with weights built from stop-gradient quantities, so the weights and their
normaliser are constants for the gradient:

* cross-entropy: w_t = 1.
* focal loss:    w_t = (1 - p_t[y_t]) ** gamma, with p_t[y_t] = exp(-ce_t).
* MiLe loss:     w_t = (sigma + H_t) ** gamma, with H_t the entropy of the
  predicted next-token distribution.

Dividing by sum(valid * w) is MiLe's alpha = 1 / mean(w) normalisation: the
loss stays on the cross-entropy scale. Here alpha is computed exactly over the
valid targets of the whole global batch (inside one jitted function, across
devices and micro-batches). The authors' PyTorch code instead averages a
per-device alpha and counts padding positions in the mean; it also clamps p to
[1e-8, 1] before the log in the entropy, which inflates H by up to about
V * 1.84e-7 nats. We use the exact entropy without a clamp.

All arithmetic is float32 whatever the dtype of the logits. The functions
return sums plus denominators (see `loss_sums`) so that callers can combine
micro-batches and devices exactly, and `normalize_sums` turns them into the
scalar loss and per-token means.
"""

from typing import Mapping

import jax
import jax.numpy as jnp

LOSS_NAMES = ("cross_entropy", "focal", "mile")


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy logsumexp(z) - z[y].

  Args:
    logits: [..., V] any float dtype.
    targets: [...] integer ids in [0, V).

  Returns:
    [...] float32.
  """
  logits = logits.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return log_normalizer - target_logit


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) in nats, with no gradient.

  H = logsumexp(z) - sum_i p_i z_i, evaluated on logits shifted by their
  maximum (the expression is shift-invariant) so that large logits do not
  cancel catastrophically.

  Args:
    logits: [..., V] any float dtype.

  Returns:
    [...] float32, stop-gradient.
  """
  z = jax.lax.stop_gradient(logits.astype(jnp.float32))
  z = z - jnp.max(z, axis=-1, keepdims=True)
  log_normalizer = jnp.log(jnp.sum(jnp.exp(z), axis=-1))
  probs = jnp.exp(z - log_normalizer[..., None])
  return log_normalizer - jnp.sum(probs * z, axis=-1)


def token_weights(name: str, ce: jax.Array, entropy: jax.Array, *, gamma: float = 1.0,
                  sigma: float = 1.0) -> jax.Array:
  """Per-token loss weights (stop-gradient), float32 with the shape of `ce`.

  Args:
    name: one of LOSS_NAMES.
    ce: [...] per-token cross-entropy.
    entropy: [...] per-token predictive entropy (used by "mile" only).
    gamma: focusing exponent ("focal" and "mile"); 0 gives cross-entropy.
    sigma: MiLe's offset added to the entropy.
  """
  ce = jax.lax.stop_gradient(ce.astype(jnp.float32))
  if name == "cross_entropy":
    return jnp.ones_like(ce)
  if name == "focal":
    target_prob = jnp.exp(-ce)
    return jnp.power(1.0 - target_prob, gamma)
  if name == "mile":
    return jnp.power(sigma + jax.lax.stop_gradient(entropy.astype(jnp.float32)), gamma)
  raise ValueError(f"loss.name must be one of {LOSS_NAMES}, got {name!r}")


def reduce_token_losses(name: str, ce: jax.Array, entropy: jax.Array, mask: jax.Array, *,
                        gamma: float = 1.0, sigma: float = 1.0) -> dict[str, jax.Array]:
  """Weights per-token losses and reduces them to sums (float32 scalars).

  Args:
    name: one of LOSS_NAMES.
    ce: [...] per-token cross-entropy (carries the gradient).
    entropy: [...] per-token entropy (no gradient).
    mask: [...] 1 for targets that count, 0 for padding.

  Returns:
    A dict of scalars: `loss_numerator` = sum(valid * w * ce) (the only entry
    with a gradient), `loss_denominator` = sum(valid * w), `ce_sum`,
    `entropy_sum`, `weight_max` (max raw weight over valid targets) and
    `tokens` = sum(valid).
  """
  mask = mask.astype(jnp.float32)
  weights = token_weights(name, ce, entropy, gamma=gamma, sigma=sigma)
  ce = ce.astype(jnp.float32)
  return {
      "loss_numerator": jnp.sum(weights * ce * mask),
      "loss_denominator": jnp.sum(weights * mask),
      "ce_sum": jnp.sum(jax.lax.stop_gradient(ce) * mask),
      "entropy_sum": jnp.sum(jax.lax.stop_gradient(entropy) * mask),
      "weight_max": jnp.max(jnp.where(mask > 0, weights, 0.0), initial=0.0),
      "tokens": jnp.sum(mask),
  }


def loss_sums(name: str, logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
              gamma: float = 1.0, sigma: float = 1.0) -> dict[str, jax.Array]:
  """Sums for the named loss from logits [..., V], targets [...] and mask [...]."""
  ce = token_cross_entropy(logits, targets)
  entropy = token_entropy(logits)
  return reduce_token_losses(name, ce, entropy, mask, gamma=gamma, sigma=sigma)


def combine_sums(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Combines the sums of two disjoint sets of targets (e.g. micro-batches)."""
  return {k: jnp.maximum(a[k], b[k]) if k == "weight_max" else a[k] + b[k] for k in a}


def normalize_sums(sums: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Turns `loss_sums` output into (loss, per-token metrics).

  Works on jax arrays and on host numpy values alike. Metrics: `ce` (mean
  cross-entropy, comparable across losses), `entropy` (mean entropy),
  `weight_mean` (mean raw weight, 1/alpha), `weight_max` (max of alpha * w),
  `tokens`.
  """
  tokens = jnp.maximum(sums["tokens"], 1.0)
  denominator = sums["loss_denominator"]
  safe_denominator = jnp.where(denominator > 0, denominator, 1.0)
  loss = jnp.where(denominator > 0, sums["loss_numerator"] / safe_denominator, 0.0)
  weight_mean = denominator / tokens
  metrics = {
      "loss": loss,
      "ce": sums["ce_sum"] / tokens,
      "entropy": sums["entropy_sum"] / tokens,
      "weight_mean": weight_mean,
      "weight_max": jnp.where(weight_mean > 0, sums["weight_max"] / jnp.where(weight_mean > 0, weight_mean, 1.0), 0.0),
      "tokens": sums["tokens"],
  }
  return loss, metrics


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Mean cross-entropy over valid targets. Returns (loss, metrics)."""
  return normalize_sums(loss_sums("cross_entropy", logits, targets, mask))


def focal_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, gamma: float = 1.0):
  """Focal loss with MiLe's normalisation. Returns (loss, metrics)."""
  return normalize_sums(loss_sums("focal", logits, targets, mask, gamma=gamma))


def mile_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, gamma: float = 1.0,
              sigma: float = 1.0):
  """MiLe loss sum(w * ce * valid) / sum(w * valid), w = (sigma + H)**gamma.

  The normaliser is computed over the valid targets of everything passed in;
  called on a global batch inside jit, that is the whole batch across devices.
  Returns (loss, metrics).
  """
  return normalize_sums(loss_sums("mile", logits, targets, mask, gamma=gamma, sigma=sigma))

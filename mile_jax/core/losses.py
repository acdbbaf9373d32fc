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
    logits: [..., V] any float dtype; -inf entries are classes of
      probability 0.
    targets: [...] integer ids in [0, V).

  Returns:
    [...] float32 (+inf where the target's logit is -inf).
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
    logits: [..., V] any float dtype; -inf entries (a masked or padded
      vocabulary) are classes of probability 0.

  Returns:
    [...] float32, stop-gradient.
  """
  z = jax.lax.stop_gradient(logits.astype(jnp.float32))
  z = z - jnp.max(z, axis=-1, keepdims=True)
  log_normalizer = jnp.log(jnp.sum(jnp.exp(z), axis=-1))
  probs = jnp.exp(z - log_normalizer[..., None])
  # A -inf logit (masked or padded vocabulary) has p = 0 and adds nothing; 0 * -inf would be NaN.
  return log_normalizer - jnp.sum(jnp.where(probs > 0, probs * z, 0.0), axis=-1)


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
    mask: [...] 1 for targets that count, 0 for padding. Padding positions
      are excluded, not multiplied by 0: their values may be inf.

  Returns:
    A dict of float32 scalars: `loss_numerator` = sum(valid * w * ce) (the
    only entry with a gradient), `loss_denominator` = sum(valid * w),
    `ce_sum`, `entropy_sum`, `weight_max` (the largest raw weight w over
    valid targets) and `tokens` = sum(valid).
  """
  mask = mask.astype(jnp.float32)
  valid = mask > 0
  masked = lambda x: jnp.where(valid, x * mask, 0.0)  # noqa: E731
  weights = token_weights(name, ce, entropy, gamma=gamma, sigma=sigma)
  ce = ce.astype(jnp.float32)
  return {
      "loss_numerator": jnp.sum(masked(weights * ce)),
      "loss_denominator": jnp.sum(masked(weights)),
      "ce_sum": jnp.sum(masked(jax.lax.stop_gradient(ce))),
      "entropy_sum": jnp.sum(masked(jax.lax.stop_gradient(entropy.astype(jnp.float32)))),
      "weight_max": jnp.max(jnp.where(valid, weights, 0.0), initial=0.0),
      "tokens": jnp.sum(mask),
  }


def loss_sums(name: str, logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
              gamma: float = 1.0, sigma: float = 1.0) -> dict[str, jax.Array]:
  """Sums for the named loss from logits [..., V], targets [...] and mask [...]."""
  ce = token_cross_entropy(logits, targets)
  entropy = token_entropy(logits)
  return reduce_token_losses(name, ce, entropy, mask, gamma=gamma, sigma=sigma)


def combine_sums(total: Mapping[str, jax.Array] | None, new: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Combines the sums of disjoint sets of targets (micro-batches, steps).

  Every entry adds except `weight_max`, which takes the maximum; entries
  other than those of `loss_sums` (e.g. a train step's) add too. `total`
  None (nothing yet) returns `new`. Works on device and on host values.
  """
  if total is None:
    return dict(new)
  return {k: jnp.maximum(total[k], new[k]) if k == "weight_max" else total[k] + new[k] for k in total}


def safe_divide(numerator, denominator):
  """numerator / denominator where denominator > 0, else 0 (no valid
  targets, or every weight 0): never inf or NaN, and a zero gradient there."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def normalize_sums(sums: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Turns `loss_sums` output into (loss, per-token metrics).

  Works on jax arrays and on host numpy values alike. Metrics over the valid
  targets, each 0 when there are none: `loss`, `ce` (mean cross-entropy,
  comparable across losses), `entropy` (mean entropy), `weight_mean` and
  `weight_max` (mean and largest raw weight w, one scale for both:
  w = (sigma + H) ** gamma or (1 - p) ** gamma; weight_mean = 1 / alpha, and
  the largest normalised weight alpha * w is weight_max / weight_mean),
  `tokens`.
  """
  tokens = sums["tokens"]
  loss = safe_divide(sums["loss_numerator"], sums["loss_denominator"])
  metrics = {
      "loss": loss,
      "ce": safe_divide(sums["ce_sum"], tokens),
      "entropy": safe_divide(sums["entropy_sum"], tokens),
      "weight_mean": safe_divide(sums["loss_denominator"], tokens),
      "weight_max": sums["weight_max"],
      "tokens": tokens,
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

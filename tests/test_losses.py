"""Losses against an independent float64 NumPy reference (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mile_jax.core import losses


def ref_ce_entropy(logits, targets):
  """float64 per-token cross-entropy and entropy (entropy as -sum p log p)."""
  z = np.asarray(logits, np.float64)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  logp = z - lse[..., None]
  p = np.exp(logp)
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  entropy = -(p * logp).sum(-1)
  return ce, entropy, p


def ref_weights(name, ce, entropy, gamma, sigma):
  if name == "cross_entropy":
    return np.ones_like(ce)
  if name == "focal":
    return (1.0 - np.exp(-ce)) ** gamma
  return (sigma + entropy) ** gamma


def ref_loss_and_grad(name, logits, targets, mask, gamma=1.0, sigma=1.0):
  """Loss sum(w ce m)/sum(w m) and its analytic gradient w.r.t. the logits,
  with the weights treated as constants: dL/dz_t = w_t m_t (p_t - onehot_t) / sum(w m)."""
  ce, entropy, p = ref_ce_entropy(logits, targets)
  w = ref_weights(name, ce, entropy, gamma, sigma)
  mask = np.asarray(mask, np.float64)
  denom = (w * mask).sum()
  loss = (w * ce * mask).sum() / denom
  onehot = np.eye(logits.shape[-1])[targets]
  grad = (w * mask / denom)[..., None] * (p - onehot)
  return loss, grad, ce, entropy, w


def loss_fn(name, gamma=1.0, sigma=1.0):
  if name == "cross_entropy":
    return lambda z, y, m: losses.cross_entropy(z, y, m)
  if name == "focal":
    return lambda z, y, m: losses.focal_loss(z, y, m, gamma=gamma)
  return lambda z, y, m: losses.mile_loss(z, y, m, gamma=gamma, sigma=sigma)


def make_inputs(seed, shape=(3, 7), vocab=50, scale=3.0, pad_fraction=0.3):
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal(shape + (vocab,)) * scale).astype(np.float32)
  targets = rng.integers(0, vocab, shape)
  mask = (rng.random(shape) > pad_fraction).astype(np.float32)
  mask.flat[0] = 1.0
  return logits, targets, mask


NAMES = ["cross_entropy", "focal", "mile"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("gamma,sigma", [(1.0, 1.0), (0.5, 0.2), (2.0, 1.5)])
def test_value_and_gradient_match_reference(name, gamma, sigma):
  logits, targets, mask = make_inputs(0)
  ref_loss, ref_grad, ce, entropy, w = ref_loss_and_grad(name, logits, targets, mask, gamma, sigma)
  fn = loss_fn(name, gamma, sigma)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logits), jnp.asarray(targets),
                                                                jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-7)
  valid = mask > 0
  np.testing.assert_allclose(float(metrics["ce"]), ce[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["entropy"]), entropy[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["weight_mean"]), w[valid].mean(), rtol=1e-5)
  # Both on the raw scale of w (the largest normalised weight is their ratio).
  np.testing.assert_allclose(float(metrics["weight_max"]), w[valid].max(), rtol=1e-5)
  assert float(metrics["tokens"]) == valid.sum()


@pytest.mark.parametrize("name", NAMES)
def test_large_magnitude_logits(name):
  rng = np.random.default_rng(1)
  logits = rng.uniform(-1e4, 1e4, (4, 6, 40)).astype(np.float32)
  # Near-ties so that some entropies are far from 0 despite the spread.
  logits[0, :, 1] = logits[0, :, 0] - 0.5
  logits[0, :, 0] = logits[0].max(-1) + 1.0
  logits[0, :, 1] = logits[0, :, 0] - 0.5
  targets = rng.integers(0, 40, (4, 6))
  mask = np.ones((4, 6), np.float32)
  mask[3, 3:] = 0
  ref_loss, ref_grad, _, entropy, _ = ref_loss_and_grad(name, logits, targets, mask)
  assert entropy.max() > 0.5
  (loss, metrics), grad = jax.value_and_grad(loss_fn(name), has_aux=True)(logits, targets, mask)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["entropy"]), entropy[mask > 0].mean(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_logits_compute_in_float32(name):
  logits, targets, mask = make_inputs(2, scale=5.0)
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  ref_loss, ref_grad, _, _, _ = ref_loss_and_grad(name, np.asarray(logits_bf16, np.float32), targets, mask)
  (loss, _), grad = jax.value_and_grad(loss_fn(name), has_aux=True)(logits_bf16, targets, mask)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  # The gradient comes back in bfloat16, the logits' dtype.
  np.testing.assert_allclose(np.asarray(grad, np.float32), ref_grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("name", ["focal", "mile"])
def test_gamma_zero_is_cross_entropy_exactly(name):
  logits, targets, mask = make_inputs(3)
  fn = loss_fn(name, gamma=0.0, sigma=0.3)
  (loss, _), grad = jax.value_and_grad(fn, has_aux=True)(logits, targets, mask)
  (ce_loss, _), ce_grad = jax.value_and_grad(loss_fn("cross_entropy"), has_aux=True)(logits, targets, mask)
  assert float(loss) == float(ce_loss)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(ce_grad))


def test_uniform_logits_give_entropy_log_v():
  for vocab in (2, 37, 32000):
    h = losses.token_entropy(jnp.full((3, vocab), 7.5))
    np.testing.assert_allclose(np.asarray(h), np.log(vocab), rtol=1e-6)


def test_normalisation_keeps_cross_entropy_scale():
  """alpha = 1/mean(w): tokens sharing one ce value give a loss equal to it, whatever their weights."""
  # Target 0 in both rows; the other probabilities differ (so do entropy and
  # weight) but sum exp(z) = 2 in each row, so ce = log 2 for both.
  logits = np.log(np.array([[1.0, 0.5, 0.5], [1.0, 0.9, 0.1], [1.0, 0.99, 0.01]], np.float32))
  targets = np.zeros(3, np.int64)
  _, entropy, _ = ref_ce_entropy(logits, targets)
  assert np.ptp(entropy) > 0.2
  for gamma in (0.5, 1.0, 3.0):
    loss, metrics = losses.mile_loss(logits, targets, np.ones(3), gamma=gamma)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
    w = (1.0 + entropy) ** gamma
    np.testing.assert_allclose(float(metrics["weight_mean"]), w.mean(), rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_the_loss(name):
  logits, targets, mask = make_inputs(5, pad_fraction=0.0)
  loss, _ = loss_fn(name)(logits, targets, mask)
  padded_logits = np.concatenate([logits, np.random.default_rng(6).standard_normal(logits.shape).astype(np.float32) * 50])
  padded = np.concatenate([mask, np.zeros_like(mask)])
  loss_padded, metrics = loss_fn(name)(padded_logits, np.concatenate([targets, targets]), padded)
  np.testing.assert_allclose(float(loss_padded), float(loss), rtol=1e-6)
  assert float(metrics["tokens"]) == mask.sum()


@pytest.mark.parametrize("name", ["focal", "mile"])
def test_weights_carry_no_gradient(name):
  """The gradient equals that of a cross-entropy weighted by constant weights."""
  logits, targets, mask = make_inputs(7)
  _, _, ce, entropy, w = ref_loss_and_grad(name, logits, targets, mask, gamma=1.5, sigma=0.5)
  w = jnp.asarray(w, jnp.float32)

  def constant_weighted_ce(z):
    logp = jax.nn.log_softmax(z, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0]
    return jnp.sum(w * nll * mask) / jnp.sum(w * mask)

  expected = jax.grad(constant_weighted_ce)(jnp.asarray(logits))
  grad = jax.grad(lambda z: loss_fn(name, gamma=1.5, sigma=0.5)(z, targets, mask)[0])(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-4, atol=1e-7)


def test_combine_sums_equals_whole_batch():
  logits, targets, mask = make_inputs(8, shape=(4, 5))
  whole = losses.loss_sums("mile", logits, targets, mask)
  a = losses.loss_sums("mile", logits[:2], targets[:2], mask[:2])
  b = losses.loss_sums("mile", logits[2:], targets[2:], mask[2:])
  combined = losses.combine_sums(losses.combine_sums(None, a), b)
  for key in whole:
    np.testing.assert_allclose(float(combined[key]), float(whole[key]), rtol=1e-6)
  # Other entries (a train step's) add; only weight_max takes the max.
  steps = losses.combine_sums({"weight_max": 2.0, "steps": 1.0}, {"weight_max": 1.5, "steps": 1.0})
  assert steps == {"weight_max": 2.0, "steps": 2.0}


def test_normalize_sums_hand_values():
  """Three valid targets with raw weights 1, 2 and 6 (alpha = 1/3): every metric by hand."""
  ce, entropy, w = np.array([1.0, 2.0, 0.5]), np.array([0.0, 1.0, 5.0]), np.array([1.0, 2.0, 6.0])
  sums = {"loss_numerator": np.float32((w * ce).sum()), "loss_denominator": np.float32(w.sum()),
          "ce_sum": np.float32(ce.sum()), "entropy_sum": np.float32(entropy.sum()),
          "weight_max": np.float32(6.0), "tokens": np.float32(3.0)}
  loss, metrics = losses.normalize_sums(sums)
  # loss = (1 + 4 + 3) / 9; weights on one (raw) scale: mean 3 <= max 6.
  want = {"loss": 8.0 / 9.0, "ce": 3.5 / 3.0, "entropy": 2.0, "weight_mean": 3.0, "weight_max": 6.0, "tokens": 3.0}
  assert float(loss) == pytest.approx(8.0 / 9.0, rel=1e-6)
  for key, value in want.items():
    assert float(metrics[key]) == pytest.approx(value, rel=1e-6), key
  # No valid target: zeros, never NaN, and a zero gradient through the guarded division.
  _, empty = losses.normalize_sums({k: np.float32(0.0) for k in sums})
  assert all(float(v) == 0.0 for v in empty.values()), empty
  assert float(jax.grad(lambda d: losses.safe_divide(2.0, d))(0.0)) == 0.0
  assert float(jax.grad(lambda d: losses.safe_divide(2.0, d))(4.0)) == pytest.approx(-2.0 / 16.0)


def masked_vocabulary_inputs():
  """Logits [4, 6, 12] with columns 9..11 at -inf and a few more -inf entries; targets in the unmasked columns,
  except at padding positions, where they point at a -inf logit (so their cross-entropy is inf)."""
  logits, targets, mask = make_inputs(9, shape=(4, 6), vocab=12, scale=3.0)
  logits[..., 9:] = -np.inf
  logits[1, 2, 3] = -np.inf
  rng = np.random.default_rng(10)
  targets = rng.integers(0, 9, (4, 6))
  targets[1, 2] = 4
  targets[mask == 0] = 10
  return logits, targets, mask


def test_masked_vocabulary_hand_values():
  """p = (1/2, 1/2) and p = (1/4, 3/4) over the finite logits: H and ce by hand."""
  logits = np.array([[0.0, 0.0, -np.inf, -np.inf], [-np.inf, np.log(1.0), np.log(3.0), -np.inf]], np.float32)
  targets = np.array([0, 2])
  want_h = [np.log(2.0), -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))]
  np.testing.assert_allclose(np.asarray(losses.token_entropy(logits)), want_h, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.token_cross_entropy(logits, targets)),
                             [np.log(2.0), -np.log(0.75)], rtol=1e-6)
  grad = jax.grad(lambda z: losses.cross_entropy(z, targets, np.ones(2))[0])(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad), [[-0.25, 0.25, 0, 0], [0, 0.125, -0.125, 0]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_masked_vocabulary_matches_reference_without_those_columns(name):
  """-inf logits behave as absent classes: values equal the float64 reference on the finite columns only,
  the gradient is finite (0 on the -inf columns), and padded targets at -inf logits change nothing."""
  logits, targets, mask = masked_vocabulary_inputs()
  kept = logits[..., :9].astype(np.float64)
  kept[1, 2, 3] = -1e300  # exp underflows to 0 in float64: the class is absent.
  valid_targets = np.where(mask > 0, targets, 0)
  ref_loss, ref_grad, ce, entropy, w = ref_loss_and_grad(name, kept, valid_targets, mask, 1.5, 0.5)
  (loss, metrics), grad = jax.value_and_grad(loss_fn(name, 1.5, 0.5), has_aux=True)(
      jnp.asarray(logits), targets, mask)
  valid = mask > 0
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["entropy"]), entropy[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce"]), ce[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["weight_max"]), w[valid].max(), rtol=1e-5)
  grad = np.asarray(grad)
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad[..., :9], ref_grad, rtol=1e-4, atol=1e-7)
  assert not grad[..., 9:].any() and grad[1, 2, 3] == 0.0


def test_unknown_loss_name():
  with pytest.raises(ValueError, match="loss.name"):
    losses.loss_sums("mse", np.zeros((2, 3)), np.zeros(2, np.int64), np.ones(2))

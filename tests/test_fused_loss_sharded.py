"""The chunked loss with the unembedding sharded as a parameter (d over fsdp,
V over tensor): the vocabulary-parallel path against a float64 reference
within a float32 error model, against the replicated path, and the per-device
size of its kernel gradient."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from test_fused_loss import EPS32, NAMES, SUM_KEYS, make_inputs
from mile_jax.core import fused_loss
from mile_jax.core import sharding
from mile_jax.core import vocab_parallel

KERNEL_SHARDINGS = (P(None, "tensor"), P("fsdp", "tensor"))  # (for the matmuls, the parameter's): as step.py's.
GAMMA, SIGMA = 1.5, 0.5


def _weights(name, ce, entropy):
  return {"cross_entropy": np.ones_like(ce), "focal": (1.0 - np.exp(-ce)) ** GAMMA,
          "mile": (SIGMA + entropy) ** GAMMA}[name]


def error_model(name, hidden, kernel, targets, mask):
  """float64 sums and gradients of sum(w * ce * mask) w.r.t. (hidden [N, d], kernel [d, V]), each with a
  bound on the error of a float32 computation (sums, d hidden [N, d], d kernel [d, V]).

  Each logit, the log-normaliser and sum_i p_i z_i are float32 reductions of d or V terms, each within
  delta = eps32 (sqrt(d) + sqrt(V)) (1 + A) per token, A = max_v sum_k |h_k w_kv| the logits' magnitude;
  ce and H combine a few of them: within err = 4 delta, and a weight within its largest change over that
  interval (wtol). p = exp(z - lse) is then within 2 err relative, dz = w mask (p - onehot) within
  wtol |p - onehot| + w p 2 err, and the matmuls add eps32 sqrt(terms) of their absolute sums; the sums
  over tokens add eps32 sqrt(N) of theirs.
  """
  h, w_out = np.asarray(hidden, np.float64), np.asarray(kernel, np.float64)
  (n, d), v = h.shape, w_out.shape[1]
  z = h @ w_out
  zmax = z.max(-1, keepdims=True)
  logp = z - (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))
  p = np.exp(logp)
  ce, entropy = -logp[np.arange(n), targets], -(p * logp).sum(-1)
  weight = _weights(name, ce, entropy)
  err = 4 * EPS32 * (np.sqrt(d) + np.sqrt(v)) * (1 + (np.abs(h) @ np.abs(w_out)).max(-1))
  wtol = np.max([np.abs(_weights(name, ce + a * err, entropy + b * err) - weight)
                 for a in (-1, 1) for b in (-1, 1)], axis=0) + EPS32 * weight
  valid, root_n = mask > 0, np.sqrt(n)
  sums = {"loss_numerator": (weight * ce)[valid].sum(), "loss_denominator": weight[valid].sum(),
          "ce_sum": ce[valid].sum(), "entropy_sum": entropy[valid].sum(), "weight_max": weight[valid].max(),
          "tokens": valid.sum()}
  tol = {"loss_numerator": (weight * err + np.abs(ce) * wtol)[valid].sum() + EPS32 * root_n * sums["loss_numerator"],
         "loss_denominator": wtol[valid].sum() + EPS32 * root_n * sums["loss_denominator"],
         "ce_sum": err[valid].sum() + EPS32 * root_n * np.abs(ce[valid]).sum(),
         "entropy_sum": err[valid].sum() + EPS32 * root_n * entropy[valid].sum(),
         "weight_max": wtol[valid].max(), "tokens": 0.0}
  g = (weight * mask)[:, None]
  p_minus_onehot = p - np.eye(v)[targets]
  dz = g * p_minus_onehot
  dz_tol = (wtol * mask)[:, None] * np.abs(p_minus_onehot) + g * p * 2 * err[:, None] + EPS32 * np.abs(dz)
  dh, dk = dz @ w_out.T, h.T @ dz
  dh_tol = dz_tol @ np.abs(w_out).T + EPS32 * np.sqrt(v) * (np.abs(dz) @ np.abs(w_out).T)
  dk_tol = np.abs(h).T @ dz_tol + EPS32 * root_n * (np.abs(h).T @ np.abs(dz))
  return (sums, tol), (dh, dh_tol), (dk, dk_tol)


def sharded_fn(name, block_size, vocab_block_size, kernel_shardings, with_grads=True):
  """jit of (value and) grad of the numerator w.r.t. (hidden, kernel) with tokens over (data, fsdp)."""
  def sums_fn(h, w, targets, mask):
    sums = fused_loss.chunked_loss_sums(name, h, w, targets, mask, gamma=GAMMA, sigma=SIGMA, block_size=block_size,
                                        vocab_block_size=vocab_block_size, shard_axes=("data", "fsdp"),
                                        kernel_shardings=kernel_shardings)
    return sums["loss_numerator"], sums
  if not with_grads:
    return jax.jit(lambda *args: sums_fn(*args)[1])
  return jax.jit(jax.grad(sums_fn, argnums=(0, 1), has_aux=True))


def placed_inputs(mesh, seed=7, lead=(8, 24), d=64, vocab=512):
  """Inputs as the train step places them: tokens over (data, fsdp), the kernel as its parameter."""
  inputs = make_inputs(seed, lead, d, vocab, scale=4.0)
  tokens = NamedSharding(mesh, P(("data", "fsdp")))
  shardings = (tokens, NamedSharding(mesh, P("fsdp", "tensor")), tokens, tokens)
  return inputs, tuple(jax.device_put(x, s) for x, s in zip(inputs, shardings))


def assert_within(got, want, tol, what):
  err = np.abs(np.asarray(got, np.float64) - want)
  assert (err <= tol).all(), (what, float((err / np.maximum(tol, 1e-300)).max()))


def check_error_model(name, inputs, sums, grads=None):
  hidden, kernel, targets, mask = inputs
  (want, tol), (dh, dh_tol), (dk, dk_tol) = error_model(name, hidden.reshape(-1, hidden.shape[-1]), kernel,
                                                        targets.reshape(-1), mask.reshape(-1))
  for key in SUM_KEYS:
    assert_within(float(sums[key]), want[key], tol[key], key)
  if grads is not None:
    assert_within(np.asarray(grads[0]).reshape(dh.shape), dh, dh_tol, "d hidden")
    assert_within(grads[1], dk, dk_tol, "d kernel")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,vocab_block_size", [((1, 4, 2), 0), ((1, 4, 2), 40), ((1, 2, 1), 0), ((2, 2, 2), 40)],
                         ids=lambda x: ",".join(map(str, x)) if isinstance(x, tuple) else f"vb{x}")
def test_vocab_parallel_matches_float64_within_error_model(name, shape, vocab_block_size):
  """Loss sums and both gradients, with and without vocabulary blocks, tensor and data axes."""
  mesh = sharding.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
  inputs, placed = placed_inputs(mesh)
  with jax.set_mesh(mesh):
    assert vocab_parallel.layout(("data", "fsdp"), KERNEL_SHARDINGS[1], 192, 64, 512) is not None
    grads, sums = sharded_fn(name, 32, vocab_block_size, KERNEL_SHARDINGS)(*placed)
  check_error_model(name, inputs, sums, grads)
  assert grads[1].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor")), 2)


@pytest.mark.parametrize("name", NAMES)
def test_vocab_parallel_equals_replicated_path(name):
  """On (1,4,2): the vocabulary-parallel loss and the replicated path (the kernel gathered for the
  matmuls) give the same sums and gradients within the sum of their error bounds; outside
  differentiation (evaluation) the vocabulary-parallel sums are within the model too."""
  mesh = sharding.make_mesh((1, 4, 2))
  inputs, placed = placed_inputs(mesh, seed=8)
  with jax.set_mesh(mesh):
    got_grads, got = sharded_fn(name, 32, 0, KERNEL_SHARDINGS)(*placed)
    today_grads, today = sharded_fn(name, 32, 0, None)(*placed)
    evaluated = sharded_fn(name, 32, 0, KERNEL_SHARDINGS, with_grads=False)(*placed)
  hidden, kernel, targets, mask = inputs
  (_, tol), (_, dh_tol), (_, dk_tol) = error_model(name, hidden.reshape(-1, 64), kernel, targets.reshape(-1),
                                                   mask.reshape(-1))
  for key in SUM_KEYS:
    assert_within(float(got[key]), float(today[key]), 2 * tol[key], key)
  assert_within(np.asarray(got_grads[0]).reshape(-1, 64), np.asarray(today_grads[0]).reshape(-1, 64), 2 * dh_tol,
                "d hidden")
  assert_within(got_grads[1], np.asarray(today_grads[1]), 2 * dk_tol, "d kernel")
  check_error_model(name, inputs, evaluated)


def f32_shapes(hlo_text: str) -> set[tuple[int, ...]]:
  """Shapes of every float32 array (tuple elements included) that a compiled program's instructions make."""
  found = set()
  for line in hlo_text.splitlines():
    result = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\(.*?\)|\S+) ", line)
    for dims in re.findall(r"f32\[([\d,]*)\]", result.group(1) if result else ""):
      found.add(tuple(int(x) for x in dims.split(",") if x))
  return found


def test_kernel_gradient_is_a_one_over_fsdp_slice_on_every_device():
  """On (1,4,2) with d = 64, V = 512: the parameter's [d/4, V/2] slices, and no float32 array on a
  device larger than d V / 8 elements (the kernel gradient's accumulator is [d, V/8]: all of d, the
  device's eighth of the vocabulary), where the replicated path holds [d, V/2]; the compiled
  temporaries fall accordingly."""
  mesh = sharding.make_mesh((1, 4, 2))
  _, placed = placed_inputs(mesh)
  d, vocab = 64, 512
  with jax.set_mesh(mesh):
    compiled = {impl: sharded_fn("mile", 32, 0, shardings).lower(*placed).compile()
                for impl, shardings in (("parallel", KERNEL_SHARDINGS), ("replicated", None))}
  shapes = {impl: f32_shapes(c.as_text()) for impl, c in compiled.items()}
  largest = {impl: max(int(np.prod(s)) for s in found) for impl, found in shapes.items()}
  assert (1, d, vocab // 8) in shapes["parallel"], "no [d, V/8] accumulator"
  assert largest["parallel"] == d * vocab // 8, sorted(shapes["parallel"], key=np.prod)[-3:]
  assert largest["replicated"] >= d * vocab // 2
  temps = {impl: c.memory_analysis().temp_size_in_bytes for impl, c in compiled.items()}
  # The replicated path's [d, V/2] float32 accumulator alone is larger than everything the parallel path keeps.
  assert temps["parallel"] < 4 * d * vocab // 2 <= temps["replicated"], temps


def test_without_fsdp_the_replicated_path_runs():
  """An fsdp axis of one device, a kernel not split along d, or sizes the mesh does not divide:
  no vocabulary-parallel layout, so the loss is the replicated path's computation."""
  for shape in ((2, 1, 4), (8, 1, 1)):
    with jax.set_mesh(sharding.make_mesh(shape)):
      assert vocab_parallel.layout(("data", "fsdp"), KERNEL_SHARDINGS[1], 192, 64, 512) is None
  with jax.set_mesh(sharding.make_mesh((1, 4, 2))):
    assert vocab_parallel.layout(("data", "fsdp"), P(None, "tensor"), 192, 64, 512) is None
    assert vocab_parallel.layout(("data", "fsdp"), KERNEL_SHARDINGS[1], 190, 64, 512) is None  # tokens
    assert vocab_parallel.layout(("data", "fsdp"), KERNEL_SHARDINGS[1], 192, 64, 500) is None  # V / 8
    assert vocab_parallel.layout(("data", "fsdp"), KERNEL_SHARDINGS[1], 192, 64, 512) is not None

"""The chunked loss against a float64 NumPy reference and against the naive
path: values and gradients w.r.t. hidden states and unembedding, odd sizes,
masks, bfloat16, large logits and an 8-device mesh."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import count_in_loops
from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.core import fused_loss
from mile_jax.core import loss_blocks
from mile_jax.core import losses
from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.core import step as step_lib

NAMES = ["cross_entropy", "focal", "mile"]
EPS32 = 2.0 ** -24  # float32 unit roundoff.
EPS16 = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits).
SUM_KEYS = ["loss_numerator", "loss_denominator", "ce_sum", "entropy_sum", "weight_max", "tokens"]


def ref_sums_and_grads(name, hidden, kernel, targets, mask, gamma, sigma):
  """float64 sums and the gradients of sum(w * ce * mask) w.r.t. hidden and kernel."""
  h = np.asarray(hidden, np.float64).reshape(-1, hidden.shape[-1])
  w_out = np.asarray(kernel, np.float64)
  y, m = targets.reshape(-1), np.asarray(mask, np.float64).reshape(-1)
  z = h @ w_out
  zmax = z.max(-1, keepdims=True)
  logp = z - (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))
  p = np.exp(logp)
  ce = -logp[np.arange(len(y)), y]
  entropy = -(p * logp).sum(-1)
  weight = {"cross_entropy": np.ones_like(ce), "focal": (1.0 - np.exp(-ce)) ** gamma,
            "mile": (sigma + entropy) ** gamma}[name]
  sums = {"loss_numerator": (weight * ce * m).sum(), "loss_denominator": (weight * m).sum(),
          "ce_sum": (ce * m).sum(), "entropy_sum": (entropy * m).sum(),
          "weight_max": weight[m > 0].max(), "tokens": m.sum()}
  dz = (weight * m)[:, None] * (p - np.eye(z.shape[1])[y])
  return sums, (dz @ w_out.T).reshape(hidden.shape), h.T @ dz


def make_inputs(seed, lead, d, vocab, scale=1.0, pad_fraction=0.3):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal(lead + (d,)).astype(np.float32)
  kernel = (rng.standard_normal((d, vocab)) * scale / np.sqrt(d)).astype(np.float32)
  targets = rng.integers(0, vocab, lead)
  mask = (rng.random(lead) > pad_fraction).astype(np.float32)
  mask.flat[0] = 1.0
  return hidden, kernel, targets, mask


@functools.lru_cache(maxsize=None)
def chunked_fn(name, gamma, sigma, block_size, vocab_block_size, dtype=None, shard_axes=()):
  """jit(value and grad of the numerator w.r.t. (hidden, kernel)), cached per setting."""
  def numerator(hidden, kernel, targets, mask):
    sums = fused_loss.chunked_loss_sums(name, hidden, kernel, targets, mask, gamma=gamma, sigma=sigma,
                                        block_size=block_size, vocab_block_size=vocab_block_size, dtype=dtype,
                                        shard_axes=shard_axes)
    return sums["loss_numerator"], sums
  return jax.jit(jax.grad(numerator, argnums=(0, 1), has_aux=True))


def check_against_reference(name, inputs, gamma=1.0, sigma=1.0, block_size=16, vocab_block_size=0, dtype=None,
                            ref_inputs=None, rtol=2e-5, grad_rtol=2e-4, check_grads=True):
  hidden, kernel, targets, mask = inputs
  (d_hidden, d_kernel), sums = chunked_fn(name, gamma, sigma, block_size, vocab_block_size, dtype)(
      hidden, kernel, targets, mask)
  rh, rk = ref_inputs if ref_inputs is not None else (hidden, kernel)
  ref, ref_dh, ref_dk = ref_sums_and_grads(name, np.asarray(rh, np.float32), rk, targets, mask, gamma, sigma)
  for key in SUM_KEYS:
    np.testing.assert_allclose(float(sums[key]), ref[key], rtol=rtol, err_msg=key)
  assert d_hidden.dtype == hidden.dtype and d_hidden.shape == hidden.shape
  assert d_kernel.dtype == jnp.float32 and d_kernel.shape == kernel.shape
  if not check_grads:
    return
  for got, want in ((d_hidden, ref_dh), (d_kernel, ref_dk)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=grad_rtol,
                               atol=grad_rtol * np.abs(want).max())


# (token shape, d, vocab, block_size, vocab_block_size): blocks that do not
# divide the tokens or the vocabulary, one block, and a block per token.
CASES = [((3, 37), 16, 101, 16, 0), ((3, 37), 16, 101, 16, 24), ((64,), 8, 512, 1024, 100),
         ((5, 7), 8, 33, 1, 7)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[2]}_b{c[3]}_vb{c[4]}")
def test_matches_float64_reference(name, case):
  lead, d, vocab, block, vocab_block = case
  inputs = make_inputs(0, lead, d, vocab, scale=4.0)
  check_against_reference(name, inputs, gamma=1.5, sigma=0.5, block_size=block, vocab_block_size=vocab_block)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_hidden_states(name):
  hidden, kernel, targets, mask = make_inputs(1, (4, 24), 32, 200, scale=4.0)
  hidden = jnp.asarray(hidden, jnp.bfloat16)
  # The matmuls see bfloat16 inputs: the reference uses the same rounded values.
  rounded = (np.asarray(hidden, np.float32), np.asarray(jnp.asarray(kernel, jnp.bfloat16), np.float32))
  check_against_reference(name, (hidden, kernel, targets, mask), block_size=32, vocab_block_size=64,
                          dtype=jnp.bfloat16, ref_inputs=rounded, rtol=1e-4, grad_rtol=2e-2)


def test_large_logits_keep_entropy_exact():
  """Logits 16384 + k/8, exact in float32: the entropy taken relative to the
  running maximum stays exact, where m + log s - t/s would lose ~1e-3 nats."""
  rng = np.random.default_rng(2)
  hidden = rng.integers(-3, 4, (40, 8)).astype(np.float32)
  kernel = (rng.integers(-4, 5, (8, 300)) / 8.0).astype(np.float32)
  hidden[:, 0], kernel[0, :] = 128.0, 128.0
  targets, mask = rng.integers(0, 300, 40), np.ones(40, np.float32)
  # Cross-entropy = lse - z[y] cancels 1e4 on any path: float32 tolerance there.
  check_against_reference("mile", (hidden, kernel, targets, mask), block_size=8, vocab_block_size=64,
                          rtol=1e-4, check_grads=False)
  _, sums = chunked_fn("mile", 1.0, 1.0, 8, 64)(hidden, kernel, targets, mask)
  ref, _, _ = ref_sums_and_grads("mile", hidden, kernel, targets, mask, 1.0, 1.0)
  np.testing.assert_allclose(float(sums["entropy_sum"]), ref["entropy_sum"], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_padded_vocabulary_equals_masked_logits(name):
  """V = 37 in 5 strided vocabulary blocks of 8 (3 padded columns) against the naive loss on 40 logits whose
  last 3 are -inf: both equal the float64 reference over the 37 real columns, entropy to float32 precision."""
  hidden, kernel, targets, mask = make_inputs(5, (3, 13), 8, 37, scale=4.0)
  assert loss_blocks.num_blocks(37, 8) == 5  # pylint: disable=protected-access
  check_against_reference(name, (hidden, kernel, targets, mask), gamma=1.5, sigma=0.5, block_size=16,
                          vocab_block_size=8, rtol=1e-5)
  masked = np.concatenate([hidden @ kernel, np.full((3, 13, 3), -np.inf, np.float32)], axis=-1)
  naive = losses.loss_sums(name, masked, targets, mask, gamma=1.5, sigma=0.5)
  ref, _, _ = ref_sums_and_grads(name, hidden, kernel, targets, mask, 1.5, 0.5)
  for key in SUM_KEYS:
    np.testing.assert_allclose(float(naive[key]), ref[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_equals_naive_path(name):
  hidden, kernel, targets, mask = make_inputs(3, (6, 20), 16, 130, scale=4.0)

  def naive(h, w):
    sums = losses.loss_sums(name, h @ w, targets, mask, gamma=2.0, sigma=1.0)
    return sums["loss_numerator"], sums

  want_grads, want = jax.grad(naive, argnums=(0, 1), has_aux=True)(hidden, kernel)
  got_grads, got = chunked_fn(name, 2.0, 1.0, 32, 48)(hidden, kernel, targets, mask)
  for key in SUM_KEYS:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


@pytest.mark.parametrize("vocab_block_size,shard_axes", [(40, ()), (40, ("data", "fsdp")), (0, ("data", "fsdp"))])
def test_sharded_inputs_on_eight_devices(vocab_block_size, shard_axes):
  """Tokens over (data, fsdp), vocabulary over tensor: same values and gradients as one device,
  with the kernel gradient summed per block or per token shard."""
  mesh = sharding.make_mesh((2, 2, 2))
  hidden, kernel, targets, mask = make_inputs(4, (8, 24), 16, 200, scale=4.0)
  fn = chunked_fn("mile", 1.0, 1.0, 32, vocab_block_size, shard_axes=shard_axes)
  want, want_dh, want_dk = ref_sums_and_grads("mile", hidden, kernel, targets, mask, 1.0, 1.0)
  want_grads = (want_dh, want_dk)
  tokens = NamedSharding(mesh, P(("data", "fsdp")))
  placed = (jax.device_put(hidden, tokens), jax.device_put(kernel, NamedSharding(mesh, P(None, "tensor"))),
            jax.device_put(targets, tokens), jax.device_put(mask, tokens))
  with jax.set_mesh(mesh):
    got_grads, got = fn(*placed)
  for key in SUM_KEYS:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def tiny_batch(vocab, rows=8, seq=32, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
  mask = (rng.random((rows, seq)) > 0.2).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def one_step(config, workdir):
  """(parameter update, host metrics) of the first train step."""
  trainer = train_lib.Trainer(config, str(workdir))
  state = step_lib.init_state(trainer.model, trainer.tx, trainer.mesh, trainer.rules,
                               config.data.seq_len, config.seed)
  before = jax.device_get(state.params)  # The step donates the state.
  batch = tiny_batch(config.model.vocab_size)
  state, metrics = trainer.train_step(state, sharding.make_global_batch(batch, trainer.mesh))
  update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, jax.device_get(state.params), before)
  return update, step_lib.host_metrics(metrics)


@pytest.mark.slow
def test_train_step_chunked_equals_naive(tiny_config, tmp_path):
  """A whole step on a (2,2,2) mesh with two micro-batches (the normaliser spans both).

  No warm-up, so the first step has the peak learning rate (a warm-up from 0 would make it a no-op). With
  eps = 1 Adam's first update is lr * g / (|g| + 1), monotone in each gradient element rather than its sign,
  and without weight decay it is the gradient's alone: comparing updates compares the two gradients.
  """
  overrides = {"mesh.shape": (2, 2, 2), "mesh.num_devices": 0, "train.microbatches": 2, "loss.block_size": 48,
               "loss.vocab_block_size": 200, "optim.warmup_steps": 0, "optim.eps": 1.0,
               "optim.weight_decay": 0.0, "optim.learning_rate": 1.0}
  naive_update, naive = one_step(tiny_config(**overrides), tmp_path / "naive")
  chunked_update, chunked = one_step(tiny_config(**overrides, **{"loss.impl": "chunked"}), tmp_path / "chunked")
  for key in ("loss", "ce", "entropy", "weight_mean", "weight_max", "tokens", "grad_norm"):
    np.testing.assert_allclose(chunked[key], naive[key], rtol=2e-5, err_msg=key)
  assert naive["learning_rate"] == 1.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(chunked_update), jax.tree.leaves(naive_update)):
    scale = np.abs(b).max()
    assert scale > 1e-5, (path, scale)  # A real step: every parameter moved.
    # float32 gradients of a sum over 256 tokens: relative 1e-4 of the largest element covers sqrt(256) eps
    # growth with a wide margin, far below the update itself.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


def f32_accumulation_tolerance(hidden, kernel, targets, mask):
  """Float64 MiLe sums (gamma 1, sigma 1) and dz = d numerator / d logits [N, V] from bfloat16-exact
  hidden [N, d] and kernel [d, V], with a bound on the error of sums computed with float32 accumulation.

  Logits: d exact products (bfloat16 x bfloat16 fits float32) summed in float32, error at most
  delta = 2 sqrt(d) eps32 max_v sum_k |h_k w_kv| per token. Then |d ce| <= 2 delta and
  |d H| <= 2 delta (1 + range(z)) (H = lse - sum p z, |dp_i| <= 2 delta p_i), each plus the float32
  reductions over V, 2 sqrt(V) eps32 max|z|; the sums add the per-token bounds of the valid targets.
  """
  h, w = np.asarray(hidden, np.float64), np.asarray(kernel, np.float64)
  z = h @ w
  d, v = w.shape
  zmax = z.max(-1, keepdims=True)
  logp = z - zmax - np.log(np.exp(z - zmax).sum(-1, keepdims=True))
  p, ce = np.exp(logp), -logp[np.arange(len(targets)), targets]
  weight = 1.0 - (p * logp).sum(-1)
  delta = 2 * np.sqrt(d) * EPS32 * (np.abs(h) @ np.abs(w)).max(-1)
  reduction = 2 * np.sqrt(v) * EPS32 * np.abs(z).max(-1)
  tol_ce, tol_h = 2 * delta + reduction, 2 * delta * (1 + np.ptp(z, -1)) + reduction
  valid = mask > 0
  ref = {"loss_numerator": (weight * ce)[valid].sum(), "loss_denominator": weight[valid].sum(),
         "ce_sum": ce[valid].sum(), "entropy_sum": (weight - 1.0)[valid].sum(), "weight_max": weight[valid].max(),
         "tokens": valid.sum()}
  tol = {"loss_numerator": (weight * tol_ce + ce * tol_h)[valid].sum(), "loss_denominator": tol_h[valid].sum(),
         "ce_sum": tol_ce[valid].sum(), "entropy_sum": tol_h[valid].sum(), "weight_max": tol_h[valid].max(),
         "tokens": 0.0}
  dz = (weight * mask)[:, None] * (p - np.eye(v)[targets])
  return ref, tol, dz


def matmul_dtypes(jaxpr) -> set:
  """{(operand dtypes, result dtype)} of every dot_general in a jaxpr, sub-jaxprs (loops, custom_vjp) included."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.add((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      found |= matmul_dtypes(sub)
  return found


def test_bfloat16_naive_equals_chunked():
  """bfloat16 hidden states through the naive loss (the model's own unembedding, float32 logits) and the
  chunked loss: the same function. Both sums equal the float64 reference from the bfloat16 hidden states
  and bfloat16-rounded unembedding within float32 accumulation error (rounding the logits to bfloat16
  would miss by up to 8e-3 nats per token here). The gradients differ from the reference only by bfloat16
  roundings (relative 2^-8): of the results (d hidden is bfloat16; the naive d kernel passes the float32
  kernel's cast to bfloat16) and, on the chunked path, of each dz."""
  cfg = model_lib.DecoderConfig(vocab_size=512, d_model=64, init_std=0.2, dtype="bfloat16")
  rng = np.random.default_rng(6)
  hidden = jnp.asarray(rng.standard_normal((128, cfg.d_model)), jnp.bfloat16)  # (N, d) like RMSNorm's output
  kernel = model_lib.unembedding(cfg).init(jax.random.key(0), hidden[None])["params"]["kernel"]
  kernel = nn.unbox(kernel)  # (d, V) float32
  targets, mask = rng.integers(0, cfg.vocab_size, 128), (rng.random(128) > 0.2).astype(np.float32)
  h64, w64 = np.asarray(hidden, np.float64), np.asarray(jnp.asarray(kernel, jnp.bfloat16), np.float64)
  ref, tol, dz = f32_accumulation_tolerance(h64, w64, targets, mask)
  ref_dh, abs_dh = dz @ w64.T, np.abs(dz) @ np.abs(w64).T
  ref_dk, abs_dk = h64.T @ dz, np.abs(h64).T @ np.abs(dz)

  def naive(h, w):
    logits = model_lib.unembedding(cfg).apply({"params": {"kernel": w}}, h[None])[0]
    assert logits.dtype == jnp.float32
    sums = losses.loss_sums("mile", logits, targets, mask)
    return sums["loss_numerator"], sums

  naive_fn = jax.jit(jax.grad(naive, argnums=(0, 1), has_aux=True))
  for impl, fn in (("naive", naive_fn), ("chunked", chunked_fn("mile", 1.0, 1.0, 48, 200, jnp.bfloat16))):
    args = (hidden, kernel) if impl == "naive" else (hidden, kernel, targets, mask)
    (d_hidden, d_kernel), sums = fn(*args)
    # Platform-independent (a CPU may keep a bfloat16 matmul's result in float32): every matmul of the
    # forward and backward passes returns float32, and the forward logits' take bfloat16 operands.
    dtypes = matmul_dtypes(jax.make_jaxpr(fn)(*args).jaxpr)
    assert {out for _, out in dtypes} == {"float32"} and (("bfloat16", "bfloat16"), "float32") in dtypes, dtypes
    for key in SUM_KEYS:
      assert abs(float(sums[key]) - ref[key]) <= tol[key], (impl, key, float(sums[key]) - ref[key], tol[key])
    for got, want, spread in ((d_hidden, ref_dh, abs_dh), (d_kernel, ref_dk, abs_dk)):
      err = np.abs(np.asarray(got, np.float64) - want)
      # Plus an absolute floor for the float32 accumulation (about sqrt(N) eps32 relative to the largest).
      bound = EPS16 * (np.abs(want) + spread) + 1e-6 * np.abs(want).max()
      assert (err <= bound).all(), (impl, got.shape, (err / bound).max())


@pytest.mark.parametrize("setting,value", [("loss.impl", "fused"), ("loss.block_size", 0),
                                           ("loss.vocab_block_size", -1)])
def test_bad_loss_settings_are_named(tiny_config, setting, value):
  with pytest.raises(config_lib.ConfigError, match=setting.replace(".", r"\.")):
    config_lib.validate(tiny_config(**{setting: value}))


def test_kernel_gradient_is_summed_over_devices_once_not_per_block():
  """With the tokens' shard axes, the loop over token blocks holds no all-reduce; one follows it."""
  mesh = sharding.make_mesh((2, 4, 1))
  tokens = NamedSharding(mesh, P(("data", "fsdp")))
  args = (jax.ShapeDtypeStruct((1024, 32), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None))),
          jax.ShapeDtypeStruct((32, 256), jnp.float32, sharding=NamedSharding(mesh, P())),
          jax.ShapeDtypeStruct((1024,), jnp.int32, sharding=tokens),
          jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=tokens))
  counts = {}
  for shard_axes in ((), ("data", "fsdp")):
    with jax.set_mesh(mesh):
      text = chunked_fn("mile", 1.0, 1.0, 128, 0, shard_axes=shard_axes).lower(*args).compile().as_text()
    # All-reduces whose result holds a [d, V] kernel gradient (the loss sums add scalars besides).
    in_loop, total = count_in_loops(text, lambda line: re.search(r" all-reduce(?:-start)?\(", line) and re.search(
        r"f32\[(?:1,)?32,256\]", line.split(" all-reduce")[0]))
    counts[shard_axes] = (in_loop, total)
  assert counts[()][0] >= 1  # One [d, V] sum per block.
  assert counts[("data", "fsdp")] == (0, 1)


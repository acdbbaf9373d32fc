"""Attention kernels against a float64 NumPy reference: values and gradients of
splash (Pallas interpret mode on CPU) and XLA, causal, packed documents,
grouped-query heads, padded lengths, a (2,2,2) mesh, and a whole train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.core import attention
from mile_jax.core import sharding
from mile_jax.core import step as step_lib

EPS32 = 2.0 ** -24


def reference(q, k, v, segment_ids, cotangent):
  """float64 NumPy: out = softmax(q k^T / sqrt(H) | causal, same segment) v, and the
  gradients of sum(out * cotangent) with respect to q, k and v (shapes as `attention.attend`)."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
  b, t, n, h = q.shape
  group = n // k.shape[2]
  kk, vv = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # Head n reads kv head n // group.
  s = np.einsum("btnh,bsnh->bnts", q, kk) / math.sqrt(h)
  allowed = np.tril(np.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnh->btnh", p, vv)
  dp = np.einsum("btnh,bsnh->bnts", g, vv)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bnts,bsnh->btnh", ds, kk) / math.sqrt(h)
  dk = np.einsum("bnts,btnh->bsnh", ds, q) / math.sqrt(h)
  dv = np.einsum("bnts,btnh->bsnh", p, g)
  fold = lambda x: x.reshape(b, t, k.shape[2], group, h).sum(3)  # noqa: E731  Sum over each group's heads.
  return out, dq, fold(dk), fold(dv)


def inputs(seed, b, t, n, kv, h):
  rng = np.random.default_rng(seed)
  q, g = (rng.standard_normal((b, t, n, h)).astype(np.float32) for _ in range(2))
  k, v = (rng.standard_normal((b, t, kv, h)).astype(np.float32) for _ in range(2))
  return q, k, v, g


def documents(t, *lengths_per_row):
  """(rows, t) segment ids 1, 2, ... for the given document lengths (the last document fills the row)."""
  rows = []
  for lengths in lengths_per_row:
    ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    rows.append(np.concatenate([ids, np.full(t - len(ids), len(lengths) + 1)]))
  return np.stack(rows).astype(np.int32)


def values_and_grads(fn, q, k, v, segment_ids, g):
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
  return (out, *vjp(jnp.asarray(g)))


def assert_matches(got, want, terms):
  """Every array within float32 rounding of `terms`-term reductions, scaled to the array's largest value.

  Each value passes through an H-term logit and sums over up to T keys
  (terms = T + H), so its rounding error grows like eps * sqrt(terms) times
  the magnitudes involved; a factor 4 covers the exp, the normaliser and the
  online softmax's rescaling. (Seen: at most a quarter of this bound.)
  """
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    a = np.asarray(a, np.float64)
    tol = 4 * EPS32 * math.sqrt(terms) * np.abs(b).max()
    err = np.abs(a - b).max()
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


xla = jax.jit(lambda q, k, v, s: attention.dot_product_attention(q, k, v, s))

CASES = {
    # T a multiple of the block: 2 x 2 blocks of 128, no segments, 2 query heads per kv head.
    "causal_gqa": dict(shape=(2, 256, 4, 2, 64), segments=None, block=128),
    # T = 320 is padded to 384 (default blocks of 128); documents of one token, and one
    # across a block boundary; all four query heads on one kv head.
    "segments_padded_mqa": dict(shape=(2, 320, 4, 1, 64), segments=[(100, 1, 149), (1, 128, 1)], block=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_splash_matches_reference(case):
  spec = CASES[case]
  b, t, n, kv, h = spec["shape"]
  q, k, v, g = inputs(0, b, t, n, kv, h)
  segments = None if spec["segments"] is None else documents(t, *spec["segments"])
  splash = jax.jit(lambda q, k, v, s: attention.splash_attention(q, k, v, s, interpret=True, block=spec["block"]))
  want = reference(q, k, v, segments, g)
  got_splash = values_and_grads(splash, q, k, v, segments, g)
  assert_matches(got_splash, want, t + h)
  got_xla = values_and_grads(xla, q, k, v, segments, g)
  assert_matches(got_xla, want, t + h)


def splash_on_mesh(monkeypatch, mesh_shape, seed, b, t, n, kv, h, segments):
  """(the (queries, keys) shapes each device's kernel saw, values and gradients) of splash attention
  on a mesh of `mesh_shape`; the shapes are recorded by a spy on the per-device kernel."""
  q, k, v, g = inputs(seed, b, t, n, kv, h)
  seen = []
  per_device = attention._splash_per_device  # pylint: disable=protected-access

  def spy(q, k, v, *rest, **kwargs):
    seen.append((q.shape, k.shape))
    return per_device(q, k, v, *rest, **kwargs)
  monkeypatch.setattr(attention, "_splash_per_device", spy)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape)])
  with sharding.mesh_context(mesh, sharding.rules_tuple(config_lib.DEFAULT_RULES)):
    got = values_and_grads(jax.jit(lambda q, k, v, s: attention.attend(q, k, v, s, "splash")), q, k, v,
                           segments, g)
  return seen, got, reference(q, k, v, segments, g)


@pytest.mark.slow
def test_splash_on_a_mesh_shards_rows_and_heads(monkeypatch):
  """On a (2,2,2) mesh each device runs the kernel on its 1 of 4 rows and 2 of 4 query heads
  (1 of 2 kv heads), and the result is still the reference's."""
  b, t, n, kv, h = 4, 192, 4, 2, 64
  segments = documents(t, (64, 1, 100), (1, 191), (191,), (30, 30, 30))
  seen, got, want = splash_on_mesh(monkeypatch, (2, 2, 2), 1, b, t, n, kv, h, segments)
  assert seen == [((1, 2, 256, h), (1, 1, 256, h))]  # T = 192 padded to 256.
  assert_matches(got, want, t + h)


def run_step(attention_name, shape, workdir):
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(**{"model.attention": attention_name, "mesh.shape": shape, "mesh.num_devices": 0})
  trainer = train_lib.Trainer(config, str(workdir), devices=jax.devices()[:math.prod(shape)])
  state = step_lib.init_state(trainer.model, trainer.tx, trainer.mesh, trainer.rules, config.data.seq_len,
                               config.seed)
  b, t = config.data.global_batch_size, config.data.seq_len
  tokens = np.random.default_rng(2).integers(0, config.model.vocab_size, (b, t + 1)).astype(np.int32)
  segments = documents(t, *[(5, 1, 20), (1, 30), (31,), (10, 10)] * (b // 4))
  positions = np.concatenate([np.arange(t)[None]] * b)
  for row in range(b):  # Positions restart at 0 in each document.
    starts = np.r_[0, np.flatnonzero(np.diff(segments[row])) + 1]
    positions[row] -= np.repeat(starts, np.diff(np.r_[starts, t]))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((b, t), np.float32),
           "segment_ids": segments, "positions": positions.astype(np.int32)}
  _, metrics = trainer.train_step(state, sharding.make_global_batch(batch, trainer.mesh))
  return step_lib.host_metrics(metrics)


@pytest.mark.slow
def test_train_step_with_splash_equals_xla(monkeypatch, tmp_path):
  """One train step on a (2,2,2) mesh with packed documents: the same loss and gradient norm.

  Tolerance: the two kernels' outputs differ by float32 rounding of T + H
  term reductions (test above); the loss and gradient norm, sums of smooth
  functions of them, move by the same relative amount.
  """
  xla_metrics = run_step("xla", (2, 2, 2), tmp_path / "xla")
  calls = []
  per_device = attention._splash_per_device  # pylint: disable=protected-access
  monkeypatch.setattr(attention, "_splash_per_device", lambda *a, **kw: calls.append(1) or per_device(*a, **kw))
  splash_metrics = run_step("splash", (2, 2, 2), tmp_path / "splash")
  assert calls  # The model did run the splash kernel.
  rel = 4 * EPS32 * math.sqrt(32 + 16)  # T = 32, H = 16 in the tiny config.
  assert splash_metrics["loss"] == pytest.approx(xla_metrics["loss"], rel=rel)
  assert splash_metrics["grad_norm"] == pytest.approx(xla_metrics["grad_norm"], rel=rel)


@pytest.mark.parametrize("seq_len, block, expected", [
    (256, None, (256, 256)), (200, None, (256, 256)), (320, None, (384, 128)), (1024, None, (1024, 512)),
    (2048, None, (2048, 512)), (32, None, (128, 128)), (256, 128, (256, 128)), (200, 128, (256, 128)),
])
def test_splash_blocks(seq_len, block, expected):
  assert attention.splash_blocks(seq_len, block) == expected


@pytest.mark.parametrize("requested, backend, dtype, head_dim, seq_len, segmented, cuda, chosen, reason", [
    ("auto", "tpu", "float32", 64, 1024, True, False, "splash", "TPU"),
    ("auto", "gpu", "bfloat16", 128, 1024, True, True, "cudnn", "CUDA"),
    ("auto", "gpu", "float32", 128, 1024, False, True, "xla", "bfloat16 or float16"),
    ("auto", "gpu", "bfloat16", 160, 1024, False, True, "xla", "<= 128"),  # A pre-Hopper GPU.
    ("auto", "gpu", "bfloat16", 128, 1023, True, True, "xla", "even sequence length"),
    ("auto", "gpu", "bfloat16", 128, 1024, False, False, "xla", "gpu"),  # A GPU without cuDNN.
    ("auto", "cpu", "bfloat16", 128, 1024, False, False, "xla", "cpu"),
    ("splash", "cpu", "float32", 16, 32, True, False, "splash", "interpret"),
    ("splash", "tpu", "float32", 16, 32, True, False, "splash", "Mosaic"),
    ("xla", "tpu", "bfloat16", 128, 1024, False, False, "xla", "configured"),
])
def test_auto_choice(requested, backend, dtype, head_dim, seq_len, segmented, cuda, chosen, reason):
  got, why = attention.choose(requested, backend=backend, dtype=dtype, head_dim=head_dim, seq_len=seq_len,
                              segmented=segmented, cuda=cuda, max_head_dim=128)
  assert got == chosen and reason in why


def test_attend_logs_its_choice(caplog, monkeypatch):
  monkeypatch.setattr(attention, "_logged", set())  # Each choice is logged once per process.
  q = jnp.zeros((1, 8, 2, 8))
  with caplog.at_level("INFO"):
    attention.attend(q, q, q, None, "auto")
  assert "model.attention=auto: xla (auto on cpu)" in caplog.text


@pytest.mark.parametrize("overrides, message", [
    ({"model.attention": "flash"}, "model.attention: must be one of"),
    ({"model.attention": "cudnn"}, "model.attention: cuDNN needs bfloat16 or float16 inputs, got float32"),
    ({"model.attention": "cudnn", "model.dtype": "bfloat16", "model.n_heads": 2, "model.n_kv_heads": 2},
     "model.attention: cudnn needs an NVIDIA GPU, the backend here is cpu"),
])
def test_config_rejects(tiny_config, overrides, message):
  with pytest.raises(config_lib.ConfigError, match="^" + message):
    config_lib.validate(tiny_config(**overrides))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU (JAX_PLATFORMS=cuda)")
def test_cudnn_matches_reference():
  """bfloat16 inputs; the reference takes the same rounded inputs, so the error is the kernel's
  bfloat16 roundings (2^-8 relative each) of the probabilities, the output and, backward, the
  score gradients and the results: a few of them, its sums accumulating in float32."""
  b, t, n, kv, h = 2, 256, 4, 2, 64
  q, k, v, g = (jnp.asarray(x, jnp.bfloat16) for x in inputs(3, b, t, n, kv, h))
  segments = documents(t, (100, 1, 100), (1, 255))
  cudnn = jax.jit(lambda q, k, v, s: attention.dot_product_attention(q, k, v, s, implementation="cudnn"))
  got = values_and_grads(cudnn, q, k, v, segments, g)
  want = reference(*(np.asarray(x, np.float32) for x in (q, k, v)), segments, np.asarray(g, np.float32))
  for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
    err = np.abs(np.asarray(a, np.float64) - w).max()
    assert err <= 8 * 2.0 ** -8 * np.abs(w).max(), f"{name}: max error {err:.3g}"


@pytest.mark.slow
def test_plan_shows_splash_saves_the_score_memory(tiny_config):
  """The compiled train step's temporaries without the XLA path's saved [B, N, T, T] float32
  probabilities: splash needs at least L * B * N * T^2 * 4 bytes less (T = 256, one device)."""
  from mile_jax import plan as plan_lib  # pylint: disable=import-outside-toplevel
  t, b = 256, 2
  plans = {name: plan_lib.plan(tiny_config(**{"model.attention": name, "model.max_seq_len": t, "data.seq_len": t,
                                              "data.global_batch_size": b}), jax.devices()[:1])
           for name in ("xla", "splash")}
  assert [p.attention for p in plans.values()] == ["xla", "splash"]
  layers, heads = 2, 4
  assert plans["xla"].temp_bytes - plans["splash"].temp_bytes >= layers * b * heads * t * t * 4


@pytest.mark.slow
def test_splash_shards_query_heads_when_kv_heads_do_not_divide_the_tensor_axis(monkeypatch):
  """4 query heads on 2 kv heads over a tensor axis of 4: each device computes 1 query head
  with (a copy of) the kv head it reads, not all 4 heads, and the result is the reference's."""
  b, t, n, kv, h = 2, 128, 4, 2, 64
  seen, got, want = splash_on_mesh(monkeypatch, (2, 1, 4), 3, b, t, n, kv, h, documents(t, (50, 78), (128,)))
  assert seen == [((1, 1, 128, h), (1, 1, 128, h))]
  assert_matches(got, want, t + h)

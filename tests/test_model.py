"""The decoder: causality, document segmentation, parameter counts of the paper's sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mile_jax import config_lib
from mile_jax.core import model as model_lib

TINY = model_lib.DecoderConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                               max_seq_len=64, init_std=0.2)


@pytest.fixture(scope="module")
def tiny():
  model = model_lib.Decoder(TINY)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  return model, nn.unbox(params), jax.jit(lambda p, t, s=None: model.apply({"params": p}, t, segment_ids=s))


def test_logits_shape_and_dtype(tiny):
  _, params, apply = tiny
  logits = apply(params, jnp.zeros((3, 16), jnp.int32))
  assert logits.shape == (3, 16, TINY.vocab_size) and logits.dtype == jnp.float32


def test_causal(tiny):
  """Changing token t+1 never changes the logits at positions <= t."""
  _, params, apply = tiny
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TINY.vocab_size, (1, 16))
  base = np.asarray(apply(params, tokens))
  for t in (0, 5, 14):
    changed = tokens.copy()
    changed[0, t + 1:] = (changed[0, t + 1:] + 1 + rng.integers(0, 50, 15 - t)) % TINY.vocab_size
    out = np.asarray(apply(params, changed))
    np.testing.assert_array_equal(out[0, :t + 1], base[0, :t + 1])
    assert np.abs(out[0, t + 1:] - base[0, t + 1:]).max() > 1e-4


def test_segment_ids_stop_attention_across_documents(tiny):
  """With segments, the second document's logits equal those of that document alone
  (positions restarting at 0 through `positions`), whatever precedes it."""
  model, params, _ = tiny
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, TINY.vocab_size, 6), rng.integers(0, TINY.vocab_size, 10)
  packed = np.concatenate([doc_a, doc_b])[None]
  segments = np.array([[1] * 6 + [2] * 10])
  positions = np.array([list(range(6)) + list(range(10))])
  out = model.apply({"params": params}, packed, positions=positions, segment_ids=segments)
  alone = model.apply({"params": params}, doc_b[None])
  np.testing.assert_allclose(np.asarray(out[0, 6:]), np.asarray(alone[0]), rtol=1e-5, atol=1e-6)
  unsegmented = model.apply({"params": params}, packed, positions=positions)
  assert np.abs(np.asarray(unsegmented[0, 6:]) - np.asarray(alone[0])).max() > 1e-4


def test_grouped_query_attention_matches_repeated_heads():
  """GQA with K kv-heads equals full attention whose key/value heads are repeated."""
  gqa_cfg = model_lib.DecoderConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=32,
                                    init_std=0.3)
  mha_cfg = model_lib.DecoderConfig(**{**gqa_cfg.__dict__, "n_kv_heads": 4})
  tokens = jnp.arange(12)[None] % 50
  params = model_lib.Decoder(gqa_cfg).init(jax.random.key(1), tokens)["params"]
  params = nn.unbox(params)
  mha_params = jax.tree.map(lambda x: x, params)
  attention = dict(mha_params["layer_0"]["attention"])
  for name in ("key", "value"):
    attention[name] = {"kernel": jnp.repeat(params["layer_0"]["attention"][name]["kernel"], 2, axis=1)}
  mha_params["layer_0"] = dict(mha_params["layer_0"], attention=attention)
  out_gqa = model_lib.Decoder(gqa_cfg).apply({"params": params}, tokens)
  out_mha = model_lib.Decoder(mha_cfg).apply({"params": mha_params}, tokens)
  np.testing.assert_allclose(np.asarray(out_gqa), np.asarray(out_mha), rtol=1e-4, atol=1e-5)


def test_bfloat16_logits_accumulate_in_float32(tiny):
  """bfloat16 compute: the logits are float32 and equal the float64 product of the bfloat16 hidden states and
  bfloat16-rounded unembedding within float32 accumulation error (d exact products: |error| <=
  2 sqrt(d) eps32 sum_k |h_k w_kv|), not bfloat16's 2^-8 relative rounding."""
  _, params, _ = tiny  # float32 parameters serve any compute dtype.
  model = model_lib.Decoder(model_lib.DecoderConfig(**{**TINY.__dict__, "dtype": "bfloat16"}))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 16)))
  logits, captured = model.apply({"params": params}, tokens, mutable=["intermediates"],
                                 capture_intermediates=lambda module, _: module.name == "final_norm")
  (hidden,) = captured["intermediates"]["final_norm"]["__call__"]  # (B, T, D), the unembedding's input
  assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
  h = np.asarray(hidden, np.float64)
  w = np.asarray(jnp.asarray(params["lm_head"]["kernel"], jnp.bfloat16), np.float64)
  bound = 2 * np.sqrt(TINY.d_model) * 2.0 ** -24 * (np.abs(h) @ np.abs(w))
  assert (np.abs(np.asarray(logits, np.float64) - h @ w) <= bound).all()
  assert np.abs(h @ w).max() > 1.0  # Logits large enough that bfloat16 rounding would exceed the bound.


def test_float16_is_rejected_with_a_pointer_to_bfloat16(tiny_config):
  with pytest.raises(config_lib.ConfigError, match=r"^model\.dtype: float16 .*use bfloat16") as error:
    config_lib.validate(tiny_config(**{"model.dtype": "float16"}))
  assert "\n" not in str(error.value)
  config_lib.validate(tiny_config(**{"model.dtype": "bfloat16"}))


@pytest.mark.parametrize("size,expected", [("468m", 468.2e6), ("1b", 1.205e9), ("7b", 6.74e9)])
def test_paper_parameter_counts(size, expected):
  config = config_lib.paper_config(size)
  # bfloat16 compute with the chunked loss, which never holds the [tokens, 32000] float32 logits.
  assert (config.model.dtype, config.loss.impl) == ("bfloat16", "chunked")
  cfg = model_lib.DecoderConfig.from_config(config.model)
  n = model_lib.count_params(model_lib.abstract_params(cfg))
  assert abs(n - expected) / expected < 0.01, n


def test_every_parameter_has_logical_names():
  params = model_lib.abstract_params(TINY)
  boxes = jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "names"))
  assert boxes and all(hasattr(b, "names") and len(b.names) == b.value.ndim for b in boxes)


def test_rope_rotation_preserves_norm_and_relative_phase():
  rng = np.random.default_rng(2)
  q = rng.standard_normal((1, 1, 1, 8)).astype(np.float32)
  k = rng.standard_normal((1, 1, 1, 8)).astype(np.float32)
  rot = lambda x, p: np.asarray(model_lib.apply_rope(jnp.asarray(x), jnp.array([[p]]), 10000.0))
  np.testing.assert_allclose(np.linalg.norm(rot(q, 7)), np.linalg.norm(q), rtol=1e-5)
  # <R(m) q, R(n) k> depends on m - n only.
  np.testing.assert_allclose(np.sum(rot(q, 9) * rot(k, 4)), np.sum(rot(q, 15) * rot(k, 10)), rtol=1e-4)
  # Hand value: the first frequency is 1 rad per position, pairing dims 0 and 4.
  e0 = np.zeros((1, 1, 1, 8), np.float32)
  e0[..., 0] = 1.0
  out = rot(e0, 1)
  np.testing.assert_allclose([out[0, 0, 0, 0], out[0, 0, 0, 4]], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)

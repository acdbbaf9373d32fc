"""Scanned blocks (`model.scan_layers`): the same loss, gradients, logits and decoding as the
unrolled blocks, parameters converted between the two layouts, and the setting's default."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from mile_jax import config_lib
from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.core import step as step_lib
from mile_jax.evaluation import generation

EPS32 = 2.0 ** -24
TINY = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, init_std=0.2)


def configs(**overrides):
  unrolled = model_lib.DecoderConfig(**{**TINY, **overrides})
  return unrolled, model_lib.DecoderConfig(**{**TINY, **overrides, "scan_layers": True})


def unrolled_params(cfg, seed=0):
  return nn.unbox(model_lib.Decoder(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def batch(vocab, b=4, t=24, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  segments = np.repeat(np.array([[1] * 10 + [2] * (t - 10)]), b, 0).astype(np.int32)
  positions = np.where(segments == 1, np.arange(t), np.arange(t) - 10).astype(np.int32)
  mask = (rng.random((b, t)) > 0.1).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "segment_ids": segments,
          "positions": positions}


def assert_close(got, want, terms):
  """float32 rounding of `terms`-term reductions, scaled to the largest value of each array;
  a factor 8 covers the layers and normalisations the error passes through."""
  def check(path, a, b):
    b = np.asarray(b, np.float64)
    tol = 8 * EPS32 * math.sqrt(terms) * max(np.abs(b).max(), 1e-30)
    assert np.abs(np.asarray(a, np.float64) - b).max() <= tol, jax.tree_util.keystr(path)
  jax.tree_util.tree_map_with_path(check, got, want)


def test_layouts_convert_both_ways_and_stack_on_a_leading_axis():
  unrolled, _ = configs()
  params = unrolled_params(unrolled)
  scanned = model_lib.scanned_layers(params, 3)
  assert sorted(scanned) == ["embed", "final_norm", "layers", "lm_head"]
  q = scanned["layers"]["attention"]["query"]["kernel"]
  assert q.shape == (3, 32, 4, 8)
  np.testing.assert_array_equal(q[2], params["layer_2"]["attention"]["query"]["kernel"])
  back = model_lib.unrolled_layers(scanned, 3)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), back, params)))
  # Optimizer moments shaped like the parameters convert alike; a converted tree is left as it is.
  opt = {"mu": params, "count": np.int32(3)}
  assert model_lib.scanned_layers(opt, 3)["mu"]["layers"]["mlp"]["up"]["kernel"].shape == (3, 32, 64)
  assert model_lib.scanned_layers(scanned, 3) is not None and "layers" in model_lib.scanned_layers(scanned, 3)


def test_scanned_init_has_the_layout_and_logical_names():
  _, scanned = configs()
  boxed = model_lib.Decoder(scanned).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  kernel = boxed["layers"]["mlp"]["down"]
  assert kernel["kernel"].names == ("layers", "mlp", "embed")
  assert nn.unbox(boxed)["layers"]["mlp"]["down"]["kernel"].shape == (3, 64, 32)


@pytest.mark.parametrize("remat,impl", [("none", "naive"), ("full", "chunked")])
def test_scanned_loss_and_gradients_equal_unrolled(remat, impl):
  unrolled, scanned = configs(remat=remat)
  params = unrolled_params(unrolled)
  loss_config = make_tiny_config(**{"loss.impl": impl, "loss.block_size": 32}).loss
  data = batch(unrolled.vocab_size)

  def loss_and_grads(cfg, p):
    def numerator(p):
      sums = step_lib.loss_sums_fn(p, data, model=model_lib.Decoder(cfg), loss_config=loss_config)
      return sums["loss_numerator"] / sums["loss_denominator"]
    return jax.jit(jax.value_and_grad(numerator))(p)

  want_loss, want_grads = loss_and_grads(unrolled, params)
  got_loss, got_grads = loss_and_grads(scanned, model_lib.scanned_layers(params, 3))
  terms = unrolled.d_ff + unrolled.vocab_size
  assert abs(float(got_loss) - float(want_loss)) <= 8 * EPS32 * math.sqrt(terms) * abs(float(want_loss))
  assert_close(model_lib.unrolled_layers(got_grads, 3), want_grads, terms * data["inputs"].size)


def test_scanned_blocks_without_remat_compute_no_matmul_twice_and_store_no_elementwise_result():
  """remat "none", scanned: the step computes each matmul once, as many `dot_general`s as one
  unrolled layer's program, and of the feed-forward's [layers, B, T, d_ff] activations the scan
  stores only the two matmul outputs (gate and up), not silu(gate) or the product, which the
  backward pass recomputes (as XLA's fusions do unrolled)."""
  one_layer, _ = configs(n_layers=1, d_ff=48)
  _, scanned = configs(d_ff=48)
  tokens = jnp.zeros((2, 16), jnp.int32)

  def loss_and_params(cfg):
    decoder = model_lib.Decoder(cfg)
    params = nn.unbox(decoder.init(jax.random.key(0), tokens)["params"])
    return (lambda p: decoder.apply({"params": p}, tokens).sum()), params

  def dot_generals(cfg):
    loss, params = loss_and_params(cfg)
    return jax.jit(jax.grad(loss)).lower(params).as_text().count("stablehlo.dot_general")

  assert dot_generals(scanned) == dot_generals(one_layer)
  loss, params = loss_and_params(scanned)
  _, backward = jax.vjp(loss, params)  # Its leaves are the residuals the backward pass reads.
  stored = [leaf.shape for leaf in jax.tree.leaves(backward)]
  assert stored.count((3, 2, 16, 48)) == 2


def test_scanned_decoding_with_the_cache_equals_unrolled():
  unrolled, scanned = configs()
  params = unrolled_params(unrolled, seed=4)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  prompts = [[5, 9, 1, 40], [7, 7], [60, 3, 2, 1, 8, 9]]
  want = generation.GreedyGenerator(unrolled, mesh).generate(params, prompts, 6)
  got = generation.GreedyGenerator(scanned, mesh).generate(model_lib.scanned_layers(params, 3), prompts, 6)
  assert got == want


def test_scan_layers_unset_scans_deep_models_only():
  c = config_lib.base_config()
  assert c.model.scan_layers is None
  for layers, expected in ((model_lib.SCAN_LAYERS_FROM - 1, False), (model_lib.SCAN_LAYERS_FROM, True)):
    c.model.n_layers = layers
    assert model_lib.DecoderConfig.from_config(c.model).scan_layers is expected
  c.model.scan_layers = False
  assert model_lib.DecoderConfig.from_config(c.model).scan_layers is False
  for size in ("468m", "1b", "7b"):
    assert config_lib.paper_config(size).model.scan_layers is True


def test_scanned_parameters_shard_like_unrolled_ones_on_a_mesh():
  """The stacked axis stays whole on every device; the other axes follow the usual rules."""
  _, scanned = configs(n_heads=4, n_kv_heads=4)
  mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
  boxed = jax.eval_shape(lambda: model_lib.Decoder(scanned).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  shardings = sharding.logical_shardings(boxed["params"], mesh, config_lib.DEFAULT_RULES)
  spec = jax.sharding.PartitionSpec
  assert shardings["layers"]["attention"]["query"]["kernel"].spec == spec(None, "fsdp", "tensor", None)
  assert shardings["layers"]["mlp"]["down"]["kernel"].spec == spec(None, "tensor", "fsdp")


def test_hugging_face_layout_reads_and_writes_either_layout():
  """to_hf of scanned parameters is to_hf of the unrolled ones; from_hf into a scanned model
  places the same arrays as from_hf into an unrolled one, stacked."""
  from mile_jax.hf import layout as hf_layout  # pylint: disable=import-outside-toplevel
  unrolled, scanned = configs(vocab_size=96)  # Divisible by the mesh's axes.
  params = jax.tree.map(np.asarray, unrolled_params(unrolled, seed=5))
  tensors = hf_layout.to_hf(params, 3)
  from_scanned = hf_layout.to_hf(model_lib.scanned_layers(params, 3), 3)
  assert sorted(from_scanned) == sorted(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(from_scanned[name], value, err_msg=name)
  abstract = jax.eval_shape(lambda: nn.unbox(model_lib.Decoder(scanned).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
  tree, _ = hf_layout.from_hf(tensors, abstract, 3, unrolled.head_dim)
  mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
  shardings = sharding.logical_shardings(
      model_lib.Decoder(scanned).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"], mesh,
      config_lib.DEFAULT_RULES)
  placed = hf_layout.place(tree, shardings)
  want = model_lib.scanned_layers(params, 3)
  assert jax.tree.structure(placed) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, want)


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_a_checkpoint_restores_into_the_other_layout(tiny_config, tmp_path, saved_scanned):
  """A state saved with one layer layout restores, optimizer moments included, into a run with the
  other (on another mesh), equal to the saved values stacked or split; so do the parameters alone."""
  from test_checkpoint import random_state  # pylint: disable=import-outside-toplevel
  from mile_jax import train_lib  # pylint: disable=import-outside-toplevel
  from mile_jax.run import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  saver = train_lib.Trainer(tiny_config(**{"model.scan_layers": saved_scanned}), workdir)
  expected, state = random_state(saver, seed=3)
  saver.checkpointer.save(5, state)
  saver.checkpointer.wait()
  config = tiny_config(**{"model.scan_layers": not saved_scanned, "mesh.shape": (1, 2, 2), "mesh.num_devices": 0})
  trainer = train_lib.Trainer(config, workdir, devices=jax.devices()[:4])
  restored = trainer.initial_state()
  want = model_lib.with_layout(expected, not saved_scanned)
  assert jax.tree.structure(restored) == jax.tree.structure(jax.tree.map(jnp.asarray, want))
  jax.tree.map(lambda r, e: np.testing.assert_array_equal(np.asarray(jax.device_get(r)), e), restored, want)
  jax.tree.map(lambda r, s: r.sharding.is_equivalent_to(s, r.ndim) or pytest.fail(str((r.sharding, s))),
               restored, trainer.state_shardings)
  abstract = checkpoint_lib.abstract_with_shardings(trainer.abstract_state.params, trainer.state_shardings.params)
  params = trainer.checkpointer.restore_params(5, abstract)
  jax.tree.map(lambda r, e: np.testing.assert_array_equal(np.asarray(jax.device_get(r)), e), params, want.params)

"""The same step on any mesh: 1 device vs (2,2,2) and (8,1,1) of fake CPU devices."""

import jax
import numpy as np
import pytest

from mile_jax import sharding
from mile_jax import train_lib


def synthetic_batch(seed, batch, seq_len, vocab):
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  mask = np.ones((batch, seq_len), np.float32)
  mask[0, :5] = 0.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def run_steps(config, devices, steps=2):
  trainer = train_lib.Trainer(config, "/tmp/unused-workdir", devices=devices)
  state = train_lib.init_state(trainer.model, trainer.tx, trainer.mesh, trainer.rules,
                               config.data.seq_len, config.seed)
  losses = []
  for step in range(steps):
    batch = synthetic_batch(step, config.data.global_batch_size, config.data.seq_len, config.model.vocab_size)
    state, metrics = trainer.train_step(state, sharding.make_global_batch(batch, trainer.mesh))
    losses.append(train_lib.host_metrics(metrics)["loss"])
  return state, losses


@pytest.fixture(scope="module")
def single_device_run():
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  return run_steps(make_tiny_config(), jax.devices()[:1])


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1), (1, 4, 2)])
def test_mesh_gives_same_loss_and_params(shape, single_device_run, tiny_config):
  ref_state, ref_losses = single_device_run
  state, step_losses = run_steps(tiny_config(**{"mesh.shape": shape}), jax.devices())
  np.testing.assert_allclose(step_losses, ref_losses, rtol=1e-5)
  for ref, got in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)


def test_parameters_are_sharded_as_the_rules_say(tiny_config):
  config = tiny_config(**{"mesh.shape": (2, 2, 2), "mesh.num_devices": 0})
  trainer = train_lib.Trainer(config, "/tmp/unused-workdir")
  state = train_lib.init_state(trainer.model, trainer.tx, trainer.mesh, trainer.rules, 32, 0)
  gate = state.params["layer_0"]["mlp"]["gate"]["kernel"]  # (embed, mlp) -> (fsdp, tensor)
  assert tuple(gate.sharding.spec) == ("fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == (64 // 2, 128 // 2)
  query = state.params["layer_0"]["attention"]["query"]["kernel"]  # (embed, heads, kv)
  assert tuple(query.sharding.spec) == ("fsdp", "tensor", None)
  assert query.addressable_shards[0].data.shape == (32, 2, 16)
  embed = state.params["embed"]["embedding"]  # (vocab, embed) -> (tensor, fsdp)
  assert embed.addressable_shards[0].data.shape == (256, 32)
  norm = state.params["final_norm"]["scale"]
  assert norm.addressable_shards[0].data.shape == (64,)
  # Adam's moments follow their parameters.
  mu = state.opt_state[1][0].mu["layer_0"]["mlp"]["gate"]["kernel"]
  assert tuple(mu.sharding.spec) == ("fsdp", "tensor")


def test_mesh_shape_must_match_device_count():
  with pytest.raises(ValueError, match="mesh.shape"):
    sharding.make_mesh((3, 1, 1))
  assert sharding.resolve_mesh_shape((2, -1, 1), 8) == (2, 4, 1)
  with pytest.raises(ValueError, match="mesh.shape"):
    sharding.resolve_mesh_shape((3, -1, 1), 8)


def test_microbatches_give_the_full_batch_step(single_device_run, tiny_config):
  """Gradient accumulation keeps MiLe's global normaliser exact."""
  ref_state, ref_losses = single_device_run
  state, step_losses = run_steps(tiny_config(**{"train.microbatches": 4}), jax.devices()[:1])
  np.testing.assert_allclose(step_losses, ref_losses, rtol=1e-5)
  for ref, got in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)

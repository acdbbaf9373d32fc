"""The same step on any mesh: 1 device vs (2,2,2) and (8,1,1) of fake CPU devices."""

import functools
import re
import types

import jax
import numpy as np
import pytest

from conftest import count_in_loops
from mile_jax import plan
from mile_jax import train_lib
from mile_jax.core import sharding
from mile_jax.core import step as step_lib


def synthetic_batch(seed, batch, seq_len, vocab):
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  mask = np.ones((batch, seq_len), np.float32)
  mask[0, :5] = 0.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


# Losses and gradient norms are float32 sums over B*T targets of V logits each: relative error about
# eps * sqrt(B*T*V) = 2.2e-5 for the tiny config (seen: 3e-7).
SUM_RTOL = 2.0 ** -24 * np.sqrt(8 * 32 * 512)


def run_steps(config, devices, workdir, steps=2):
  """`steps` train steps on synthetic batches, every one at the peak learning rate (no warm-up).

  Returns (initial params, final state, [steps, 2] array of each step's loss and gradient norm).
  """
  config.optim.warmup_steps = 0
  trainer = train_lib.Trainer(config, str(workdir), devices=devices)
  state = step_lib.init_state(trainer.model, trainer.tx, trainer.mesh, trainer.rules,
                               config.data.seq_len, config.seed)
  initial = jax.device_get(state.params)  # the step donates its state
  records = []
  for step in range(steps):
    batch = synthetic_batch(step, config.data.global_batch_size, config.data.seq_len, config.model.vocab_size)
    state, metrics = trainer.train_step(state, sharding.make_global_batch(batch, trainer.mesh))
    values = step_lib.host_metrics(metrics)
    records.append((values["loss"], values["grad_norm"]))
  return initial, state, np.array(records)


def _distance(a, b) -> float:
  return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y)) ** 2)
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


def assert_same_steps(run, reference):
  """Each step's loss and gradient norm (before clipping) agree, and so does the update.

  Adam divides each gradient element by its own scale, so an element whose gradient is at the
  rounding level of its sums can move by up to 2 x lr either way; the updates are compared as a
  whole: |p - p_ref| below 1e-3 of |p_ref - p_initial| (seen: 1.6e-5) allows a few dozen such
  elements out of 110k, and a wrong gradient in any part of the model moves it by far more.
  """
  (_, state, records), (initial, ref_state, ref_records) = run, reference
  np.testing.assert_allclose(records, ref_records, rtol=SUM_RTOL)
  update = _distance(ref_state.params, initial)
  assert update > 1.0  # Two real Adam steps: about lr = 3e-3 per element, over 110k elements.
  assert _distance(state.params, ref_state.params) < 1e-3 * update


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  return run_steps(make_tiny_config(), jax.devices()[:1], tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1), (1, 4, 2)])
def test_mesh_gives_same_loss_and_params(shape, single_device_run, tiny_config, tmp_path):
  assert_same_steps(run_steps(tiny_config(**{"mesh.shape": shape}), jax.devices(), tmp_path), single_device_run)


def test_parameters_are_sharded_as_the_rules_say(tiny_config, tmp_path):
  config = tiny_config(**{"mesh.shape": (2, 2, 2), "mesh.num_devices": 0})
  trainer = train_lib.Trainer(config, str(tmp_path))
  state = step_lib.init_state(trainer.model, trainer.tx, trainer.mesh, trainer.rules, 32, 0)
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


def test_microbatches_give_the_full_batch_step(single_device_run, tiny_config, tmp_path):
  """Gradient accumulation keeps MiLe's global normaliser exact."""
  run = run_steps(tiny_config(**{"train.microbatches": 4}), jax.devices()[:1], tmp_path)
  assert_same_steps(run, single_device_run)


def test_eval_step_in_microbatches_sums_the_whole_batch(single_device_run, tiny_config, tmp_path):
  """Strided micro-batches cover every row once: sums equal a float64 NumPy pass over the batch."""
  _, state, _ = single_device_run
  config = tiny_config()
  trainer = train_lib.Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  batch = synthetic_batch(7, config.data.global_batch_size, config.data.seq_len, config.model.vocab_size)
  sums = {}
  for count in (1, 4):
    step = jax.jit(functools.partial(step_lib.eval_step, model=trainer.model, loss_config=config.loss,
                                     microbatches=count))
    with sharding.mesh_context(trainer.mesh, trainer.rules):
      sums[count] = jax.device_get(step(state.params, sharding.make_global_batch(batch, trainer.mesh)))
  logits = np.asarray(trainer.model.apply({"params": state.params}, batch["inputs"]), np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
  entropy = -(np.exp(log_p) * log_p).sum(-1)
  mask = batch["mask"]
  for count in (1, 4):
    np.testing.assert_allclose(sums[count]["ce_sum"], (ce * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums[count]["entropy_sum"], (entropy * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums[count]["tokens"], mask.sum())
  for key in ("loss_numerator", "loss_denominator", "weight_max"):
    np.testing.assert_allclose(sums[4][key], sums[1][key], rtol=1e-5)


def test_tensor_axis_must_stay_inside_a_process():
  fake = lambda i, process: types.SimpleNamespace(id=i, process_index=process)  # noqa: E731
  # 2 processes x 4 devices, process-major: tensor 4 fits inside each process, tensor 8 does not.
  devices = np.array([fake(i, i // 4) for i in range(8)], dtype=object)
  sharding.check_tensor_axis_within_processes(devices.reshape(1, 2, 4))
  sharding.check_tensor_axis_within_processes(devices.reshape(2, 2, 2))
  with pytest.raises(ValueError, match=r"mesh.shape: the tensor axis \(8 devices\) spans processes \[0, 1\].* 4 "):
    sharding.check_tensor_axis_within_processes(devices.reshape(1, 1, 8))
  # Devices interleaved across processes: even a tensor axis of 2 crosses hosts.
  interleaved = np.array([fake(i, i % 2) for i in range(8)], dtype=object)
  with pytest.raises(ValueError, match="spans processes"):
    sharding.check_tensor_axis_within_processes(interleaved.reshape(1, 4, 2))


def test_fsdp_gathers_stay_inside_the_microbatch_loop(tiny_config, tmp_path):
  """Hoisted out of the loop, every layer's gathered weights would live for the whole step."""
  config = tiny_config(**{"mesh.shape": (1, 8, 1), "mesh.num_devices": 0, "train.microbatches": 4,
                          "data.global_batch_size": 32})
  trainer = train_lib.Trainer(config, str(tmp_path))
  text = trainer.lower_train_step(plan.abstract_batch(config)).compile().as_text()
  in_loop, total = count_in_loops(text, lambda line: re.search(r" all-gather(?:-start)?\(", line))
  # 2 layers x 7 matrices + embedding + unembedding, gathered for each micro-batch's forward and backward.
  assert in_loop >= 16 and total >= in_loop

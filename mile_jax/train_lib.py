"""Train state, the jitted train and eval steps, and the training loop."""

import contextlib
import functools
import json
import logging
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from mile_jax import checkpoint as checkpoint_lib
from mile_jax import config_lib
from mile_jax import data as data_lib
from mile_jax import losses
from mile_jax import metrics as metrics_lib
from mile_jax import model as model_lib
from mile_jax import optim
from mile_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  opt_state: Any


def _boxed_init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  """rng -> TrainState whose parameter leaves carry logical-axis boxes."""
  def init(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def state_shardings(model, tx, mesh, rules, seq_len: int):
  """(abstract unboxed TrainState, its NamedShardings) without allocating."""
  boxed = jax.eval_shape(_boxed_init_fn(model, tx, seq_len), jax.random.key(0))
  return nn.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules)


def init_state(model, tx, mesh, rules, seq_len: int, seed: int) -> TrainState:
  """A freshly initialised TrainState placed directly with its shardings."""
  _, shardings = state_shardings(model, tx, mesh, rules, seq_len)
  init = _boxed_init_fn(model, tx, seq_len)
  with mesh_context(mesh, sharding.rules_tuple(rules)):
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.key(seed))


def _microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
  """(B, ...) -> (count, B/count, ...), micro-batch k taking rows k, k+count, ...

  Striding keeps every micro-batch spread over all data-parallel devices.
  """
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1),
                      batch)


def loss_sums_fn(params, batch, *, model: nn.Module, loss_config: Any) -> dict[str, jax.Array]:
  """The loss sums (see `losses.loss_sums`) of one batch under `params`."""
  logits = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"))
  return losses.loss_sums(loss_config.name, logits, batch["targets"], batch["mask"],
                          gamma=loss_config.gamma, sigma=loss_config.sigma)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, loss_config: Any,
               microbatches: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch {inputs, targets, mask}: (B, T) each.

  With micro-batches, gradients of the loss numerator are summed over
  micro-batches and divided once by the global denominator, so the step is
  exactly the full-batch step (MiLe's normaliser included).
  Returns the new state and metric sums (normalised on the host).
  """
  def numerator(params, mb):
    sums = loss_sums_fn(params, mb, model=model, loss_config=loss_config)
    return sums["loss_numerator"], sums

  grad_fn = jax.grad(numerator, has_aux=True)
  if microbatches == 1:
    grads, sums = grad_fn(state.params, batch)
  else:
    def accumulate(carry, mb):
      grads, sums = grad_fn(state.params, mb)
      if carry is None:
        return grads, sums
      return jax.tree.map(jnp.add, carry[0], grads), losses.combine_sums(carry[1], sums)
    mbs = _microbatches(batch, microbatches)
    first = jax.tree.map(lambda x: x[0], mbs)
    carry = accumulate(None, first)
    rest = jax.tree.map(lambda x: x[1:], mbs)
    (grads, sums), _ = jax.lax.scan(lambda c, mb: (accumulate(c, mb), None), carry, rest)

  denominator = sums["loss_denominator"]
  scale = jnp.where(denominator > 0, 1.0 / jnp.where(denominator > 0, denominator, 1.0), 0.0)
  grads = jax.tree.map(lambda g: g * scale, grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  out = dict(sums, grad_norm_sum=grad_norm, learning_rate_sum=schedule(state.step), steps=jnp.ones(()))
  return new_state, out


def eval_step(params, batch, *, model: nn.Module, loss_config: Any) -> dict[str, jax.Array]:
  return loss_sums_fn(params, batch, model=model, loss_config=loss_config)


def host_metrics(summed: dict[str, Any]) -> dict[str, float]:
  """Metric sums accumulated over steps -> per-token and per-step means."""
  summed = jax.device_get(summed)
  _, out = losses.normalize_sums(summed)
  out = {k: float(v) for k, v in out.items()}
  if "steps" in summed:
    steps = float(summed["steps"])
    out["loss"] = float(summed["loss_numerator"] / max(float(summed["loss_denominator"]), 1e-30))
    out["grad_norm"] = float(summed["grad_norm_sum"]) / steps
    out["learning_rate"] = float(summed["learning_rate_sum"]) / steps
  out["perplexity"] = float(np.exp(min(out["ce"], 80.0)))
  return out


def accumulate_metrics(total, new):
  """Adds step metric sums on device (no host sync); `weight_max` takes the max."""
  if total is None:
    return new
  return {k: jnp.maximum(total[k], new[k]) if k == "weight_max" else total[k] + new[k] for k in total}


class Trainer:
  """Builds everything a run needs from a validated config; `run()` trains."""

  def __init__(self, config, workdir: str, devices=None, echo=None):
    config_lib.validate(config)
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.echo = echo or tqdm.tqdm.write
    try:
      self.mesh = sharding.make_mesh(config.mesh.shape, devices)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    dp = sharding.data_parallel_size(self.mesh)
    if config.data.global_batch_size % (dp * config.train.microbatches):
      raise config_lib.ConfigError(
          f"data.global_batch_size: {config.data.global_batch_size} is not divisible by the "
          f"data-parallel size {dp} (mesh data x fsdp) times train.microbatches={config.train.microbatches}")
    self.rules = sharding.rules_tuple(config.mesh.rules)
    self.model_config = model_lib.DecoderConfig.from_config(config.model)
    self.model = model_lib.Decoder(self.model_config)
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)
    self.abstract_state, self.state_shardings = state_shardings(
        self.model, self.tx, self.mesh, self.rules, config.data.seq_len)
    batch_sharding = sharding.batch_sharding(self.mesh)
    step_fn = functools.partial(train_step, model=self.model, tx=self.tx, schedule=self.schedule,
                                loss_config=config.loss, microbatches=config.train.microbatches)
    self._train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, batch_sharding),
                               out_shardings=(self.state_shardings, None), donate_argnums=0)
    self._eval_step = jax.jit(functools.partial(eval_step, model=self.model, loss_config=config.loss),
                              in_shardings=(self.state_shardings.params, batch_sharding))
    self.checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(self.workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save)
    self.data = None

  def _context(self):
    return mesh_context(self.mesh, self.rules)

  def train_step(self, state, batch):
    with self._context():
      return self._train_step(state, batch)

  def initial_state(self) -> TrainState:
    """The latest checkpoint's state if there is one, else a fresh one."""
    latest = self.checkpointer.latest_step()
    if latest is None:
      return init_state(self.model, self.tx, self.mesh, self.rules, self.config.data.seq_len, self.config.seed)
    target = checkpoint_lib.abstract_with_shardings(self.abstract_state, self.state_shardings)
    self.echo(f"Resuming from {self.checkpointer.directory} step {latest}")
    return self.checkpointer.restore(latest, target)

  def load_data(self):
    if self.data is None:
      cfg = self.config
      self.data = data_lib.make_data(cfg.data, cfg.model.vocab_size, cfg.data.seq_len, cfg.seed)
    return self.data

  def local_batch(self, dataset, step: int) -> dict[str, np.ndarray]:
    return dataset.batch(step, self.config.data.global_batch_size, jax.process_index(), jax.process_count())

  def evaluate(self, params) -> dict[str, float]:
    data = self.load_data()
    total = None
    with self._context():
      for i in range(self.config.train.eval_batches):
        batch = sharding.make_global_batch(self.local_batch(data.validation, i), self.mesh)
        total = accumulate_metrics(total, self._eval_step(params, batch))
    return host_metrics(total)

  def run(self, until_step: int | None = None) -> TrainState:
    """Trains to `train.steps` (or stops after `until_step`, saving there),
    resuming from the workdir's latest checkpoint."""
    cfg = self.config
    last = cfg.train.steps if until_step is None else min(until_step, cfg.train.steps)
    data = self.load_data()
    primary = jax.process_index() == 0
    writer = metrics_lib.MetricWriter(self.workdir, enabled=primary, echo=self.echo)
    if primary:
      write_run_files(self.workdir, cfg, data)
    state = self.initial_state()
    start = int(state.step)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = model_lib.flops_per_token(self.model_config, cfg.data.seq_len) * tokens_per_step
    peak = metrics_lib.peak_flops_per_device(cfg.train.peak_flops_per_device) * self.mesh.size
    prefetcher = data_lib.Prefetcher(lambda s: self.local_batch(data.train, s), start, cfg.data.prefetch)
    total, last_time, last_step = None, time.perf_counter(), start
    config_json = json.loads(cfg.to_json_best_effort())
    try:
      for step in tqdm.trange(start, last, initial=start, total=cfg.train.steps,
                              desc="train", disable=not primary, dynamic_ncols=True):
        batch_step, local = prefetcher.next()
        assert batch_step == step, (batch_step, step)
        state, step_metrics = self.train_step(state, sharding.make_global_batch(local, self.mesh))
        total = accumulate_metrics(total, step_metrics)
        done = step + 1
        final = done == last
        if done % cfg.train.log_every == 0 or final:
          scalars = host_metrics(total)
          elapsed = time.perf_counter() - last_time
          scalars["tokens_per_s"] = tokens_per_step * (done - last_step) / elapsed
          scalars["tflops_per_s"] = flops_per_step * (done - last_step) / elapsed / 1e12
          if peak > 0:
            scalars["mfu"] = scalars["tflops_per_s"] * 1e12 / peak
          writer.write(done, scalars, "train")
          total, last_time, last_step = None, time.perf_counter(), done
        if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or final):
          writer.write(done, self.evaluate(state.params), "eval")
          last_time = time.perf_counter()
        if self.checkpointer.should_save(done, final):
          self.checkpointer.save(done, state, config_json)
    finally:
      prefetcher.close()
      self.checkpointer.wait()
      writer.close()
    return state


def write_run_files(workdir: str, config, data) -> None:
  """What eval.py needs besides checkpoints: `config.json`, `tokenizer.model`
  and `token_counts.npy` (int64 [vocab], training-split occurrences per id)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
    f.write(data.tokenizer.serialized_model())
  np.save(os.path.join(workdir, "token_counts.npy"), data.train.token_counts(config.model.vocab_size))


@contextlib.contextmanager
def mesh_context(mesh, rules):
  """Enters the mesh and the logical-axis rules for tracing the model."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Entry point used by train.py."""
  logging.info("JAX devices: %s", jax.devices())
  return Trainer(config, workdir).run()

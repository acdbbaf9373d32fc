"""The training loop: `Trainer` builds a run from its config and `run()` trains it
(the step functions it jits are in `core/step.py`)."""

import functools
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mile_jax import config_lib
from mile_jax import data as data_lib
from mile_jax.core import losses
from mile_jax.core import model as model_lib
from mile_jax.core import optim
from mile_jax.core import sharding
from mile_jax.core import step as step_lib
from mile_jax.data import pipeline as data_pipeline
from mile_jax.evaluation import in_training
from mile_jax.hf import layout as hf_layout
from mile_jax.run import checkpoint as checkpoint_lib
from mile_jax.run import faults
from mile_jax.run import metrics as metrics_lib
from mile_jax.run import profiling
from mile_jax.run import workdir as workdir_lib


class Trainer:
  """Builds everything a run needs from a validated config; `run()` trains."""

  def __init__(self, config, workdir: str, devices=None, echo=None):
    config_lib.validate(config)
    config = hf_layout.with_hf_tokenizer(config)  # init.from_hf: its tokenizer.model unless data.tokenizer_path.
    if not str(workdir).strip():  # resolve() would make it the current directory.
      raise config_lib.ConfigError(f"workdir: must name a directory, got {str(workdir)!r}; pass --workdir DIR")
    self.config = config
    self.workdir = workdir_lib.resolve(workdir)
    self.echo = echo or tqdm.tqdm.write
    try:
      self.mesh = sharding.make_mesh(config.mesh.shape, devices or sharding.select_devices(config.mesh.num_devices))
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    dp = sharding.data_parallel_size(self.mesh)
    if config.data.global_batch_size % (dp * config.train.microbatches):
      raise config_lib.ConfigError(
          f"data.global_batch_size: {config.data.global_batch_size} is not divisible by the "
          f"data-parallel size {dp} (mesh data x fsdp) times train.microbatches={config.train.microbatches}")
    try:
      workdir_lib.check_writable(self.workdir)
    except OSError as e:
      raise config_lib.ConfigError(
          f"workdir: cannot write to {self.workdir} ({e.strerror or e}); choose another --workdir") from None
    except ImportError as e:  # An object-store workdir without its filesystem package.
      raise config_lib.ConfigError(f"workdir: {self.workdir} needs a package: {e} "
                                   f"(gs://: pip install gcsfs; s3://: pip install s3fs)") from None
    if jax.process_index() == 0:
      profiling.check_port(config.train.profile_server_port)
    self.rules = sharding.rules_tuple(config.mesh.rules)
    self.model_config = model_lib.DecoderConfig.from_config(config.model)
    self.model = model_lib.Decoder(self.model_config)
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)
    self.abstract_state, self.state_shardings = step_lib.state_shardings(
        self.model, self.tx, self.mesh, self.rules, config.data.seq_len)
    _check_divisible(self.abstract_state, self.state_shardings, self.mesh)
    batch_sharding = sharding.batch_sharding(self.mesh)
    step_fn = functools.partial(step_lib.train_step, model=self.model, tx=self.tx, schedule=self.schedule,
                                loss_config=config.loss, microbatches=config.train.microbatches,
                                skip_nonfinite=config.train.skip_nonfinite)
    self._train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, batch_sharding),
                               out_shardings=(self.state_shardings, None), donate_argnums=0)
    self._eval_step = jax.jit(functools.partial(step_lib.eval_step, model=self.model, loss_config=config.loss,
                                                microbatches=config.train.microbatches),
                              in_shardings=(self.state_shardings.params, batch_sharding))
    self.checkpointer = checkpoint_lib.Checkpointer(
        workdir_lib.join(self.workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save)
    self.config_json = json.loads(config.to_json_best_effort())
    self.checkpointer.check_compatible(self.abstract_state, self.config_json)
    self.restored_step = None  # The checkpoint step `initial_state` resumed from.
    self.data = None
    # Bucket perplexity and train.eval_tasks; reads the task files now, before anything compiles.
    self.in_loop = in_training.InTrainingEval(config, self.mesh, self.rules, self.model)

  def _context(self):
    return sharding.mesh_context(self.mesh, self.rules)

  def train_step(self, state, batch):
    with self._context():
      return self._train_step(state, batch)

  def lower_train_step(self, abstract_batch):
    """The jitted train step as training runs it (shardings, donated state),
    lowered for the abstract state and `abstract_batch`; nothing is allocated."""
    with self._context():
      return self._train_step.lower(self.abstract_state, abstract_batch)

  def initial_state(self) -> step_lib.TrainState:
    """The newest readable checkpoint's state (an unreadable newer one is
    reported and marked unreadable), else a fresh one: with `init.from_hf` that
    directory's parameters and a fresh optimizer state."""
    target = checkpoint_lib.abstract_with_shardings(self.abstract_state, self.state_shardings)
    found = self.checkpointer.restore_latest(target, warn=self.echo)
    if found is None:
      self.restored_step = None
      hf_dir = self.config.init.from_hf
      if hf_dir:
        params = hf_layout.load_params(hf_dir, self.abstract_state.params, self.model_config.n_layers,
                                       self.model_config.head_dim, echo=self.echo)
        fresh = lambda p: step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p))  # noqa: E731
        self.echo(f"Initialised the parameters from {hf_dir}")
        return jax.jit(fresh, out_shardings=self.state_shardings, donate_argnums=0)(
            hf_layout.place(params, self.state_shardings.params))
      return step_lib.init_state(self.model, self.tx, self.mesh, self.rules, self.config.data.seq_len, self.config.seed)
    self.restored_step, state = found
    self.echo(f"Resuming from {self.checkpointer.step_path(self.restored_step)}")
    return state

  def _check_tokenizer(self, data) -> None:
    """Raises ConfigError if the resumed checkpoint was trained with another tokenizer."""
    if self.restored_step is None:
      return
    try:
      saved = self.checkpointer.restore_meta(self.restored_step)["tokenizer"]
    except Exception:  # pylint: disable=broad-except
      return  # Saved without `meta`: nothing to compare.
    ours = checkpoint_lib.tokenizer_meta(data.tokenizer.serialized_model())["sha256"]
    if saved["sha256"] != ours:
      raise config_lib.ConfigError(
          f"data.tokenizer_path: the tokenizer differs from the one checkpoint "
          f"{self.checkpointer.step_path(self.restored_step)} was trained with (sha256 {ours[:12]} "
          f"against {saved['sha256'][:12]}); set data.tokenizer_path to that one (checkpoint.tokenizer_bytes "
          f"reads it from the checkpoint), or use a new --workdir")

  def load_data(self):
    if self.data is None:
      cfg = self.config
      self.data = data_lib.make_data(cfg.data, cfg.model.vocab_size, cfg.data.seq_len, cfg.seed)
    return self.data

  def local_batch(self, dataset, step: int) -> dict[str, np.ndarray]:
    return dataset.batch(step, self.config.data.global_batch_size, jax.process_index(), jax.process_count())

  def eval_batches(self, split=None) -> int:
    """Validation batches per in-training evaluation of `split` (default the
    validation split): `train.eval_batches`, at most one pass over the split
    (beyond it, rows would count twice)."""
    rows = (self.load_data().validation if split is None else split).rows_per_epoch
    return min(self.config.train.eval_batches, rows // self.config.data.global_batch_size)

  def evaluate(self, params, split=None) -> dict[str, float]:
    """Metrics (`host_metrics`) of the first `eval_batches()` batches of
    `split` (default the validation split; a mixture's components are in
    `data.validation_components`): an estimate; eval.py's `ppl` task scores
    the whole split."""
    split = self.load_data().validation if split is None else split
    total = None
    with self._context():
      for i in range(self.eval_batches(split)):
        batch = sharding.make_global_batch(self.local_batch(split, i), self.mesh)
        total = losses.combine_sums(total, self._eval_step(params, batch))
    return step_lib.host_metrics(total)

  def run(self, until_step: int | None = None) -> step_lib.TrainState:
    """Trains to `train.steps` (or stops after `until_step`, saving there),
    resuming from the workdir's newest readable checkpoint.

    Holds the workdir's lock throughout. SIGTERM/SIGINT (or, on several
    hosts, JAX's preemption sync point) end the run after the current step
    with a checkpoint; a non-finite step raises `faults.NonFiniteError`
    unless `train.skip_nonfinite`, and nothing after it is saved. A workdir
    already trained that far is returned as it is (see `_already_trained`).
    """
    cfg = self.config
    last = cfg.train.steps if until_step is None else min(until_step, cfg.train.steps)
    primary = jax.process_index() == 0
    lock = faults.WorkdirLock(self.workdir, echo=self.echo)
    if primary:
      lock.acquire()
    try:
      done = self._already_trained(last)
      if done is not None:
        return done
      with faults.StopSignals(echo=self.echo) as stop:
        return self._train(last, primary, stop)
    finally:
      lock.release()

  def _already_trained(self, last: int) -> step_lib.TrainState | None:
    """The restored state if the workdir's checkpoint is already at step `last`
    (then nothing is trained or written, config.json included), else None.

    Raises ConfigError if the newest checkpoint is past `train.steps`: such a
    config cannot be the one the workdir was trained with.
    """
    latest, steps = self.checkpointer.latest_step(), self.config.train.steps
    if latest is None or latest < last:
      return None
    if latest > steps:
      raise config_lib.ConfigError(
          f"train.steps: {steps} is below step {latest} of the workdir's newest checkpoint "
          f"{self.checkpointer.step_path(latest)}; nothing was trained and config.json is unchanged. Set "
          f"train.steps to {latest} or more to resume that run, or use a new --workdir")
    state = self.initial_state()
    if int(state.step) < last:  # The newest was unreadable and is now marked: train on from the one restored.
      return None
    self.echo(f"Nothing to train: checkpoint {self.checkpointer.step_path(latest)} is at step {latest} and "
              f"the run ends at step {last} (train.steps={steps}); the workdir is unchanged")
    return state

  def _train(self, last: int, primary: bool, stop: faults.StopSignals) -> step_lib.TrainState:
    began = time.perf_counter()
    cfg = self.config
    data = self.load_data()
    state = self.initial_state()
    start = int(state.step)
    self._check_tokenizer(data)
    logs = workdir_lib.LogMirror(self.workdir, data_pipeline.resolve_cache_dir(cfg.data.cache_dir))
    if primary:
      write_run_files(self.workdir, cfg, data)
      logs.pull()
      # Records of steps after the checkpoint are about to be logged again.
      faults.drop_records_after(logs.local_path(workdir_lib.METRICS_FILE), start)
    writer = metrics_lib.MetricWriter(logs.local, enabled=primary, echo=self.echo)
    if primary:
      num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))
      header = metrics_lib.run_header(cfg, num_params, self.mesh, data, start, self.eval_batches())
      for line in header + [data_pipeline.per_host_copies_line(cfg.data, jax.process_count())]:
        if line:
          self.echo(line)
    tokenizer_meta = checkpoint_lib.tokenizer_meta(data.tokenizer.serialized_model())
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = model_lib.flops_per_token(self.model_config, cfg.data.seq_len) * tokens_per_step
    peak = metrics_lib.peak_flops_per_device(cfg.train.peak_flops_per_device) * self.mesh.size
    prefetcher = data_lib.Prefetcher(lambda s: self.local_batch(data.train, s), start, cfg.data.prefetch)
    profiler = profiling.StepProfiler(cfg.train, logs.local_path("tensorboard"), self.echo, start=start)
    total, last_time, last_step = None, time.perf_counter(), start
    unchecked = []  # (step, metrics) not yet checked for non-finite values.
    done, validation, skipped = start, None, 0
    try:
      for step in tqdm.trange(start, last, initial=start, total=cfg.train.steps,
                              desc="train", disable=not primary, dynamic_ncols=True):
        batch_step, local = prefetcher.next()
        assert batch_step == step, (batch_step, step)
        state, step_metrics = profiler.step(step + 1, self.train_step, state,
                                            sharding.make_global_batch(local, self.mesh))
        total = losses.combine_sums(total, step_metrics)
        done = step + 1
        final = done == last
        stopping = stop.should_stop(done) and not final
        if not cfg.train.skip_nonfinite:
          unchecked.append((done, step_metrics))
        log = done % cfg.train.log_every == 0 or final or stopping
        evaluate = cfg.train.eval_every and (done % cfg.train.eval_every == 0 or final)
        save = self.checkpointer.should_save(done, final or stopping)
        if log or evaluate or save:  # Host syncs happen here anyway: check before logging or saving.
          self._raise_if_nonfinite(unchecked)
          unchecked = []
        if log:
          scalars = step_lib.host_metrics(total)
          skipped += int(scalars["nonfinite_steps"])
          note = "" if "loss" in scalars else f"every step since step {last_step} skipped: non-finite loss or gradients"
          elapsed = time.perf_counter() - last_time
          scalars["tokens_per_s"] = tokens_per_step * (done - last_step) / elapsed
          scalars["tflops_per_s"] = flops_per_step * (done - last_step) / elapsed / 1e12
          if peak > 0:
            scalars["mfu"] = scalars["tflops_per_s"] * 1e12 / peak
          writer.write(done, scalars, "train", note)
          total, last_time, last_step = None, time.perf_counter(), done
        if evaluate:
          validation = self.evaluate(state.params)
          writer.write(done, validation, "eval", f"estimate from the first {self.eval_batches()} validation batches")
          for name, split in data.validation_components.items():  # A mixture's components: eval/<name>/ce.
            writer.write(done, self.evaluate(state.params, split), f"eval/{name}",
                         f"estimate from the first {self.eval_batches(split)} batches of {name}")
          self.in_loop.write_buckets(done, state.params, data, self.eval_batches(), writer)
          last_time = time.perf_counter()
        if self.in_loop.tasks_due(done, final):  # Its time is left out of the next tokens_per_s.
          last_time += self.in_loop.write_tasks(done, state.params, data, writer)
        if save:
          # The batch at step s is a function of (seed, s): the step is the data iterator's state.
          meta = {"data": {"next_batch_step": done, "seed": cfg.seed}, "tokenizer": tokenizer_meta}
          self.checkpointer.save(done, state, self.config_json, meta)
          if primary:
            writer.flush()
            logs.push()
        if stopping:
          self.checkpointer.wait()
          self.echo(f"Stopped by {stop.received} after step {done}; saved checkpoint "
                    f"{self.checkpointer.step_path(done)}")
          break
    finally:
      profiler.close(done)
      prefetcher.close()
      self.checkpointer.wait()
      writer.close()
      if primary:
        logs.push()
    if primary:
      if skipped:
        self.echo(f"Warning: {skipped} of {done - start} steps were skipped for a non-finite loss or gradient "
                  f"(train.skip_nonfinite=True); the parameters did not change on those steps")
      latest = self.checkpointer.latest_step()
      self.echo(metrics_lib.closing_line(done, cfg.train.steps, done - start, time.perf_counter() - began, validation,
                                         None if latest is None else self.checkpointer.step_path(latest)))
    return state

  def _raise_if_nonfinite(self, unchecked: list[tuple[int, dict]]) -> None:
    """Raises NonFiniteError naming the first step whose loss or gradients were not finite."""
    flags = jax.device_get([m["nonfinite_steps"] for _, m in unchecked])
    for (step, step_metrics), flag in zip(unchecked, flags):
      if flag:
        values = step_lib.host_metrics(step_metrics)
        self.checkpointer.wait()
        latest = self.checkpointer.latest_step()
        good = (f"the last good checkpoint is {self.checkpointer.step_path(latest)}" if latest is not None
                else "no checkpoint had been saved")
        raise faults.NonFiniteError(
            f"non-finite loss or gradients at step {step} (loss={values['loss']}, "
            f"grad_norm={values['grad_norm']}); stopped without saving it, {good}. Lower "
            f"optim.learning_rate, or set train.skip_nonfinite=True to skip such updates")


def _check_divisible(abstract_state, shardings, mesh) -> None:
  """Raises ConfigError naming mesh.shape when a mesh axis does not divide the array dimension it shards
  (jit would refuse the sharding with an error that names no setting)."""
  for (path, leaf), spec_sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_state),
                                         jax.tree.leaves(shardings)):
    for dim, axes in enumerate(getattr(spec_sharding, "spec", ())):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      parts = int(np.prod([mesh.shape[a] for a in axes]))
      if leaf.shape[dim] % parts:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        over = " x ".join(f"{a} {mesh.shape[a]}" for a in axes)
        raise config_lib.ConfigError(
            f"mesh.shape: {tuple(int(mesh.shape[a]) for a in mesh.axis_names)} splits dimension {dim} (size "
            f"{leaf.shape[dim]}) of {name} over {over} = {parts} devices, which does not divide it; choose mesh "
            f"sizes that divide the model's dimensions (model.vocab_size, d_model, n_heads, n_kv_heads, d_ff)")


def write_run_files(workdir: str, config, data) -> None:
  """What eval.py needs besides checkpoints: `config.json`, `tokenizer.model`
  and `token_counts.npy` (int64 [vocab], training-split occurrences per id)."""
  root = workdir_lib.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(config.to_json_best_effort(indent=2))
  (root / "tokenizer.model").write_bytes(data.tokenizer.serialized_model())
  with (root / "token_counts.npy").open("wb") as f:
    np.save(f, data.train.token_counts(config.model.vocab_size))




def train_and_evaluate(config, workdir: str) -> step_lib.TrainState:
  """Entry point used by train.py."""
  logging.info("JAX devices: %s", jax.devices())
  return Trainer(config, workdir).run()

"""The train step's gradient against a reference written here; end-to-end training on the built-in
corpus: the loss falls, gamma 0 is cross-entropy, resume is exact, the log says what happened."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_tiny_config
from mile_jax import train_lib
from mile_jax.core import model as model_lib
from mile_jax.core import step as step_lib

EPS32 = 2.0 ** -24

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logged(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _gradient_capture():
  """An optimizer that applies no update and keeps the gradient it is given as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _reference_weights(name, logits, targets, mask, gamma, sigma):
  """Float64 NumPy w * mask / sum(w * mask) and the loss sum(w * ce * mask) / sum(w * mask)."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  weights = {"cross_entropy": np.ones_like(ce),
             "focal": (1.0 - np.exp(-ce)) ** gamma,
             "mile": (sigma - (np.exp(log_p) * log_p).sum(-1)) ** gamma}[name] * mask
  return weights / weights.sum(), float((weights * ce).sum() / weights.sum())


@pytest.fixture(scope="module")
def gradient_problem():
  """(model, params, batch with padding, jitted (params, weights) -> reference gradient)."""
  config = make_tiny_config(**{"model.init_std": 0.3})  # Spread-out entropies: MiLe weights 1.8 to 5.8.
  model = model_lib.Decoder(model_lib.DecoderConfig.from_config(config.model))
  params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, 32), jnp.int32))["params"]))(jax.random.key(1))
  tokens = np.random.default_rng(2).integers(0, 512, (8, 33)).astype(np.int32)
  mask = np.ones((8, 32), np.float32)
  mask[1] = 0.0  # Micro-batch k of 4 holds rows k and k + 4: micro-batch 1 has 11 targets, the others 64.
  mask[5, 11:] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}

  @jax.jit
  def reference_grad(p, weights):  # weights: (B, T) float32 constants w * mask / sum(w * mask).
    def loss(p):
      log_p = jax.nn.log_softmax(model.apply({"params": p}, batch["inputs"]))
      return jnp.sum(weights * -jnp.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0])
    return jax.grad(loss)(p)
  return model, params, batch, reference_grad


@pytest.mark.parametrize("name, impl, microbatches", [
    ("mile", "naive", 1), ("mile", "naive", 4), ("focal", "naive", 4), ("cross_entropy", "naive", 4),
    ("mile", "chunked", 4)])
def test_step_gradient_is_that_of_the_normalised_loss(name, impl, microbatches, gradient_problem):
  """The step's gradient (before clipping) is that of sum(w*ce*m) / sum(w*m) over the global batch,
  with w from float64 NumPy: padding left out, one normaliser across micro-batches."""
  model, params, batch, reference_grad = gradient_problem
  config = make_tiny_config(**{"loss.name": name, "loss.impl": impl, "loss.gamma": 2.0 if name == "focal" else 1.0,
                               "loss.block_size": 64, "train.microbatches": microbatches})
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=_gradient_capture(),
                                   schedule=optax.constant_schedule(0.0), loss_config=config.loss,
                                   microbatches=microbatches))
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=params)
  state, metrics = step(state, batch)
  grads = state.opt_state

  logits = model.apply({"params": params}, batch["inputs"])
  weights, loss = _reference_weights(name, logits, batch["targets"], batch["mask"], config.loss.gamma,
                                     config.loss.sigma)
  expected = reference_grad(params, jnp.asarray(weights, jnp.float32))
  # float32 sums over B*T targets and V logits per gradient element: relative error ~ eps * sqrt(B*T*V),
  # with an absolute floor at that fraction of the tensor's largest element (seen: 1.9e-6 of it).
  tol = 2 * EPS32 * np.sqrt(8 * 32 * 512)
  assert jax.tree.structure(grads) == jax.tree.structure(expected)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected)):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol * np.abs(want).max(),
                               err_msg=jax.tree_util.keystr(path))
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(expected)))
  np.testing.assert_allclose(float(metrics["grad_norm_sum"]), norm, rtol=tol)
  np.testing.assert_allclose(float(metrics["loss_numerator"] / metrics["loss_denominator"]), loss, rtol=tol)


def _schedule(step, total, peak=3e-3, warmup=5, final=0.1):
  """The tiny config's learning rate, written out: linear from 0 to `peak` over `warmup` steps, then
  half a cosine down to peak * final at step `total`."""
  if step < warmup:
    return peak * step / warmup
  return peak * final + peak * (1 - final) * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))


def test_loss_falls_and_gamma_zero_follows_cross_entropy(tiny_config, tmp_path):
  mile_dir, ce_dir = str(tmp_path / "mile0"), str(tmp_path / "ce")
  train_lib.Trainer(tiny_config(**{"loss.gamma": 0.0, "train.log_every": 5}), mile_dir).run()
  train_lib.Trainer(tiny_config(**{"loss.name": "cross_entropy", "train.log_every": 5}), ce_dir).run()
  mile, ce = logged(mile_dir), logged(ce_dir)
  assert [r["step"] for r in mile] == [5, 10, 15, 20, 25, 30]
  assert mile[-1]["loss"] < mile[0]["loss"] - 0.5, (mile[0]["loss"], mile[-1]["loss"])
  np.testing.assert_allclose([r["loss"] for r in mile], [r["loss"] for r in ce], rtol=1e-6)
  np.testing.assert_allclose([r["grad_norm"] for r in mile], [r["grad_norm"] for r in ce], rtol=1e-5)
  # Each record's learning rate is the mean of the rates its 5 steps applied.
  expected = [np.mean([_schedule(s, 30) for s in range(end - 5, end)]) for end in range(5, 31, 5)]
  np.testing.assert_allclose([r["learning_rate"] for r in mile], expected, rtol=1e-6)


def test_validation_record_matches_a_float64_reference(tiny_config, tmp_path):
  """The final [eval] record, recomputed in float64 NumPy from the final parameters on the first
  train.eval_batches validation batches; the header and closing lines say what ran."""
  workdir, lines = str(tmp_path / "mile"), []
  trainer = train_lib.Trainer(tiny_config(**{"train.steps": 10, "train.log_every": 10, "train.eval_every": 10}),
                              workdir, echo=lines.append)
  state = trainer.run()
  (evaluation,) = logged(workdir, "eval")
  batches = [trainer.data.validation.batch(i, 8) for i in range(2)]
  inputs, targets, mask = (np.concatenate([b[k] for b in batches]) for k in ("inputs", "targets", "mask"))
  z = np.asarray(trainer.model.apply({"params": state.params}, inputs), np.float64)
  z -= z.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  weights = 1.0 - (np.exp(log_p) * log_p).sum(-1)  # sigma + entropy, gamma 1
  valid = mask > 0
  expected = {"loss": (weights * ce)[valid].sum() / weights[valid].sum(), "ce": ce[valid].mean(),
              "entropy": weights[valid].mean() - 1.0, "weight_mean": weights[valid].mean(),
              "weight_max": weights[valid].max(), "tokens": valid.sum()}
  # float32 sums over 512 targets of 512 logits each: eps * sqrt(512 * 512).
  for key, value in expected.items():
    np.testing.assert_allclose(evaluation[key], value, rtol=2 * EPS32 * 512, err_msg=key)
  assert valid.sum() == 2 * 8 * 32
  # 2 layers of attention (4 query and 2 key/value heads of 16) and SwiGLU (128), 2 norms each, a final
  # norm, embedding and unembedding: 2 * (2*64*64 + 2*64*32 + 3*64*128 + 2*64) + 64 + 2*512*64.
  assert lines[0].startswith("Model: 139,584 parameters (2 layers")
  assert "float32, xla attention: auto on cpu)" in lines[0]
  assert any(line.startswith("Validation: every 10 steps, [eval] lines score the first 2 batches (16 of")
             for line in lines)
  assert lines[-1].startswith("Training finished at step 10 of 10 (10 steps in ")
  assert f"validation estimate (512 tokens) loss {evaluation['loss']:.4f}, ce {evaluation['ce']:.4f}" in lines[-1]
  assert lines[-1].endswith(f"; checkpoint {os.path.join(workdir, 'checkpoints', '10')}")


def test_in_training_evaluation_reads_the_validation_split_at_most_once(tiny_config, tmp_path):
  config = tiny_config(**{"data.source": "synthetic:zipf", "data.synthetic_train_tokens": 5000,
                          "data.synthetic_val_tokens": 3000, "train.eval_batches": 10_000})
  trainer = train_lib.Trainer(config, str(tmp_path))
  validation = trainer.load_data().validation
  rows = validation.tokens_per_epoch // 33  # One pass over the split in rows of seq_len + 1 tokens.
  assert rows < 10_000 * 8
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), trainer.abstract_state.params)
  assert trainer.evaluate(params)["tokens"] == rows // 8 * 8 * 32


def test_skipped_steps_are_logged_as_skipped(tiny_config, tmp_path):
  """Steps 2 and 3 (0-based) have an infinite loss: no made-up numbers for them, a warning at the end,
  and the later steps' learning rate is the schedule at the updates applied, not at the step."""
  lines = []
  config = tiny_config(**{"train.steps": 6, "train.log_every": 1, "train.skip_nonfinite": True})
  trainer = train_lib.Trainer(config, str(tmp_path), echo=lines.append)
  data = trainer.load_data()
  original = trainer.local_batch
  def local_batch(dataset, step):
    batch = original(dataset, step)
    if dataset is data.train and step in (2, 3):
      batch = dict(batch, mask=batch["mask"].copy())
      batch["mask"][0, 0] = np.inf
    return batch
  trainer.local_batch = local_batch
  trainer.run()
  records = logged(str(tmp_path))
  assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 0, 0]
  assert not any({"loss", "ce", "perplexity", "learning_rate", "grad_norm"} & set(r) for r in records[2:4])
  np.testing.assert_allclose([r["learning_rate"] for r in records if "loss" in r],
                             [_schedule(updates, 6) for updates in (0, 1, 2, 3)], rtol=1e-6)
  assert sum(line.startswith("[train] step 3: nonfinite_steps=1 tokens_per_s=")
             and line.endswith("(every step since step 2 skipped: non-finite loss or gradients)") for line in lines) == 1
  assert sum(line.startswith("Warning: 2 of 6 steps were skipped") for line in lines) == 1


def test_resume_equals_uninterrupted(tiny_config, tmp_path):
  """20 steps straight equal 10 steps, a restart from the checkpoint, then 10 more."""
  config = tiny_config(**{"train.steps": 20, "checkpoint.every_steps": 100})
  straight = train_lib.Trainer(config, str(tmp_path / "straight")).run()
  resumed_dir = str(tmp_path / "resumed")
  first, second = [], []
  train_lib.Trainer(config, resumed_dir, echo=first.append).run(until_step=10)
  assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints")))[:1] == ["10"]
  resumed = train_lib.Trainer(config, resumed_dir, echo=second.append).run()
  assert int(resumed.step) == 20
  assert "Start: a new run of 20 steps" in first and first[-1].startswith("Training stopped at step 10 of 20 (10 steps")
  assert "Start: resumed at step 10 of 20" in second
  assert second[-1].startswith("Training finished at step 20 of 20 (10 steps")
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses_straight = [r["loss"] for r in logged(str(tmp_path / "straight"))]
  losses_resumed = [r["loss"] for r in logged(resumed_dir)]
  assert losses_straight == losses_resumed


def test_train_py_rejects_a_bad_setting_before_compiling(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/default.py", "--workdir", str(tmp_path),
       "--config.loss.gamma=-1"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert "loss.gamma" in result.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / "checkpoints")


def test_the_run_header_says_what_the_run_uses(tiny_config):
  """The loss's parameters only where the loss has them; the validation steps a run really has."""
  from mile_jax.run import metrics  # pylint: disable=import-outside-toplevel
  loss = lambda name: tiny_config(**{"loss.name": name, "loss.gamma": 1.0, "loss.sigma": 1.0}).loss  # noqa: E731
  assert metrics.loss_text(loss("cross_entropy")) == "cross_entropy"
  assert metrics.loss_text(loss("focal")) == "focal (gamma 1.0)"
  assert metrics.loss_text(loss("mile")) == "mile (gamma 1.0, sigma 1.0)"
  assert metrics.eval_schedule(100, 40) == "at the last step only (40; train.eval_every=100 is beyond train.steps)"
  assert metrics.eval_schedule(100, 250) == "every 100 steps and at the last step (250)"
  assert metrics.eval_schedule(10, 10) == metrics.eval_schedule(10, 30) == "every 10 steps"
  assert metrics.layers_text(tiny_config().model) == (
      "2 layers, unrolled (model.scan_layers unset: scanned from 16 layers)")
  assert metrics.layers_text(tiny_config(**{"model.n_layers": 16}).model).startswith("16 layers, scanned (")
  assert metrics.layers_text(tiny_config(**{"model.scan_layers": True}).model) == "2 layers, scanned"
  # Several processes, each preparing the data into its own host's cache: the header says so and how not to.
  from mile_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  files = {"data.source": "files:/c/*.jsonl", "data.cache_dir": "/tmp/c"}
  data = lambda **kw: tiny_config(**{**files, **kw}).data  # noqa: E731
  line = pipeline.per_host_copies_line(data(), 4)
  assert line.startswith("Data preparation: each of the 4 processes tokenizes its own copy of files:/c/*.jsonl")
  assert "python -m mile_jax.data.prepare --source=files:/c/*.jsonl" in line and "data.source=store:gs://" in line
  for no_copies in (pipeline.per_host_copies_line(data(), 1),
                    pipeline.per_host_copies_line(data(**{"data.cache_dir": "gs://b/cache"}), 4),
                    pipeline.per_host_copies_line(data(**{"data.source": "store:gs://b/s"}), 4)):
    assert no_copies == ""

"""End-to-end training on the built-in corpus: the loss falls, gamma 0 is cross-entropy, resume is exact."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from mile_jax import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logged(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_loss_falls_and_gamma_zero_follows_cross_entropy(tiny_config, tmp_path):
  mile_dir, ce_dir = str(tmp_path / "mile0"), str(tmp_path / "ce")
  train_lib.Trainer(tiny_config(**{"loss.gamma": 0.0, "train.log_every": 5}), mile_dir).run()
  train_lib.Trainer(tiny_config(**{"loss.name": "cross_entropy", "train.log_every": 5}), ce_dir).run()
  mile, ce = logged(mile_dir), logged(ce_dir)
  assert [r["step"] for r in mile] == [5, 10, 15, 20, 25, 30]
  assert mile[-1]["loss"] < mile[0]["loss"] - 0.5, (mile[0]["loss"], mile[-1]["loss"])
  np.testing.assert_allclose([r["loss"] for r in mile], [r["loss"] for r in ce], rtol=1e-6)
  np.testing.assert_allclose([r["grad_norm"] for r in mile], [r["grad_norm"] for r in ce], rtol=1e-5)
  assert all(r["weight_mean"] == 1.0 for r in mile)


def test_mile_weights_are_logged_and_normalised(tiny_config, tmp_path):
  workdir = str(tmp_path / "mile")
  train_lib.Trainer(tiny_config(**{"train.steps": 10, "train.log_every": 10, "train.eval_every": 10}),
                    workdir).run()
  (train,), (evaluation,) = logged(workdir), logged(workdir, "eval")
  # weight = 1 + entropy on average (gamma 1, sigma 1), and the max is relative to the mean.
  np.testing.assert_allclose(train["weight_mean"], 1.0 + train["entropy"], rtol=1e-5)
  assert train["weight_max"] > 1.0
  assert 0 < evaluation["ce"] < np.log(512) + 0.5
  assert evaluation["tokens"] == 2 * 8 * 32


def test_resume_equals_uninterrupted(tiny_config, tmp_path):
  """20 steps straight equal 10 steps, a restart from the checkpoint, then 10 more."""
  config = tiny_config(**{"train.steps": 20, "checkpoint.every_steps": 100})
  straight = train_lib.Trainer(config, str(tmp_path / "straight")).run()
  resumed_dir = str(tmp_path / "resumed")
  train_lib.Trainer(config, resumed_dir).run(until_step=10)
  assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints")))[:1] == ["10"]
  resumed = train_lib.Trainer(config, resumed_dir).run()
  assert int(resumed.step) == 20
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

"""The loss comparison: seed statistics, resuming, results and plots."""

import json
import math
import os

import numpy as np
import pytest

from mile_jax import data as data_lib
from mile_jax import train_lib
from mile_jax.experiments import compare
from mile_jax.experiments import plots
from mile_jax.experiments import tables
from mile_jax.experiments import token_stats
from conftest import make_tiny_config


def summary(ce, high, low, docs=None):
  """A token_stats summary with per-bucket ce (and per-document sums when `docs` is given)."""
  out = {"ce": ce, "perplexity": float(np.exp(ce)),
         "buckets": {"high": {"ce": high, "perplexity": float(np.exp(high)), "entropy": 1.0},
                     "medium": {"tokens": 0}, "low": {"ce": low, "perplexity": float(np.exp(low)), "entropy": 2.0}}}
  if docs is not None:
    out["documents"] = docs
  return out


def test_levels_and_paired_differences_by_hand():
  ce_runs = {0: {4: summary(2.0, 1.0, 5.0)}, 1: {4: summary(2.2, 1.5, 7.0)}, 2: {4: summary(2.4, 1.2, 6.0)}}
  mile_runs = {0: {4: summary(1.9, 1.1, 4.0)}, 1: {4: summary(2.2, 1.4, 6.5)}, 2: {4: summary(2.1, 1.3, 5.0)}}
  rows = tables.metric_rows({"cross_entropy": [r[4] for r in ce_runs.values()]})
  mean, std = rows["cross_entropy"]["ce"]
  assert mean == pytest.approx(2.2) and std == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
  assert rows["cross_entropy"]["low_ce"] == pytest.approx((6.0, 1.0))
  assert "medium_ce" not in rows["cross_entropy"]

  out = tables.paired({"cross_entropy": ce_runs, "mile_g1": mile_runs})["mile_g1"]
  # Overall: differences -0.1, 0, -0.3 -> mean -0.1333, sd 0.152753, half-width 4.302653 * 0.152753 / sqrt(3).
  assert out["all"]["per_seed"] == pytest.approx({0: -0.1, 1: 0.0, 2: -0.3})
  half = 4.302653 * 0.1527525 / math.sqrt(3)
  assert (out["all"]["t"]["low"], out["all"]["t"]["high"]) == pytest.approx((-0.1333333 - half, -0.1333333 + half),
                                                                             abs=1e-6)
  assert out["low"]["per_seed"] == pytest.approx({0: -1.0, 1: -0.5, 2: -1.0})
  assert "medium" not in out and "bootstrap" not in out["all"]  # no tokens; no per-document sums
  assert out["all"]["step"] == 4

  curve = tables.curves({"cross_entropy": ce_runs, "mile_g1": mile_runs}, difference=True)
  assert list(curve) == ["mile_g1"] and curve["mile_g1"]["low"]["mean"] == pytest.approx([-2.5 / 3])
  md = tables.paired_markdown({"mile_g1": out})
  assert "| mile_g1 | -0.1333 [" in md and "over 3 seeds" in md


def test_paired_bootstrap_uses_document_sums():
  def docs(high_ce, low_ce):
    return {"high": {"tokens": [2, 1], "ce": high_ce}, "medium": {"tokens": [0, 0], "ce": [0.0, 0.0]},
            "low": {"tokens": [1, 0], "ce": low_ce}}
  ce_runs = {s: {8: summary(1.0, 1.0, 1.0, docs([2.0, 1.0], [1.0, 0.0]))} for s in (0, 1)}
  mile_runs = {0: {8: summary(0.9, 0.9, 0.8, docs([1.6, 1.1], [0.8, 0.0]))},
               1: {8: summary(1.0, 1.0, 1.0, docs([2.0, 1.0], [1.0, 0.0]))}}
  out = tables.paired({"cross_entropy": ce_runs, "mile_g1": mile_runs}, replicates=200)["mile_g1"]
  # Seed 0's document sums: high (1.6 + 1.1 - 3.0) / 3 = -0.1, all (-0.3 - 0.2) / 4 = -0.125; seed 1: 0.
  assert out["high"]["bootstrap"]["mean"] == pytest.approx(-0.05)
  assert out["all"]["bootstrap"]["mean"] == pytest.approx(-0.0625)
  # Replicates: seed 0 drawn twice (1/4) and documents {0, 0} (1/4) give -1.2 / 6 = -0.2, documents {1, 1}
  # give 0.1 / 1 = +0.1; each extreme has probability 1/16 > 2.5%, so they are the interval's ends.
  assert (out["all"]["bootstrap"]["low"], out["all"]["bootstrap"]["high"]) == pytest.approx((-0.2, 0.1))
  other = {0: {8: summary(1.0, 1.0, 1.0, {**docs([2.0, 1.0], [1.0, 0.0]), "low": {"tokens": [0, 1], "ce": [0, 1]}})},
           1: mile_runs[1]}
  with pytest.raises(ValueError, match="other validation tokens"):
    tables.paired({"cross_entropy": ce_runs, "mile_g1": other})


def test_gamma_plot(tmp_path):
  def entry(mean):
    return {"t": {"mean": mean, "low": mean - 0.01, "high": mean + 0.01},
            "bootstrap": {"mean": mean, "low": mean - 0.005, "high": mean + 0.005}}
  paired = {label: {part: entry(mean) for part in tables.PARTS}
            for label, mean in (("focal_g1", 0.02), ("mile_g0.5", -0.01), ("mile_g2", -0.03))}
  path = plots.gamma_sensitivity(paired, str(tmp_path / "gamma.png"))
  assert os.path.getsize(path) > 5_000 and open(path, "rb").read(4) == b"\x89PNG"


def test_document_ids():
  # Inputs 5 3 7 8 3 3 9 with EOS 3: targets after an EOS input start a document (an empty one between
  # the two EOS), the target EOS (input 8's) belongs to the document it ends.
  assert token_stats.document_ids(np.array([5, 3, 7, 8, 3, 3, 9]), 3).tolist() == [0, 1, 1, 1, 2, 3, 3]
  assert token_stats.document_ids(np.array([5, 6]), None).tolist() == [0, 0]


def test_run_specs_dedupe_and_order():
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict({"losses": ("cross_entropy", "focal:1.0", "mile:1.0"),
                                   "mile_gammas": (0.5, 1.0), "seeds": (0, 1)})
  specs = compare.run_specs(cfg)
  assert [s.label for s in specs[:4]] == ["cross_entropy", "focal_g1", "mile_g1", "mile_g0.5"]
  assert [s.seed for s in specs] == [0] * 4 + [1] * 4
  cfg.losses = ("mse",)
  with pytest.raises(ValueError, match="losses"):
    compare.run_specs(cfg)


def comparison_config():
  from configs.compare import get_config  # pylint: disable=import-outside-toplevel
  c = get_config()
  c.run = make_tiny_config(**{"train.steps": 6, "train.eval_every": 3, "train.log_every": 3,
                              "optim.warmup_steps": 2, "checkpoint.every_steps": 3,
                              "checkpoint.max_to_keep": 10, "data.source": "synthetic:zipf",
                              "data.synthetic_train_tokens": 20_000, "data.synthetic_val_tokens": 4_000})
  c.losses, c.mile_gammas, c.seeds, c.eval_batches, c.final_eval_batches = ("cross_entropy", "mile:1.0"), (), (0,), 2, 3
  return c


def test_compare_resumes_and_writes_results(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = comparison_config()
  real_run = train_lib.Trainer.run
  calls = []

  def interrupted(self, *args, **kwargs):
    calls.append(self.config.loss.name)
    if self.config.loss.name == "mile":
      raise KeyboardInterrupt  # the comparison is stopped during the second run
    return real_run(self, *args, **kwargs)

  monkeypatch.setattr(train_lib.Trainer, "run", interrupted)
  with pytest.raises(KeyboardInterrupt):
    compare.compare(config, workdir, echo=lambda *_: None)
  monkeypatch.setattr(train_lib.Trainer, "run", lambda self, *a, **k: (calls.append(self.config.loss.name),
                                                                       real_run(self, *a, **k))[1])
  results = compare.compare(config, workdir, echo=lambda *_: None)
  assert calls == ["cross_entropy", "mile", "mile"]  # the finished run was not retrained

  run = results["runs"]["mile_g1/seed0"]
  assert [s for s, _ in run["curve"]] == [3, 6]
  final = run["final"]
  assert final["tokens"] == 3 * 8 * 32  # final_eval_batches at the last step
  # The optimum is below the model's loss, and per bucket too.
  assert 0 < final["optimal"] < final["ce"]
  assert all(b["excess"] > 0 for b in final["buckets"].values() if b["tokens"])
  assert sum(b["tokens"] for b in final["buckets"].values()) == final["tokens"]
  assert sum(final["weight_hist"]) == final["tokens"]
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["rows"]["mile_g1"]["ce"][0] == pytest.approx(final["ce"])
  assert saved["rows"]["mile_g1"]["ce"][1] == 0.0  # one seed
  for path in results["plots"]:
    assert os.path.getsize(path) > 5_000 and open(path, "rb").read(4) == b"\x89PNG"

  # Per-document sums (the bootstrap's unit) at the last step add up to the bucket statistics; each is
  # rounded to 1e-6, so a mean over n tokens of D documents is off by at most D * 5e-7 / n.
  stats_path = os.path.join(workdir, "runs", "mile_g1", "seed0", "token_stats.json")
  with open(stats_path, encoding="utf-8") as f:
    measured = json.load(f)
  assert "documents" not in measured["3"] and measured["3"]["tokens"] == 2 * 8 * 32
  docs = measured["6"]["documents"]
  cfg = compare.run_config(config, compare.RunSpec("mile_g1", "mile", 1.0, 0))
  validation = data_lib.make_data(cfg.data, cfg.model.vocab_size, cfg.data.seq_len, cfg.seed).validation
  inputs = np.concatenate([validation.batch(i, 8)["inputs"].ravel() for i in range(3)])
  # One document per EOS input, plus the one the measured tokens start in unless they start at an EOS.
  assert len(docs["high"]["tokens"]) == (inputs == validation.eos_id).sum() + (inputs[0] != validation.eos_id)
  for bucket, values in measured["6"]["buckets"].items():
    assert sum(docs[bucket]["tokens"]) == values["tokens"]
    if values["tokens"]:
      tol = 5e-7 * len(docs[bucket]["ce"]) / values["tokens"] + 1e-12
      assert sum(docs[bucket]["ce"]) / values["tokens"] == pytest.approx(values["ce"], abs=tol)
      excess = (sum(docs[bucket]["ce"]) - sum(docs[bucket]["optimal"])) / values["tokens"]
      assert excess == pytest.approx(values["excess"], abs=2 * tol)
  base_final = results["runs"]["cross_entropy/seed0"]["final"]
  paired = results["paired"]["mile_g1"]["all"]
  assert paired["per_seed"] == {0: pytest.approx(final["ce"] - base_final["ce"], abs=1e-12)}
  assert paired["t"]["low"] is None  # one seed: no t interval
  assert paired["bootstrap"]["mean"] == pytest.approx(paired["per_seed"][0], abs=1e-5)
  assert paired["excess_share"] == pytest.approx(paired["per_seed"][0] / base_final["excess"])
  assert "documents" not in final  # results.json keeps the per-seed summaries, not the per-document sums

  # A run measured before per-document sums existed is measured again at its last step, not retrained.
  del measured["6"]["documents"]
  with open(stats_path, "w", encoding="utf-8") as f:
    json.dump(measured, f)
  monkeypatch.setattr(train_lib.Trainer, "run", lambda *a, **k: pytest.fail("retrained a finished run"))
  again = compare.compare(config, workdir, echo=lambda *_: None)
  assert again["rows"] == results["rows"]
  assert again["paired"]["mile_g1"]["all"]["bootstrap"] == paired["bootstrap"]


def test_steps_to_measure():
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"eval_batches": 4, "final_eval_batches": 0})
  done = {"eval_batches": 4}
  history = {2: done, 4: {"eval_batches": 8}, 6: {"eval_batches": 0}, 8: {"eval_batches": 0, "documents": {}}}
  # 4: another number of batches; 6: the last step without per-document sums; 10: never measured.
  assert compare.steps_to_measure([2, 4, 6, 10], history, 6, config) == [4, 6, 10]
  assert compare.steps_to_measure([2, 8], history, 8, config) == []
  assert compare.steps_to_measure([2], {2: {"eval_batches": 0, "documents": {}}}, 2, config) == []
  config.final_eval_batches = 3
  assert compare.steps_to_measure([8], history, 8, config) == [8]


def test_checkpoint_and_eval_cadence_follow_an_overridden_step_count():
  """--config.run.train.steps=40 gives 8 checkpoints (every 5 steps) and 4 evaluations, as 200 steps do."""
  from configs.compare import get_config  # pylint: disable=import-outside-toplevel
  c = get_config()
  c.lock()  # As the command line holds it.
  assert (c.run.checkpoint.every_steps, c.run.train.eval_every) == (25, 50)
  c.run.train.steps = 40
  run = compare.run_config(c, compare.run_specs(c)[0])
  assert (run.checkpoint.every_steps, run.train.eval_every) == (5, 10)
  c.run.checkpoint.every_steps = 7  # Set explicitly, it stays.
  c.run.train.steps = 80
  assert compare.run_config(c, compare.run_specs(c)[0]).checkpoint.every_steps == 7


def test_bad_comparison_settings_are_one_line_naming_them(tmp_path):
  from mile_jax import config_lib  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "w")
  def refused(config, workdir=workdir):
    with pytest.raises(config_lib.ConfigError) as info:
      compare.validate(config, workdir)
    assert "\n" not in str(info.value)
    return str(info.value)
  assert refused(config_lib.base_config()).startswith("--config: not a comparison config (it has no run, losses")
  c = comparison_config()
  c.run.train.steps = 0
  assert refused(c) == "run.train.steps: must be a positive integer, got 0"
  c = comparison_config()
  c.run.optim.warmup_steps = 9
  assert refused(c) == "run.optim.warmup_steps: 9 is not shorter than run.train.steps=6"
  for seeds in ((), (0, 0), ("a",)):
    c = comparison_config()
    c.seeds = seeds
    assert refused(c).startswith("seeds: must be a non-empty tuple of distinct integers")
  c = comparison_config()
  c.losses, c.mile_gammas = (), ()
  assert refused(c).startswith("losses: no runs to compare")
  (tmp_path / "file").write_text("")
  assert refused(comparison_config(), str(tmp_path / "file")) == (
      f"--workdir: {tmp_path / 'file'} is a file, not a directory; name a directory")
  assert not os.path.exists(workdir)
  compare.validate(comparison_config(), workdir)
